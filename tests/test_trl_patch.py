"""TRL <= 1.13: patch_trl() routes DPOConfig(use_liger_kernel=True) to prefkern's Liger-compatible DPO loss.

The comparison runs only where TRL <= 1.13 is installed (marked slow: CI installs the newest TRL; run it in a venv
with ``pip install trl==1.13.0``). With TRL >= 1.14, patch_trl() must refuse and point to the seam.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from prefkern.compat.liger import LigerFusedLinearDPOLoss  # noqa: E402
from prefkern.compat.liger.trl_patch import patch_trl, trl_patched, unpatch_trl  # noqa: E402
from prefkern.integrations.trl import _version_tuple  # noqa: E402
from test_trl import dpo_config, make_dataset, make_model, make_tokenizer  # noqa: E402

OLD_TRL = _version_tuple(trl.__version__) < (1, 14)
# what TRL's Liger route logs with TRL's meaning (its logits/* average over all positions and the whole vocabulary)
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "num_tokens")


@pytest.mark.skipif(OLD_TRL, reason="TRL <= 1.13 installed")
def test_patch_trl_refuses_new_trl():
    with pytest.raises(RuntimeError, match="use_prefkern_lm_head"):
        patch_trl()
    assert not trl_patched()


def _train(tmp, liger: bool, kind: str = "gpt2", lora: bool = False, **overrides):
    policy, ref = make_model(kind), make_model(kind, seed=1)
    kwargs = dict(model=policy, ref_model=ref, args=dpo_config(tmp, use_liger_kernel=liger, **overrides),
                  train_dataset=make_dataset(), processing_class=make_tokenizer())
    if lora:
        from peft import LoraConfig

        kwargs["ref_model"] = None
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                           init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(**kwargs)
        if liger:
            losses = [getattr(trainer, n) for n in ("liger_loss", "liger_loss_fn") if hasattr(trainer, n)]
            assert losses and all(isinstance(x, LigerFusedLinearDPOLoss) for x in losses)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


CASES = [
    ("sigmoid", "gpt2", False, {}),
    ("robust", "llama", False, {"loss_type": ["robust"], "label_smoothing": 0.2}),
    ("discopop", "gpt2", False, {"loss_type": ["discopop"], "discopop_tau": 0.1}),
    ("lora", "llama", True, {}),
]


@pytest.mark.slow
@pytest.mark.skipif(not OLD_TRL, reason=f"TRL {trl.__version__} >= 1.14 has no Liger DPO route")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_patched_liger_route_matches_trl_default(case, tmp_path):
    if case[2]:
        pytest.importorskip("peft")
    want = _train(tmp_path, False, case[1], case[2], **case[3])
    patch_trl(liger_layers=False)  # Liger's layer kernels need a Triton device; the loss is what prefkern replaces
    try:
        got = _train(tmp_path, True, case[1], case[2], **case[3])
    except NotImplementedError as e:
        if case[2] and "PEFT" in str(e):
            pytest.skip(f"TRL {trl.__version__} refuses its Liger route with PEFT itself: {e}")
        raise
    finally:
        unpatch_trl()
    assert not trl_patched()
    for step, (g, w) in enumerate(zip(got[0], want[0])):
        for key in METRICS:
            if key in w:
                assert math.isclose(g[key], w[key], rel_tol=2e-4, abs_tol=2e-5), f"step {step}: {key} {g[key]} {w[key]}"
    for name, w in want[1].items():
        torch.testing.assert_close(got[1][name], w, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.skipif(not OLD_TRL, reason=f"TRL {trl.__version__} >= 1.14 has no Liger DPO route")
def test_patched_liger_route_refuses_what_it_would_drop(tmp_path):
    patch_trl(liger_layers=False)
    try:
        for option in ({"ld_alpha": 0.5}, {"use_weighting": True}):
            with pytest.raises(NotImplementedError):
                _train(tmp_path, True, **option)
    finally:
        unpatch_trl()
