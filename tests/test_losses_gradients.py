"""Analytic per-sequence gradients of LOSSES.md against autograd, and float64 gradcheck of every loss."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import prefkern.losses as L

sig = torch.sigmoid
BETA, EPS, TAU = 0.3, 0.1, 0.05


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def dsig(z):
    return sig(z) * sig(-z)


def _inputs(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    pc = -1 - 9 * torch.rand(B, generator=g, dtype=torch.float64)
    pr = -1 - 9 * torch.rand(B, generator=g, dtype=torch.float64)
    rc = pc + (torch.rand(B, generator=g, dtype=torch.float64) - 0.5) * 6
    rr = pr + (torch.rand(B, generator=g, dtype=torch.float64) - 0.5) * 6
    lc = torch.randint(1, 9, (B,), generator=g)
    lr = torch.randint(1, 9, (B,), generator=g)
    return pc, pr, rc, rr, lc, lr


def _dpo(lt, **kw):
    def f(pc, pr, rc, rr, lc, lr):
        return L.dpo_loss(pc, pr, rc, rr, loss_type=lt, beta=BETA, chosen_lengths=lc, rejected_lengths=lr, **kw).losses
    return f


# name -> (per-pair loss function, analytic (f_a, f_b) with a = pc - rc, b = pr - rr)
CASES = {
    "sigmoid": (_dpo("sigmoid"), lambda a, b, lc, lr: (-BETA * sig(-BETA * (a - b)), BETA * sig(-BETA * (a - b)))),
    "cdpo": (_dpo("cdpo", label_smoothing=EPS),
             lambda a, b, lc, lr: (BETA * (sig(BETA * (a - b)) - (1 - EPS)), -BETA * (sig(BETA * (a - b)) - (1 - EPS)))),
    "hinge": (_dpo("hinge"), lambda a, b, lc, lr: (-BETA * (BETA * (a - b) < 1).double(), BETA * (BETA * (a - b) < 1).double())),
    "ipo": (_dpo("ipo"), lambda a, b, lc, lr: (2 * (a / lc - b / lr - 1 / (2 * BETA)) / lc,
                                              -2 * (a / lc - b / lr - 1 / (2 * BETA)) / lr)),
    "exo_pair": (_dpo("exo_pair", label_smoothing=EPS),
                 lambda a, b, lc, lr: (BETA * dsig(BETA * (a - b)) * (BETA * (a - b) - math.log((1 - EPS) / EPS)),
                                       -BETA * dsig(BETA * (a - b)) * (BETA * (a - b) - math.log((1 - EPS) / EPS)))),
    "nca_pair": (_dpo("nca_pair"), lambda a, b, lc, lr: (-BETA * sig(-BETA * a) + BETA / 2 * sig(BETA * a),
                                                        BETA / 2 * sig(BETA * b))),
    "robust": (_dpo("robust", label_smoothing=EPS),
               lambda a, b, lc, lr: (-BETA * ((1 - EPS) * sig(-BETA * (a - b)) + EPS * sig(BETA * (a - b))) / (1 - 2 * EPS),
                                     BETA * ((1 - EPS) * sig(-BETA * (a - b)) + EPS * sig(BETA * (a - b))) / (1 - 2 * EPS))),
    "bco_pair": (_dpo("bco_pair"), lambda a, b, lc, lr: (-BETA * sig(-BETA * a), BETA * sig(BETA * b))),
    "sppo_hard": (_dpo("sppo_hard"), lambda a, b, lc, lr: (2 * (a - 0.5 / BETA), 2 * (b + 0.5 / BETA))),
    "apo_zero": (_dpo("apo_zero"), lambda a, b, lc, lr: (-BETA * dsig(BETA * a), BETA * dsig(BETA * b))),
    "apo_down": (_dpo("apo_down"), lambda a, b, lc, lr: (BETA * dsig(BETA * a) - BETA * dsig(BETA * (a - b)),
                                                        BETA * dsig(BETA * (a - b)))),
    "sigmoid_norm": (_dpo("sigmoid_norm"),
                     lambda a, b, lc, lr: (-BETA / lc * sig(-BETA * (a / lc - b / lr)), BETA / lr * sig(-BETA * (a / lc - b / lr)))),
    "sigmoid f=forward_kl": (_dpo("sigmoid", f_divergence_type="forward_kl"),
                             lambda a, b, lc, lr: _fdiv(a, b, torch.exp(-b) - torch.exp(-a), torch.exp(-a), torch.exp(-b))),
    "sigmoid f=js": (_dpo("sigmoid", f_divergence_type="js_divergence"),
                     lambda a, b, lc, lr: _fdiv(a, b, F_logsig(a) - F_logsig(b), sig(-a), sig(-b))),
    "sigmoid f=alpha(0.5)": (_dpo("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
                             lambda a, b, lc, lr: _fdiv(a, b, (torch.exp(-0.5 * a) - torch.exp(-0.5 * b)) / -0.5,
                                                        torch.exp(-0.5 * a), torch.exp(-0.5 * b))),
    "ipo_paper": (lambda pc, pr, rc, rr, lc, lr: L.ipo_loss(pc, pr, rc, rr, tau=BETA).losses,
                  lambda a, b, lc, lr: (2 * (a - b - 1 / (2 * BETA)), -2 * (a - b - 1 / (2 * BETA)))),
}


def F_logsig(x):
    return torch.nn.functional.logsigmoid(x)


def _fdiv(a, b, delta, dpsi_a, dpsi_b):
    s = sig(-BETA * delta)
    return -BETA * s * dpsi_a, BETA * s * dpsi_b


def _discopop_dz(z):
    m = sig(z / TAU)
    dm = m * (1 - m) / TAU
    return dm * (F_logsig(z) + torch.exp(-z)) - (1 - m) * sig(-z) - m * torch.exp(-z)


CASES["discopop"] = (_dpo("discopop", discopop_tau=TAU),
                     lambda a, b, lc, lr: (BETA * _discopop_dz(BETA * (a - b)), -BETA * _discopop_dz(BETA * (a - b))))


def _bco_legacy(pc, pr, rc, rr, lc, lr):
    return L.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", beta=BETA, trl_version="0.28",
                      bco_running_mean=L.BCORunningMean(mean=0.37, count=3.0)).losses


def _bco_legacy_grad(a, b, lc, lr):
    shift = 0.37 + (torch.cat([BETA * a, BETA * b]).mean().item() - 0.37) / 4.0  # running mean after this step
    return -BETA * sig(-(BETA * a - shift)), BETA * sig(BETA * b - shift)


CASES["bco_pair legacy"] = (_bco_legacy, _bco_legacy_grad)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_analytic_gradient_matches_autograd(name, seed):
    fn, grad = CASES[name]
    pc, pr, rc, rr, lc, lr = _inputs(seed)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    fn(pc, pr, rc, rr, lc, lr).sum().backward()
    fa, fb = grad(pc.detach() - rc, pr.detach() - rr, lc.double(), lr.double())
    torch.testing.assert_close(pc.grad, fa, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pr.grad, fb, rtol=1e-9, atol=1e-12)


def test_reference_gets_no_gradient():
    pc, pr, rc, rr, lc, lr = _inputs()
    rc.requires_grad_(True)
    rr.requires_grad_(True)
    out = L.dpo_loss(pc.requires_grad_(True), pr, rc, rr)
    out.loss.backward()
    assert rc.grad is None and rr.grad is None


def test_aot_gradient_flows_to_slot_occupant():
    pc, pr, rc, rr, lc, lr = _inputs(3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    out = L.dpo_loss(pc, pr, rc, rr, loss_type="aot", beta=BETA, label_smoothing=EPS)
    out.losses.sum().backward()
    u_idx = torch.argsort((pc - pr).detach())
    d = torch.sort((pc - pr).detach()).values - torch.sort(rc - rr).values
    g_slot = BETA * (sig(BETA * d) - (1 - EPS))  # cDPO derivative in d_k
    expect = torch.zeros_like(g_slot)
    expect[u_idx] = g_slot
    torch.testing.assert_close(pc.grad, expect)
    torch.testing.assert_close(pr.grad, -expect)


def test_sft_and_rpo_token_gradient():
    g = torch.Generator().manual_seed(0)
    tok = -3 * torch.rand(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[:, 0] = True
    tok.requires_grad_(True)
    batch = L.preference_batch(tok, mask, tok.detach() - 0.1)
    alpha = 0.7
    out = L.preference_loss("rpo", batch=batch, rpo_alpha=alpha, beta=BETA)
    out.loss.backward()
    n_chosen = mask[:2].sum()
    a = batch.policy_chosen_logps.detach() - batch.ref_chosen_logps
    b = batch.policy_rejected_logps.detach() - batch.ref_rejected_logps
    fa = -BETA * sig(-BETA * (a - b)) / 2  # / B in the batch mean
    expect = torch.zeros_like(tok)
    expect[:2] = (fa[:, None] - alpha / n_chosen) * mask[:2]
    expect[2:] = (-fa[:, None]) * mask[2:]
    torch.testing.assert_close(tok.grad, expect)


def test_kto_gradient():
    pol = torch.tensor([-10.0, -12.0, -8.0, -15.0], requires_grad=True)
    ref = torch.tensor([-11.0, -11.0, -9.0, -14.0])
    lab = torch.tensor([True, False, True, False])
    kl_p, kl_r = torch.tensor([-13.0, -9.0, -11.0, -10.0]), torch.tensor([-13.5, -9.2, -11.4, -10.1])
    out = L.kto_loss(pol, ref, lab, kl_policy_logps=kl_p, kl_ref_logps=kl_r, beta=BETA, desirable_weight=1.3,
                     undesirable_weight=0.7)
    out.losses.sum().backward()
    z0 = (kl_p - kl_r).mean().clamp(min=0)
    r = pol.detach() - ref
    expect = torch.where(lab, -1.3 * BETA * dsig(BETA * (r - z0)), 0.7 * BETA * dsig(BETA * (z0 - r)))
    torch.testing.assert_close(pol.grad, expect)


def test_simpo_orpo_cpo_alphapo_gradients():
    pc, pr, _, _, lc, lr = _inputs(2)
    lcd, lrd = lc.double(), lr.double()
    gam = 0.5
    # SimPO: d/dS_w = -beta sigma(-(beta dS - gamma)) / |y_w|
    x = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    L.simpo_loss(*x, lc, lr, beta=BETA, gamma_beta_ratio=gam / BETA).losses.sum().backward()
    z = BETA * (pc / lcd - pr / lrd) - gam
    torch.testing.assert_close(x[0].grad, -BETA * sig(-z) / lcd)
    torch.testing.assert_close(x[1].grad, BETA * sig(-z) / lrd)
    # ORPO L_OR: d/d avg_w = -sigma(-z)/(1-P_w), d/d avg_l = sigma(-z)/(1-P_l)  (times lambda; / |y| for sums)
    x = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    lam = 0.2
    out = L.orpo_loss(*x, lc, lr, torch.tensor(1.0), beta=lam)
    out.losses.sum().backward()
    aw, al = pc / lcd, pr / lrd
    zz = (aw - al) - (torch.log1p(-torch.exp(aw)) - torch.log1p(-torch.exp(al)))
    torch.testing.assert_close(x[0].grad, lam * -sig(-zz) / (1 - torch.exp(aw)) / lcd)
    torch.testing.assert_close(x[1].grad, lam * sig(-zz) / (1 - torch.exp(al)) / lrd)
    # CPO sigmoid (summed) and AlphaPO (averaged, multiplies by p^-alpha)
    x = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    L.cpo_loss(*x, cpo_alpha=0.0, beta=BETA).losses.sum().backward()
    torch.testing.assert_close(x[0].grad, -BETA * sig(-BETA * (pc - pr)))
    alpha = 0.25
    x = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    L.cpo_loss(*x, chosen_lengths=lc, rejected_lengths=lr, loss_type="alphapo", alpha=alpha, beta=2.0,
               simpo_gamma=gam).losses.sum().backward()
    rw, rl = (1 - torch.exp(-alpha * aw)) / alpha, (1 - torch.exp(-alpha * al)) / alpha
    s = sig(-(2.0 * (rw - rl) - gam))
    torch.testing.assert_close(x[0].grad, -2.0 * s * torch.exp(-alpha * aw) / lcd)
    torch.testing.assert_close(x[1].grad, 2.0 * s * torch.exp(-alpha * al) / lrd)


def test_salt_token_gradients():
    le = torch.log(torch.tensor([[0.9, 0.2, 0.3, 0.4]])).requires_grad_(True)
    lg = torch.log(torch.tensor([[0.9, 0.6, 0.5]])).requires_grad_(True)
    we = torch.tensor([[1.0, 1.1, 0.0, 1.1]])
    wg = torch.tensor([[1.0, -0.1, -0.2]])
    L.salt_loss(le, we, lg, wg, omega1=1.0, omega2=0.5).loss.backward()
    p_g = lg.detach().exp()
    torch.testing.assert_close(le.grad, -we)
    expect_g = torch.where(wg > 0, -wg, wg.abs() * p_g / (1 - p_g)) * 0.5
    torch.testing.assert_close(lg.grad, expect_g)


# --- gradcheck in float64 for every loss --------------------------------------------------------------

GRADCHECK = {
    **{lt: (lambda lt: lambda pc, pr, rc, rr, lc, lr: L.dpo_loss(
        pc, pr, rc, rr, loss_type=lt, beta=BETA, label_smoothing=EPS if lt in ("exo_pair", "robust", "aot",
                                                                               "aot_unpaired", "cdpo") else 0.0,
        chosen_lengths=lc, rejected_lengths=lr).loss)(lt)
       for lt in L.DPO_LOSS_TYPES if lt != "sft"},
    "multi+f_js": lambda pc, pr, rc, rr, lc, lr: L.dpo_loss(
        pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "ipo"], loss_weights=[0.8, 0.2, 0.5],
        f_divergence_type="js_divergence", chosen_lengths=lc, rejected_lengths=lr).loss,
    "legacy ipo+sigmoid rf": lambda pc, pr, rc, rr, lc, lr: L.dpo_loss(
        pc, pr, rc, rr, loss_type=["ipo", "sigmoid"], reference_free=True, label_smoothing=EPS,
        chosen_lengths=lc, rejected_lengths=lr, trl_version="0.28").loss,
    "simpo": lambda pc, pr, rc, rr, lc, lr: L.simpo_loss(pc, pr, lc, lr).loss,
    "orpo": lambda pc, pr, rc, rr, lc, lr: L.orpo_loss(pc, pr, lc, lr, torch.tensor(1.0)).loss,
    "cpo": lambda pc, pr, rc, rr, lc, lr: L.cpo_loss(pc, pr, cpo_alpha=0.0).loss,
    "cpo_hinge": lambda pc, pr, rc, rr, lc, lr: L.cpo_loss(pc, pr, loss_type="hinge", cpo_alpha=0.0).loss,
    "cpo_simpo+nll": lambda pc, pr, rc, rr, lc, lr: L.cpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr,
                                                               loss_type="simpo", chosen_nll=-pc.sum() / lc.sum()).loss,
    "simpo_hinge+sft": lambda pc, pr, rc, rr, lc, lr: L.simpo_loss(pc, pr, lc, lr, loss_type="hinge", sft_weight=0.5,
                                                                   chosen_nll=-pc.sum() / lc.sum()).loss,
    "cpo_ipo": lambda pc, pr, rc, rr, lc, lr: L.cpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr,
                                                         loss_type="ipo", cpo_alpha=0.0).loss,
    "alphapo": lambda pc, pr, rc, rr, lc, lr: L.cpo_loss(pc, pr, chosen_lengths=lc, rejected_lengths=lr,
                                                         loss_type="alphapo", alpha=0.25, beta=2.0).loss,
    "kto": lambda pc, pr, rc, rr, lc, lr: L.kto_loss(torch.cat([pc, pr]), torch.cat([rc, rr]),
                                                     torch.arange(2 * pc.numel()) % 2 == 0,
                                                     kl=torch.tensor(0.3)).loss,
    "apo_zero_unpaired": lambda pc, pr, rc, rr, lc, lr: L.kto_loss(
        torch.cat([pc, pr]), torch.cat([rc, rr]), torch.arange(2 * pc.numel()) % 2 == 0,
        loss_type="apo_zero_unpaired").loss,
    "ipo_paper": lambda pc, pr, rc, rr, lc, lr: L.ipo_loss(pc, pr, rc, rr).loss,
    "slic_hf": lambda pc, pr, rc, rr, lc, lr: L.slic_hf_loss(pc, pr, delta=0.5, reg_weight=0.3).loss,
    "c3po": lambda pc, pr, rc, rr, lc, lr: L.c3po_loss(pc, pr, rc, rr, out_of_scope_nll=-pc.mean() / 5,
                                                       near_scope_nll=-pr.mean() / 5, use_l2=True).loss,
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_sequence_losses(name):
    pc, pr, rc, rr, lc, lr = _inputs(4, B=3)
    fn = GRADCHECK[name]
    assert gradcheck(lambda x, y: fn(x, y, rc, rr, lc, lr),
                     (pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)), eps=1e-6, atol=1e-5)


def test_gradcheck_token_level():
    g = torch.Generator().manual_seed(5)
    tok = (-0.05 - 3 * torch.rand(4, 5, generator=g)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert gradcheck(lambda x: L.sequence_logps(x, mask, average=True), (tok,))
    assert gradcheck(lambda x: L.chosen_nll(x, mask), (tok,))
    assert gradcheck(lambda x: L.log1mexp(x), (tok,))
    assert gradcheck(lambda x: torch.stack(L.ld_sequence_logps(x[:2], mask[:2], x[2:], mask[2:], 0.3)), (tok,))
    assert gradcheck(lambda x: L.preference_loss("sft", batch=L.preference_batch(x, mask)).loss, (tok,))
    w = torch.tensor([[1.0, 1.1, -0.1, 0.0, 0.0], [1.0, -0.2, 1.0, 1.1, 1.0]])
    for form in ("paper", "code"):
        assert gradcheck(lambda x: L.salt_loss(x[:2], w, x[2:], -w.abs(), form=form, vocab_size=7).loss, (tok,))
    logits_t = torch.randn(2, 5, 7, generator=g)
    logits_s = torch.randn(2, 5, 7, generator=g).requires_grad_(True)
    assert gradcheck(lambda s: L.distillation_kl(logits_t, s, mask[:2], temperature=2.0, average=True), (logits_s,))
