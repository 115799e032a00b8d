"""TRL drop-in (issue #14): TRL's DPOTrainer on its default path, on prefkern's log-prob seam, and as
PrefkernDPOTrainer, trained a few steps from the same weights: losses, logged metrics and parameters agree.

Tiny models from configs (GPT-2 with a tied head, a Llama shape with an untied head), a word-level tokenizer built
in-process, an in-memory dataset, the reference model passed explicitly, CPU only, fp32, no hub download.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from prefkern.integrations import trl as pk_trl  # noqa: E402

TRL_VERSION = pk_trl._version_tuple(trl.__version__)
FUSED_HEAD = TRL_VERSION >= (1, 15)  # add_fused_lm_head: every log-prob of every trainer goes through the seam
pytestmark = pytest.mark.skipif(TRL_VERSION < (1, 14), reason=f"TRL {trl.__version__} < 1.14 has no chunked log-prob "
                                                               "function (see test_trl_patch.py)")
needs_fused_head = pytest.mark.skipif(not FUSED_HEAD, reason=f"TRL {trl.__version__}: the seam's fused-head form "
                                                             "and PrefkernDPOTrainer need TRL >= 1.15")

os.environ.setdefault("TQDM_DISABLE", "1")
WORDS = ("the a cat dog sat ran on under mat box red blue big small happy sad yes no one two three four "
         "green old new hot cold up down left right").split()
METRICS = ("loss", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
           "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "num_tokens",
           "grad_norm")
RTOL, ATOL = 2e-4, 2e-5  # fp32, a few steps of SGD


# ---- fixtures: tokenizer, data, models ---------------------------------------------------------------------------

def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_dataset(n: int = 8, seed: int = 0):
    """A fresh in-memory preference dataset (a new fingerprint every call: no cached reference log-probs leak
    from one trainer to the next)."""
    g = torch.Generator().manual_seed(seed)

    def sentence(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    data = {"prompt": [sentence(3 + i % 4) for i in range(n)],
            "chosen": [" " + sentence(2 + i % 5) for i in range(n)],
            "rejected": [" " + sentence(3 + (i * 3) % 4) for i in range(n)]}
    return datasets.Dataset.from_dict(data)


def make_model(kind: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = len(WORDS) + 3
    torch.manual_seed(seed)
    if kind in ("gpt2", "gpt2-scaled"):  # tied head; "-scaled": a Cohere-style logit_scale that TRL's head applies
        extra = {"logit_scale": 0.5} if kind == "gpt2-scaled" else {}
        cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                         eos_token_id=1, pad_token_id=0, **extra)
        return GPT2LMHeadModel(cfg)
    if kind == "llama":  # untied head
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0)
        return LlamaForCausalLM(cfg)
    raise ValueError(kind)


def dpo_config(tmp, **overrides):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, max_steps=2, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0)
    base.update(overrides)
    return trl.DPOConfig(**base)


def train(route: str, tmp, kind: str = "gpt2", lora: bool = False, **overrides):
    """(log history, trained parameters by name) of 2 steps of one route from fixed weights."""
    policy = make_model(kind)
    ref = make_model(kind, seed=1)  # a reference unlike the policy: rewards and their accuracy are not ties at step 0
    kwargs = dict(model=policy, ref_model=ref, args=dpo_config(tmp, **overrides), train_dataset=make_dataset(),
                  processing_class=make_tokenizer())
    if lora:
        from peft import LoraConfig

        kwargs["ref_model"] = None
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                           init_lora_weights=False)  # the adapter is on from step 0
    calls = {"prefkern": 0, "trl": 0}
    trl_fn = _trl_function()
    prefkern_fn = pk_trl.chunked_logprobs
    trl_apply = trl_fn.apply

    def count_prefkern(*a, **k):
        calls["prefkern"] += 1
        return prefkern_fn(*a, **k)

    def count_trl(*a, **k):
        calls["trl"] += 1
        return trl_apply(*a, **k)

    with warnings.catch_warnings(), _patched(pk_trl, "chunked_logprobs", count_prefkern), \
            _patched(trl_fn, "apply", count_trl):
        warnings.simplefilter("ignore")
        if route == "trl":
            trainer = trl.DPOTrainer(**kwargs)
            trainer.train()
        elif route == "seam":
            with pk_trl.use_prefkern_lm_head():  # around construction too: precomputed reference log-probs
                trainer = trl.DPOTrainer(**kwargs)
                trainer.train()
            assert not pk_trl.prefkern_lm_head_enabled()
        elif route == "trainer":
            trainer = pk_trl.PrefkernDPOTrainer(**kwargs)
            trainer.train()
        else:
            raise ValueError(route)
    # the route ran where it says: TRL's function alone, prefkern's alone (policy and reference)
    assert (calls["trl"] > 0) == (route == "trl") and (calls["prefkern"] > 0) == (route != "trl"), calls
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, params


@contextlib.contextmanager
def _patched(obj, name, value):
    """``obj.name = value`` for the block; the raw attribute (or its absence: an inherited one) restored after."""
    missing = object()
    old = vars(obj).get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def assert_same_run(got, want, metrics=METRICS):
    got_logs, got_params = got
    want_logs, want_params = want
    assert len(got_logs) == len(want_logs) > 0
    for step, (g, w) in enumerate(zip(got_logs, want_logs)):
        for key in metrics:
            if key in w:
                assert key in g, f"step {step}: {key} not logged"
                assert math.isclose(g[key], w[key], rel_tol=RTOL, abs_tol=ATOL), \
                    f"step {step}: {key} = {g[key]} (TRL: {w[key]})"
    assert got_params.keys() == want_params.keys()
    for name, w in want_params.items():
        torch.testing.assert_close(got_params[name], w, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


# ---- cases: (id, model, LoRA, DPOConfig overrides) ---------------------------------------------------------------

CASES = [
    ("sigmoid", "gpt2", False, {}),
    ("ipo", "llama", False, {"loss_type": ["ipo"], "beta": 0.5}),
    ("robust", "gpt2", False, {"loss_type": ["robust"], "label_smoothing": 0.2}),
    ("discopop", "llama", False, {"loss_type": ["discopop"], "discopop_tau": 0.1}),
    ("mpo", "gpt2", False, {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    ("rpo", "llama", False, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    ("ld_alpha", "gpt2", False, {"ld_alpha": 0.5}),
    ("wpo", "llama", False, {"use_weighting": True}),
    ("precompute", "gpt2", False, {"precompute_ref_log_probs": True}),
    ("grad_accum", "llama", False, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
    ("lora", "llama", True, {}),
    ("js_divergence", "gpt2", False, {"f_divergence_type": "js_divergence"}),
    ("aot", "llama", False, {"loss_type": ["aot"]}),  # sorts across the batch: the trainer streams
    ("logit_scale", "gpt2-scaled", False, {}),
]
_TRL_RUNS = {}


def trl_run(case, tmp):
    if case[0] not in _TRL_RUNS:
        _TRL_RUNS[case[0]] = train("trl", tmp, case[1], case[2], **case[3])
    return _TRL_RUNS[case[0]]


def _needs(case):
    if case[2]:
        pytest.importorskip("peft")


@needs_fused_head
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_seam_matches_trl(case, tmp_path):
    """use_prefkern_lm_head(): TRL's own losses and metrics on prefkern's log-probs and row statistics."""
    _needs(case)
    assert_same_run(train("seam", tmp_path, case[1], case[2], **case[3]), trl_run(case, tmp_path))


@needs_fused_head
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_trainer_matches_trl(case, tmp_path):
    """PrefkernDPOTrainer: the fused eager loss, TRL's metrics under TRL's names, the same parameters."""
    _needs(case)
    try:
        got = train("trainer", tmp_path, case[1], case[2], **case[3])
    except NotImplementedError as e:
        if "issue #14 item 4" in str(e):
            pytest.skip(f"waits on the prefkern core (issue #14 item 4): {e}")
        raise
    assert_same_run(got, trl_run(case, tmp_path))


# ---- the seam's function against TRL's, one call -----------------------------------------------------------------

def _trl_function():
    import trl.trainer.utils as utils

    return utils._ChunkedLogProbFunction


@needs_fused_head
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale,temperature", [(1.0, 1.0), (0.25, 0.7)])
def test_chunked_logprobs_matches_trl_function(bias, scale, temperature):
    """Every output and the gradients of log-probs (hidden, weight, bias) match TRL's chunked function."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 101
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.3
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[:5] = (x[:5] @ w.t() + (0 if b is None else b)).argmax(-1)  # labels that are the argmax
    gl = torch.randn(n, generator=g)
    results = []
    for fn in (_trl_function().apply, pk_trl.PrefkernChunkedLogProbFunction.apply):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        out = fn(leaves[0], leaves[1], leaves[2] if bias else None, y, temperature, 32, None, scale, pk_trl.OUTPUTS)
        (out[0] * gl).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    (want, want_grads), (got, got_grads) = results
    for a, e in zip(got, want):
        if e.dtype == torch.bool:
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-5, atol=1e-5)
    assert bool(got[4][:5].all())
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_chunked_logprobs_outputs_subset_and_entropy_gradient():
    """Outputs not asked for are None; differentiating the entropy raises instead of dropping the term."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g)
    y = torch.randint(0, 13, (9,), generator=g)
    out = pk_trl.chunked_logprobs(x, w, None, y, outputs=("log_probs",))
    assert out[0].shape == (9,) and all(o is None for o in out[1:])
    logp, ent, *_ = pk_trl.chunked_logprobs(x, w, None, y, outputs=("log_probs", "entropy"))
    (logp.sum() + ent.detach().sum()).backward()  # logging the entropy: fine
    with pytest.raises(RuntimeError, match="entropy without a gradient"):
        pk_trl.chunked_logprobs(x, w, None, y, outputs=("log_probs", "entropy"))[1].sum().backward()


def test_chunked_logprobs_zero3_route_recomputes_gradients(monkeypatch):
    """A ZeRO-3 head (partitioned between forward and backward) takes the recomputing route: same gradients."""
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(11, 8, generator=g), torch.randn(17, 8, generator=g), torch.randn(17, generator=g)
    y = torch.randint(0, 17, (11,), generator=g)
    grads = []
    for zero3 in (False, True):
        monkeypatch.setattr(pk_trl, "_zero3_partitioned", lambda t, z=zero3: z)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        logp = pk_trl.chunked_logprobs(*leaves[:2], leaves[2], y, outputs=("log_probs",))[0]
        (logp * torch.arange(11.0)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)


@needs_fused_head
def test_softcap_detected_or_refused():
    """A soft-capped head (Gemma 2) with a logit scale and a temperature: TRL's function's outputs."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 8, generator=g), torch.randn(19, 8, generator=g)
    y = torch.randint(0, 19, (7,), generator=g)
    want = _trl_function().apply(x, w, None, y, 0.8, 32, 5.0, 2.0, pk_trl.OUTPUTS)
    got = pk_trl.chunked_logprobs(x, w, None, y, 0.8, 32, 5.0, 2.0)
    for a, e in zip(got, want):
        if e.dtype == torch.bool:
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_model_logit_transform_reads_configs():
    from transformers import GPT2Config

    class M:
        def __init__(self, **kw):
            self.config = GPT2Config(**kw)

    assert pk_trl.model_logit_transform(M()) == pk_trl.LogitTransform()
    assert pk_trl.model_logit_transform(M(logit_scale=0.5)).scale == 0.5
    assert pk_trl.model_logit_transform(M(final_logit_softcapping=30.0)).softcap == 30.0
    assert pk_trl.model_logit_transform(M(logits_scaling=4.0)).scale == 0.25


@needs_fused_head
def test_chunked_logprobs_autocast_and_mixed_head_match_trl():
    """Under bf16 autocast both compute in bf16; bf16 hidden states with an fp32 head compute in bf16 (TRL's rule:
    the hidden states' dtype outside autocast). prefkern's error against an fp64 reference stays within twice
    TRL's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(29, 32, generator=g)
    w = torch.randn(57, 32, generator=g) * 0.2
    y = torch.randint(0, 57, (29,), generator=g)
    exact = torch.log_softmax(x.double() @ w.double().t(), -1).gather(-1, y[:, None]).squeeze(-1)
    for hidden, ctx in ((x, torch.autocast("cpu", dtype=torch.bfloat16)), (x.bfloat16(), contextlib.nullcontext())):
        with ctx:
            want = _trl_function().apply(hidden, w, None, y, 1.0, 32, None, 1.0, ("log_probs",))[0]
            got = pk_trl.chunked_logprobs(hidden, w, None, y, outputs=("log_probs",))[0]
        assert got.dtype == want.dtype == torch.float32
        err_trl = (want.double() - exact).abs().max().item()
        err_pk = (got.double() - exact).abs().max().item()
        assert err_pk <= 2 * err_trl + 1e-6, (err_pk, err_trl)


@needs_fused_head
def test_trainer_evaluate_matches_trl(tmp_path):
    """evaluate(): the fused loss without gradient (stream), metrics under TRL's eval_ names."""
    results = []
    for cls in (trl.DPOTrainer, pk_trl.PrefkernDPOTrainer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=make_model("llama"), ref_model=make_model("llama", seed=1), args=dpo_config(tmp_path),
                          train_dataset=make_dataset(), eval_dataset=make_dataset(6, seed=5),
                          processing_class=make_tokenizer())
            results.append(trainer.evaluate())
    want, got = results
    keys = [k for k in want if k.startswith("eval_") and k.split("eval_", 1)[1] in METRICS]
    assert "eval_loss" in keys and "eval_entropy" in keys
    for k in keys:
        assert math.isclose(got[k], want[k], rel_tol=RTOL, abs_tol=ATOL), (k, got[k], want[k])


@needs_fused_head
def test_seam_outputs_with_bias_scale_cap_and_argmax_labels():
    """Every output of TRL's function, with a bias, a logit scale, a temperature, with and without a soft-cap, and
    labels that are the argmax (top-1 agreement) for some rows."""
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(23, 16, generator=g), torch.randn(41, 16, generator=g), torch.randn(41, generator=g)
    y = torch.randint(0, 41, (23,), generator=g)
    y[:4] = (x[:4] @ w.t() + b).argmax(-1)
    for cap in (None, 3.0):
        want = _trl_function().apply(x, w, b, y, 0.9, 32, cap, 1.5, pk_trl.OUTPUTS)
        got = pk_trl.chunked_logprobs(x, w, b, y, 0.9, 32, cap, 1.5)
        for a, e in zip(got, want):
            if e.dtype == torch.bool:
                assert torch.equal(a, e)
            else:
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ---- switching and construction errors ---------------------------------------------------------------------------

@needs_fused_head
def test_seam_switch_is_scoped_and_nests():
    import trl.trainer.utils as utils

    original = utils._ChunkedLogProbFunction
    with pk_trl.use_prefkern_lm_head():
        with pk_trl.use_prefkern_lm_head():
            assert pk_trl.prefkern_lm_head_enabled()
        assert utils._ChunkedLogProbFunction is pk_trl.PrefkernChunkedLogProbFunction
    assert utils._ChunkedLogProbFunction is original
    pk_trl.enable_prefkern_lm_head()
    pk_trl.disable_prefkern_lm_head()
    assert utils._ChunkedLogProbFunction is original


def test_from_trl_maps_options(tmp_path):
    loss = pk_trl.from_trl(dpo_config(tmp_path, loss_type=["robust"], label_smoothing=0.1, beta=0.3, ld_alpha=0.7))
    assert loss.loss_type == "robust" and loss.beta == 0.3 and loss.ld_alpha == 0.7
    assert loss.loss_kwargs["label_smoothing"] == 0.1
    opts = pk_trl.trl_loss_options(dpo_config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]))
    assert opts["loss_type"] == ["sigmoid", "sft"] and opts["loss_weights"] == [1.0, 0.3]


@needs_fused_head
def test_unroutable_options_raise_at_construction(tmp_path):
    with pytest.raises(NotImplementedError, match="padding_free"):
        pk_trl.PrefkernDPOTrainer(model=make_model("gpt2"), ref_model=make_model("gpt2"),
                                  args=dpo_config(tmp_path, padding_free=True), train_dataset=make_dataset(),
                                  processing_class=make_tokenizer())
    with pytest.raises(ValueError, match="rpo_alpha"):
        cfg = dpo_config(tmp_path)
        cfg.rpo_alpha = 1.0
        pk_trl.trl_loss_options(cfg)


def test_importing_the_integration_does_not_import_trl():
    import subprocess
    import sys

    code = ("import sys, prefkern, prefkern.integrations.trl as m; assert 'trl' not in sys.modules, 'trl imported'; "
            "print(m.SEAM_MIN_VERSION)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(TRL_VERSION[:2] != (1, 14), reason="TRL 1.14's chunked path (use_liger_kernel=True)")
def test_seam_trl_1_14_chunked_path(tmp_path):
    """TRL 1.14: its chunked DPO path (use_liger_kernel=True, TRL's two-output function imported by the trainer
    modules) on the seam matches the same path on TRL's function."""
    def run(seam):
        policy, ref = make_model("gpt2"), make_model("gpt2", seed=1)
        kwargs = dict(model=policy, ref_model=ref, args=dpo_config(tmp_path, use_liger_kernel=True),
                      train_dataset=make_dataset(), processing_class=make_tokenizer())
        with warnings.catch_warnings(), (pk_trl.use_prefkern_lm_head() if seam else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            import trl.trainer.dpo_trainer as module

            assert (module._ChunkedLogProbFunction is pk_trl.PrefkernChunkedLogProbEntropyFunction) == seam
            trainer = trl.DPOTrainer(**kwargs)
            trainer.train()
        return ([h for h in trainer.state.log_history if "loss" in h],
                {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})

    assert_same_run(run(True), run(False))
