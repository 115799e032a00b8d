"""One TRL ``DPOTrainer`` step (policy forward and backward, reference forward): TRL's default path next to each
prefkern route, interleaved rounds, time and peak memory.

    python -m benchmarks.trl_step [--vocab 32000] [--seq 256] [--pairs 4] [--rounds 5] [--train-steps 3] [--lr 0.01]

Routes (each from the same weights and batch):
- ``trl``: ``DPOTrainer`` as installed (TRL >= 1.14: its chunked fused lm-head);
- ``seam``: the same trainer inside ``prefkern.integrations.trl.use_prefkern_lm_head()``;
- ``trainer``: ``PrefkernDPOTrainer`` (eager fused loss; TRL's metrics, entropy and accuracy from one more pass);
- ``trainer-lean``: ``PrefkernDPOTrainer(logits_metrics=False)`` (no entropy / token accuracy logged).

Rounds run the routes one after the other, so a noisy machine slows them alike; the median over rounds is reported.
``--train-steps N`` also trains N steps per route with ``trainer.train()`` and prints the logged losses side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List

import torch

from .harness import Case, peak_extra_mb, reexec_with_fixed_mmap_threshold

ROUTES = ("trl", "seam", "trainer", "trainer-lean")


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=256, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def examples(vocab: int, seq: int, pairs: int, seed: int) -> List[dict]:
    """Tokenized pairs: a prompt of seq/4 tokens, completions of about 3 seq/4 (the rejected ones a little shorter)."""
    g = torch.Generator().manual_seed(seed)
    p, c = seq // 4, seq - seq // 4

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(c - 1 - i % 7)} for i in range(pairs)]


def text_dataset(vocab: int, seq: int, n: int, seed: int):
    from datasets import Dataset

    rows = examples(vocab, seq, n, seed)
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    return Dataset.from_dict({"prompt": [text(r["prompt_ids"]) for r in rows],
                              "chosen": [" " + text(r["chosen_ids"]) for r in rows],
                              "rejected": [" " + text(r["rejected_ids"]) for r in rows]})


def make_trainer(route: str, args, tokenizer, vocab: int, seq: int, pairs: int):
    import trl

    from prefkern.integrations import trl as pk_trl

    kwargs = dict(model=build_model(vocab, 0), ref_model=build_model(vocab, 1), args=args,
                  train_dataset=text_dataset(vocab, seq, max(pairs, 4), 2), processing_class=tokenizer)
    if route == "trl" or route == "seam":
        return trl.DPOTrainer(**kwargs)
    return pk_trl.PrefkernDPOTrainer(**kwargs, logits_metrics=route == "trainer")


def route_context(route: str):
    from prefkern.integrations import trl as pk_trl

    return pk_trl.use_prefkern_lm_head() if route == "seam" else contextlib.nullcontext()


def dpo_args(out: str, pairs: int, max_steps: int, lr: float = 0.01, **extra):
    import trl

    return trl.DPOConfig(output_dir=out, per_device_train_batch_size=pairs, max_steps=max_steps, learning_rate=lr,
                         optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                         bf16=False, seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                         max_grad_norm=0.0, max_length=None, **extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trl_step", description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of --train-steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    reexec_with_fixed_mmap_threshold("benchmarks.trl_step", list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    import trl
    import transformers

    import prefkern

    routes = [r for r in args.routes.split(",") if r]
    tokenizer = build_tokenizer(args.vocab)
    device = torch.device("cpu")
    out = tempfile.mkdtemp(prefix="trl_step_")
    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"prefkern {prefkern.__version__}; {torch.get_num_threads()} threads")
    print(f"model: GPT-2 shape, 2 layers, hidden 256, vocab {args.vocab}; {args.pairs} pairs x {args.seq} tokens "
          f"(prompt {args.seq // 4}); reference model separate; fp32 on {device}")

    if args.train_steps:
        logs: Dict[str, list] = {}
        for route in routes:
            with route_context(route):
                config = dpo_args(out, args.pairs, args.train_steps, args.lr)
                trainer = make_trainer(route, config, tokenizer, args.vocab, args.seq, args.pairs)
                trainer.train()
            logs[route] = [h for h in trainer.state.log_history if "loss" in h]
        print("\nlogged by trainer.train() (loss, rewards/margins, logps/chosen, entropy) per step:")
        print("step  " + "".join(f"{r:>46}" for r in routes))
        for i in range(args.train_steps):
            cells = []
            for r in routes:
                h = logs[r][i]
                ent = f"{h['entropy']:.4f}" if "entropy" in h else "-"
                cells.append(f"{h['loss']:.6f} {h['rewards/margins']:+.5f} {h['logps/chosen']:.3f} {ent:>7}")
            print(f"{i + 1:>4}  " + "".join(f"{c:>46}" for c in cells))

    trainers, batches, grads = {}, {}, {}
    for route in routes:
        with route_context(route):
            trainer = make_trainer(route, dpo_args(out, args.pairs, 1), tokenizer, args.vocab, args.seq, args.pairs)
        trainer.model.train()
        batch = trainer.data_collator(examples(args.vocab, args.seq, args.pairs, 7))
        trainers[route], batches[route] = trainer, batch

    def step_fn(route: str) -> Callable[[object], torch.Tensor]:
        trainer, batch = trainers[route], batches[route]

        def step(_state=None):
            trainer.model.zero_grad(set_to_none=True)
            with route_context(route):
                loss = trainer.compute_loss(trainer.model, batch)
                loss.backward()
            return loss

        return step

    losses = {}
    for route in routes:  # warm-up, and the first step's loss and gradients
        losses[route] = step_fn(route)().item()
        grads[route] = {n: q.grad.detach().clone() for n, q in trainers[route].model.named_parameters()
                        if q.grad is not None}
    times: Dict[str, List[float]] = {r: [] for r in routes}
    for _ in range(args.rounds):
        for route in routes:
            fn = step_fn(route)
            t0 = time.perf_counter()
            fn()
            times[route].append((time.perf_counter() - t0) * 1e3)
    mem = {r: peak_extra_mb(Case("trl_step", r, "fw-bw", "", "", lambda: None, step_fn(r)), device) for r in routes}

    base = routes[0]
    print(f"\none step (compute_loss + backward), median of {args.rounds} interleaved rounds:")
    print(f"{'route':<14}{'loss':>12}{'|dloss|':>10}{'max|dgrad|':>12}{'ms':>10}{'speedup':>9}{'peak MB':>10}")
    t_base = statistics.median(times[base])
    for r in routes:
        diff = max((grads[r][k] - grads[base][k]).abs().max().item() for k in grads[base])
        t = statistics.median(times[r])
        m = "-" if mem[r] is None else f"{mem[r]:.0f}"
        print(f"{r:<14}{losses[r]:>12.6f}{abs(losses[r] - losses[base]):>10.1e}{diff:>12.1e}{t:>10.1f}"
              f"{t_base / t:>8.2f}x{m:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
