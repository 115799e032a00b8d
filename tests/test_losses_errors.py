"""Bad input gets a clear error (or the documented behaviour), never a silent NaN."""
from __future__ import annotations


import pytest
import torch

import prefkern.losses as L

f64 = dict(dtype=torch.float64)


def _pair(b=2):
    return (torch.full((b,), -5.0, **f64), torch.full((b,), -6.0, **f64), torch.full((b,), -5.5, **f64),
            torch.full((b,), -5.5, **f64))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type 'dpoo'"):
        L.preference_loss("dpoo", *_pair())
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto_pair'"):
        L.dpo_loss(*_pair(), loss_type="kto_pair")
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        L.preference_loss(["sigmoid", "nope"], *_pair())
    with pytest.raises(ValueError, match="SimPO loss_type"):
        L.simpo_loss(*_pair()[:2], torch.tensor([3, 3]), torch.tensor([3, 3]), loss_type="ipo")
    with pytest.raises(ValueError, match="CPO loss_type"):
        L.cpo_loss(*_pair()[:2], loss_type="robust")
    with pytest.raises(ValueError, match="KTO loss_type"):
        L.kto_loss(*_pair()[:2], torch.tensor([True, False]), loss_type="bco")
    with pytest.raises(ValueError, match="f_divergence_type"):
        L.dpo_loss(*_pair(), f_divergence_type="kl")
    with pytest.raises(TypeError, match="loss_type"):
        L.preference_loss(3, *_pair())


def test_shape_dtype_device_errors():
    pc, pr, rc, rr = _pair()
    with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(3,\).*\[B\]"):
        L.dpo_loss(pc, torch.zeros(3, **f64) - 1, rc, rr)
    with pytest.raises(ValueError, match="1-D per-sequence tensor"):
        L.dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(TypeError, match="ref_chosen_logps must be a torch.Tensor"):
        L.dpo_loss(pc, pr, [1.0, 2.0], rr)
    with pytest.raises(TypeError, match="policy_chosen_logps must have a floating dtype"):
        L.dpo_loss(torch.tensor([-1, -2]), pr, rc, rr)
    with pytest.raises(ValueError, match="device"):
        L.dpo_loss(pc, pr, rc, torch.empty(2, device="meta"))
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="mask must have the shape"):
        L.sequence_logps(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[2B, \.\.\.\]"):
        L.split_chosen_rejected(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="desirable must have shape"):
        L.kto_loss(pc, rc, torch.tensor([True]), kl=0.0)
    with pytest.raises(ValueError, match="edited_weights must have the shape"):
        L.salt_loss(torch.zeros(1, 3) - 1, torch.ones(1, 2), torch.zeros(1, 2) - 1, torch.ones(1, 2))


def test_nan_and_inf_inputs():
    pc, pr, rc, rr = _pair()
    bad = pc.clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="policy_chosen_logps contains NaN"):
        L.dpo_loss(bad, pr, rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps contains NaN"):
        L.dpo_loss(pc, pr, rc, bad)
    with pytest.raises(ValueError, match="inf"):
        L.simpo_loss(pc, pr * float("inf"), torch.tensor([2, 2]), torch.tensor([2, 2]))
    tok = torch.tensor([[-1.0, float("nan")], [-1.0, -2.0]])
    with pytest.raises(ValueError, match="token_logps contains NaN"):
        L.sequence_logps(tok, torch.ones(2, 2))
    # NaN/-inf in masked (padding) slots never leak
    tok2 = torch.tensor([[-1.0, float("-inf")], [-1.0, float("nan")]])
    out = L.sequence_logps(tok2, torch.tensor([[1, 0], [1, 0]]))
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0]))
    with pytest.raises(ValueError, match="chosen_nll contains NaN"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_nll=torch.tensor(float("nan"), **f64))


def test_empty_batch():
    e = torch.zeros(0, **f64)
    with pytest.raises(ValueError, match="empty"):
        L.dpo_loss(e, e, e, e)
    with pytest.raises(ValueError, match="empty"):
        L.kto_loss(e, e, torch.zeros(0, dtype=torch.bool), kl=0.0)
    with pytest.raises(ValueError, match="empty"):
        L.sequence_logps(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="no completion token"):
        L.chosen_nll(torch.zeros(2, 3), torch.zeros(2, 3))


def test_zero_length_completions():
    pc, pr, rc, rr = _pair()
    zero, ok = torch.tensor([0, 3]), torch.tensor([2, 3])
    for fn in (lambda: L.simpo_loss(pc, pr, zero, ok),
               lambda: L.orpo_loss(pc, pr, ok, zero, torch.tensor(1.0, **f64)),
               lambda: L.cpo_loss(pc, pr, chosen_lengths=zero, rejected_lengths=ok, loss_type="simpo", cpo_alpha=0.0),
               lambda: L.sequence_logps(torch.zeros(2, 2), torch.tensor([[1, 1], [0, 0]]), average=True),
               lambda: L.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=zero, rejected_lengths=ok,
                                  trl_version="0.28")):
        with pytest.raises(ValueError, match="is 0 at rows \\[0\\]|rows \\[1\\]"):
            fn()
    # >= 0.29 ipo / sigmoid_norm clamp the length at 1 (documented TRL behaviour): finite, equals length 1
    a = L.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=zero, rejected_lengths=ok)
    b = L.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.tensor([1, 3]), rejected_lengths=ok)
    torch.testing.assert_close(a.losses, b.losses)
    # token-level sums of an empty completion are 0 (not NaN); the averaged form raises
    torch.testing.assert_close(L.sequence_logps(torch.zeros(1, 2) - 1, torch.zeros(1, 2)), torch.zeros(1))


def test_option_errors():
    pc, pr, rc, rr = _pair()
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.warns(UserWarning, match="1e-3"):
        legacy = L.dpo_loss(pc, pr, rc, rr, loss_type=["exo_pair", "sigmoid"], trl_version="0.28")
    explicit = L.dpo_loss(pc, pr, rc, rr, loss_type=["exo_pair", "cdpo"], label_smoothing=1e-3)
    torch.testing.assert_close(legacy.loss, explicit.loss)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="rpo_alpha was removed"):
        L.dpo_loss(pc, pr, rc, rr, rpo_alpha=1.0, chosen_nll=torch.tensor(1.0, **f64))
    with pytest.raises(ValueError, match="reference_free was removed"):
        L.dpo_loss(pc, pr, rc, rr, reference_free=True)
    with pytest.raises(ValueError, match="BCORunningMean"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", trl_version="0.28")
    with pytest.raises(ValueError, match="not allowed with aot"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="aot", chosen_weights=torch.ones(2, **f64),
                   rejected_weights=torch.ones(2, **f64))
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="does not exist in TRL <= 0.28"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm", chosen_lengths=torch.tensor([1, 1]),
                   rejected_lengths=torch.tensor([1, 1]), trl_version="0.28")
    with pytest.raises(ValueError, match="forward_kl"):
        L.dpo_loss(pc, pr, rc, rr, f_divergence_type="forward_kl", trl_version="0.28")
    with pytest.raises(ValueError, match="need chosen_nll"):
        L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        L.dpo_loss(pc, pr, None, None)
    with pytest.raises(ValueError, match="loss_weights"):
        L.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="beta must be >"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="trl_version"):
        L.dpo_loss(pc, pr, rc, rr, trl_version="latest")
    with pytest.raises(ValueError, match="cpo_alpha != 0 needs chosen_nll"):
        L.cpo_loss(pc, pr)
    with pytest.raises(ValueError, match="kl_policy_logps"):
        L.kto_loss(pc, rc, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="must be < 0"):
        L.orpo_loss(torch.tensor([0.0, -1.0], **f64), pr, torch.tensor([1, 1]), torch.tensor([1, 1]),
                    torch.tensor(1.0, **f64))
    with pytest.raises(ValueError, match="vocab_size"):
        L.salt_loss(torch.zeros(1, 2) - 1, torch.ones(1, 2), torch.zeros(1, 2) - 1, -torch.ones(1, 2), form="code")
    with pytest.raises(ValueError, match="kd_lambda > 0 needs kl"):
        L.c3po_constraint(torch.tensor(1.0), kd_lambda=0.5)
    with pytest.raises(TypeError, match="sets \\['loss_type'\\] itself"):
        L.preference_loss("simpo", pc, pr, torch.tensor([1, 1]), torch.tensor([1, 1]), loss_type="hinge")
    with pytest.warns(UserWarning, match="no effect on 'sigmoid'"):
        L.dpo_loss(pc, pr, rc, rr, label_smoothing=0.1)


def test_overflow_is_an_error_not_nan():
    # forward-KL scores -exp(-a) overflow float32 for very negative log-ratios: inf - inf would be NaN
    pc = torch.tensor([-200.0])
    pr = torch.tensor([-200.0])
    rc = torch.tensor([0.0])
    rr = torch.tensor([0.0])
    with pytest.raises(FloatingPointError, match="not finite"):
        L.dpo_loss(pc, pr, rc, rr, f_divergence_type="forward_kl")
    # discopop with a huge negative margin stays finite (no 0 * inf)
    out = L.dpo_loss(torch.tensor([-500.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]),
                     loss_type="discopop", beta=1.0)
    assert torch.isfinite(out.loss)
    # SALT unlikelihood with p == 1 uses the 1e-8 floor instead of log(0)
    s = L.salt_loss(torch.zeros(1, 1) - 0.1, torch.ones(1, 1), torch.zeros(1, 1), -torch.ones(1, 1))
    assert torch.isfinite(s.loss)


def test_kto_helpers():
    torch.testing.assert_close(L.kto_mismatched_indices(5, 2), torch.tensor([1, 0, 3, 2, 4]))
    torch.testing.assert_close(L.kto_mismatched_indices(4, 4), torch.tensor([3, 0, 1, 2]))
    with pytest.raises(ValueError, match="block_size"):
        L.kto_mismatched_indices(4, 1)
    assert L.kto_weights_in_range(10, 10, 1.0, 1.0)
    assert not L.kto_weights_in_range(10, 1, 1.0, 1.0)
    with pytest.warns(UserWarning, match="outside the range"):
        L.kto_loss(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, -2.0, -3.0]),
                   torch.tensor([True, True, False]), kl=0.0, warn_imbalance=True)
