"""Property tests (hypothesis): symmetries, beta limits, reference-free invariance, bf16 accumulation."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import prefkern.losses as L

SETTINGS = settings(max_examples=30, deadline=None)
logp = st.floats(min_value=-40.0, max_value=-0.05, allow_nan=False, allow_infinity=False)
betas = st.floats(min_value=0.01, max_value=3.0)


@st.composite
def pairs(draw, min_b=1, max_b=6):
    b = draw(st.integers(min_b, max_b))
    cols = [torch.tensor(draw(st.lists(logp, min_size=b, max_size=b)), dtype=torch.float64) for _ in range(4)]
    lens = [torch.tensor(draw(st.lists(st.integers(1, 20), min_size=b, max_size=b))) for _ in range(2)]
    return (*cols, *lens)


def _swap(pc, pr, rc, rr, lc, lr):
    return pr, pc, rr, rc, lr, lc


# --- symmetry ---------------------------------------------------------------------------------------------


@SETTINGS
@given(pairs(), betas)
def test_sigmoid_swap_identity_and_metrics(x, beta):
    pc, pr, rc, rr, lc, lr = x
    o = L.dpo_loss(pc, pr, rc, rr, beta=beta)
    s = L.dpo_loss(*_swap(*x)[:4], beta=beta)
    delta = (pc - rc) - (pr - rr)
    # -log sigma(z) - (-log sigma(-z)) = -z
    torch.testing.assert_close(o.losses - s.losses, -beta * delta)
    torch.testing.assert_close(o.chosen_rewards, s.rejected_rewards)
    torch.testing.assert_close(o.metrics["rewards/margins"], -s.metrics["rewards/margins"])
    if bool((delta != 0).all()):
        torch.testing.assert_close(o.metrics["rewards/accuracies"], 1 - s.metrics["rewards/accuracies"])


@SETTINGS
@given(pairs(), betas, st.floats(0.0, 0.45))
def test_robust_swap_identity(x, beta, eps):
    o = L.dpo_loss(*x[:4], loss_type="robust", beta=beta, label_smoothing=eps)
    s = L.dpo_loss(*_swap(*x)[:4], loss_type="robust", beta=beta, label_smoothing=eps)
    delta = (x[0] - x[2]) - (x[1] - x[3])
    torch.testing.assert_close(o.losses - s.losses, -beta * delta / (1 - 2 * eps))


@SETTINGS
@given(pairs(), betas)
def test_apo_zero_and_simpo_hinge_swap(x, beta):
    o = L.dpo_loss(*x[:4], loss_type="apo_zero", beta=beta)
    s = L.dpo_loss(*_swap(*x)[:4], loss_type="apo_zero", beta=beta)
    torch.testing.assert_close(o.losses + s.losses, torch.full_like(o.losses, 2.0))
    pc, pr, _, _, lc, lr = x
    # SimPO without margin: the logistic identity in the averaged margin
    o = L.simpo_loss(pc, pr, lc, lr, beta=beta, gamma_beta_ratio=0.0)
    s = L.simpo_loss(pr, pc, lr, lc, beta=beta, gamma_beta_ratio=0.0)
    torch.testing.assert_close(o.losses - s.losses, -beta * (pc / lc - pr / lr))


@SETTINGS
@given(st.lists(logp, min_size=2, max_size=8), st.lists(logp, min_size=2, max_size=8), betas)
def test_kto_label_swap_symmetry(pol, ref, beta):
    n = min(len(pol), len(ref))
    p, r = torch.tensor(pol[:n], dtype=torch.float64), torch.tensor(ref[:n], dtype=torch.float64)
    lab = torch.arange(n) % 2 == 0
    o = L.kto_loss(p, r, lab, kl=0.0, beta=beta)
    s = L.kto_loss(r, p, ~lab, kl=0.0, beta=beta)  # r -> -r and labels flipped
    torch.testing.assert_close(o.losses, s.losses)


@SETTINGS
@given(pairs(min_b=2), betas, st.randoms(use_true_random=False))
@pytest.mark.parametrize("lt", ["sigmoid", "aot", "aot_unpaired", "ipo", "nca_pair"])
def test_batch_permutation(lt, x, beta, rnd):
    b = x[0].numel()
    perm = list(range(b))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    kw = dict(loss_type=lt, beta=beta, label_smoothing=0.1 if lt.startswith("aot") else 0.0)
    o = L.dpo_loss(*x[:4], chosen_lengths=x[4], rejected_lengths=x[5], **kw)
    p = L.dpo_loss(*(y[perm] for y in x[:4]), chosen_lengths=x[4][perm], rejected_lengths=x[5][perm], **kw)
    torch.testing.assert_close(o.loss, p.loss)
    if not lt.startswith("aot"):
        torch.testing.assert_close(o.losses[perm], p.losses)


@SETTINGS
@given(pairs(), betas, st.floats(-5, 5))
def test_dpo_depends_on_log_ratios_only(x, beta, c):
    pc, pr, rc, rr, lc, lr = x
    for lt in ("sigmoid", "hinge", "bco_pair", "discopop", "apo_down"):
        o = L.dpo_loss(pc, pr, rc, rr, loss_type=lt, beta=beta)
        s = L.dpo_loss(pc + c, pr - c, rc + c, rr - c, loss_type=lt, beta=beta)
        torch.testing.assert_close(o.losses, s.losses, rtol=1e-9, atol=1e-9)


# --- beta limits ------------------------------------------------------------------------------------------


@SETTINGS
@given(pairs())
def test_beta_to_zero(x):
    pc, pr, rc, rr, lc, lr = x
    beta = 1e-9
    o = L.dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(o.losses, torch.full_like(pc, math.log(2)), rtol=0, atol=1e-6)
    h = L.dpo_loss(pc, pr, rc, rr, loss_type="hinge", beta=beta)
    torch.testing.assert_close(h.losses, torch.ones_like(pc), rtol=0, atol=1e-6)
    eps = 0.1  # EXO: KL((1/2, 1/2) || (1 - eps, eps))
    e = L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair", beta=beta, label_smoothing=eps)
    kl = 0.5 * math.log(0.5 / (1 - eps)) + 0.5 * math.log(0.5 / eps)
    torch.testing.assert_close(e.losses, torch.full_like(pc, kl), rtol=0, atol=1e-6)
    s = L.simpo_loss(pc, pr, lc, lr, beta=beta)
    torch.testing.assert_close(s.losses, torch.full_like(pc, math.log(2)), rtol=0, atol=1e-6)
    k = L.kto_loss(pc, rc, torch.arange(pc.numel()) % 2 == 0, kl=0.2, beta=beta, desirable_weight=1.5,
                   undesirable_weight=0.5)
    torch.testing.assert_close(k.losses, torch.where(torch.arange(pc.numel()) % 2 == 0, 0.75, 0.25).double(),
                               rtol=0, atol=1e-6)
    # the gradient vanishes like beta/2 per pair
    pcg = pc.clone().requires_grad_(True)
    L.dpo_loss(pcg, pr, rc, rr, beta=beta).losses.sum().backward()
    torch.testing.assert_close(pcg.grad / beta, torch.full_like(pc, -0.5), rtol=0, atol=1e-6)


@SETTINGS
@given(pairs())
def test_beta_to_infinity(x):
    pc, pr, rc, rr, lc, lr = x
    delta = (pc - rc) - (pr - rr)
    beta = 1e4
    o = L.dpo_loss(pc, pr, rc, rr, beta=beta)
    # -log sigma(beta D) / beta -> max(0, -D)
    torch.testing.assert_close(o.losses / beta, torch.relu(-delta), rtol=0, atol=math.log(2) / beta + 1e-12)


# --- reference-free invariance ----------------------------------------------------------------------------


@SETTINGS
@given(pairs(), pairs(), betas)
def test_reference_free_ignores_reference(x, y, beta):
    pc, pr, rc, rr, lc, lr = x
    b = pc.numel()
    rc2, rr2 = (y[2].repeat(b)[:b], y[3].repeat(b)[:b])
    for lt in ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "apo_zero", "apo_down"):
        kw = dict(loss_type=lt, beta=beta, reference_free=True, trl_version="0.28", chosen_lengths=lc,
                  rejected_lengths=lr, label_smoothing=0.1 if lt in ("robust", "exo_pair") else 0.0)
        o = L.dpo_loss(pc, pr, rc, rr, **kw)
        s = L.dpo_loss(pc, pr, rc2, rr2, **kw)
        torch.testing.assert_close(o.losses, s.losses)
    # reference-free families through the registry: the batch's reference fields are never read
    nll = torch.tensor(1.3, dtype=torch.float64)
    for name, kw in (("simpo", {}), ("cpo", {}), ("cpo_simpo", {}), ("orpo", {}), ("slic_hf", {}),
                     ("sft", {})):
        b1 = L.PreferenceBatch(pc, pr, rc, rr, lc, lr, nll)
        b2 = L.PreferenceBatch(pc, pr, rc2, rr2, lc, lr, nll)
        o = L.preference_loss(name, batch=b1, **kw)
        s = L.preference_loss(name, batch=b2, **kw)
        torch.testing.assert_close(o.loss, s.loss)


# --- low-precision inputs accumulate in fp32 ----------------------------------------------------------


@SETTINGS
@given(pairs(), betas)
def test_bf16_inputs_computed_in_fp32(x, beta):
    pc, pr, rc, rr, lc, lr = x
    bf = [y.to(torch.bfloat16) for y in (pc, pr, rc, rr)]
    up = [y.to(torch.float32) for y in bf]
    for lt in ("sigmoid", "ipo", "discopop", "apo_down"):
        o = L.dpo_loss(*bf, loss_type=lt, beta=beta, chosen_lengths=lc, rejected_lengths=lr)
        r = L.dpo_loss(*up, loss_type=lt, beta=beta, chosen_lengths=lc, rejected_lengths=lr)
        assert o.loss.dtype == torch.float32 and o.losses.dtype == torch.float32
        torch.testing.assert_close(o.losses, r.losses, rtol=0, atol=0)
    o = L.simpo_loss(bf[0], bf[1], lc, lr)
    assert o.loss.dtype == torch.float32
    torch.testing.assert_close(o.loss, L.simpo_loss(up[0], up[1], lc, lr).loss, rtol=0, atol=0)


def test_bf16_token_sums_accumulate_in_fp32():
    g = torch.Generator().manual_seed(0)
    tok = (-4 * torch.rand(2, 4096, generator=g)).to(torch.bfloat16)
    mask = torch.ones(2, 4096, dtype=torch.bool)
    s = L.sequence_logps(tok, mask)
    assert s.dtype == torch.float32
    exact = tok.double().sum(1)
    torch.testing.assert_close(s.double(), exact, rtol=1e-6, atol=0)
    naive = torch.cumsum(tok, dim=1)[:, -1].double()  # sequential bf16 accumulation drifts
    assert float((naive - exact).abs().max()) > 10 * float((s.double() - exact).abs().max())
    leaf = tok.clone().requires_grad_(True)
    L.chosen_nll(leaf, mask).backward()
    assert leaf.grad.dtype == torch.bfloat16
    assert L.sequence_logps(tok.double(), mask).dtype == torch.float64
