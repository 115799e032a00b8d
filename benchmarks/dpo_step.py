"""One DPO training step on a small randomly initialised causal LM, plain PyTorch next to prefkern.

    python -m benchmarks.dpo_step [--device cpu|cuda] [--vocab 32000] [--seq 256] [--pairs 4]

The plain step runs the model to full logits (TRL's path: log_softmax, gather, masked sums); the fused
step runs the model body to its last hidden states and hands them and ``lm_head.weight`` to
``prefkern.FusedLinearPreferenceLoss``. Both start from the same weights; the script prints the
losses, the largest gradient difference, and each step's time and peak extra memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import prefkern

from .harness import Case, peak_extra_mb, reexec_with_fixed_mmap_threshold


def build_model(vocab: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=256, n_layer=2, n_head=4, tie_word_embeddings=True,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


def plain_loss(policy, ref, ids, labels, beta):
    logits = policy(ids).logits
    with torch.no_grad():
        ref_logits = ref(ids).logits
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0).unsqueeze(-1)
    tok = torch.log_softmax(logits.float(), -1).gather(-1, safe).squeeze(-1)
    ref_tok = torch.log_softmax(ref_logits.float(), -1).gather(-1, safe).squeeze(-1)
    batch = prefkern.preference_batch(tok, mask, ref_tok)
    return prefkern.dpo_loss(batch.policy_chosen_logps, batch.policy_rejected_logps, batch.ref_chosen_logps,
                             batch.ref_rejected_logps, beta=beta).loss


def fused_loss(policy, ref, ids, labels, beta, module):
    hidden = policy.transformer(ids).last_hidden_state
    with torch.no_grad():
        ref_hidden = ref.transformer(ids).last_hidden_state
    return module(hidden, policy.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight).loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dpo_step", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--mode", default="auto", choices=["auto", "eager", "stream"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        reexec_with_fixed_mmap_threshold("benchmarks.dpo_step", list(sys.argv[1:] if argv is None else argv))
    policy = build_model(args.vocab, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    # [chosen; rejected]: shared prompt of seq/4 tokens, labels are the next tokens of the completion
    ids = torch.randint(0, args.vocab, (2 * args.pairs, args.seq), generator=gen).to(device)
    labels = torch.cat([ids[:, 1:], torch.full((2 * args.pairs, 1), -100, device=device)], dim=1)
    labels[:, : args.seq // 4] = -100
    module = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.1, mode=args.mode)
    results = {}
    for name, fn in (("plain", lambda m: plain_loss(m, ref, ids, labels, 0.1)),
                     ("prefkern", lambda m: fused_loss(m, ref, ids, labels, 0.1, module))):
        model = copy.deepcopy(policy)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(_state=None, model=model, opt=opt, fn=fn):
            opt.zero_grad(set_to_none=True)
            loss = fn(model)
            loss.backward()
            opt.step()
            return loss

        step()  # warm-up (allocations, kernels)
        model.load_state_dict(policy.state_dict())
        opt.zero_grad(set_to_none=True)
        loss = fn(model)
        loss.backward()
        grads = {k: v.grad.detach().clone() for k, v in model.named_parameters() if v.grad is not None}
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 3 * 1e3
        mem = peak_extra_mb(Case("dpo_step", name, "fw-bw", "", "", lambda: None, step), device)
        results[name] = (loss.item(), grads, ms, mem)
    (lp, gp, tp, mp), (lf, gf, tf, mf) = results["plain"], results["prefkern"]
    diff = max((gp[k] - gf[k]).abs().max().item() for k in gp)
    scale = max(gp[k].abs().max().item() for k in gp)
    print(f"model: GPT-2 shape, 2 layers, hidden 256, vocab {args.vocab}; {args.pairs} pairs x {args.seq} tokens on {device}")
    print(f"loss    plain {lp:.6f}   prefkern {lf:.6f}   |diff| {abs(lp - lf):.2e}")
    print(f"grads   max |plain - prefkern| {diff:.2e} (largest gradient entry {scale:.2e})")
    print(f"step    plain {tp:8.1f} ms   prefkern {tf:8.1f} ms   speedup {tp / tf:.2f}x")
    if mp is not None and mf is not None:
        print(f"memory  plain {mp:8.1f} MB   prefkern {mf:8.1f} MB   (peak above the model and batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
