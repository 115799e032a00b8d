"""Ensemble scoring: NaN never hides (every backend), padding never reaches values or gradients, the
functional ``ensemble_head`` under ``EnsembleRewardHead``, and state-dict round trips of the calibration.

Truth is float64 numpy, written here independently of the kernels (and of prefkern.reference)."""

import numpy as np
import pytest
import torch

import prefkern
from prefkern.dispatch import backend_status

CPU = torch.device("cpu")
METHODS = ["mean", "wco", "uwo"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def all_backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]] + ["torch"]


def truth(scores, method, lam=0.5):
    """Float64 numpy (combined, mean, var) with numpy's own NaN rules (NaN in, NaN out)."""
    s = scores.double().numpy()
    mean, var = s.mean(axis=0), s.var(axis=0)
    combined = {"mean": mean, "wco": s.min(axis=0), "uwo": mean - lam * var}[method]
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in (combined, mean, var)]


def make_head(h, k, **kw):
    head = prefkern.EnsembleRewardHead(h, k, **kw)
    with torch.no_grad():
        head.weight.normal_(0, h ** -0.5)
        head.bias.normal_()
    return head


# ---- NaN makes the reduced score NaN on every backend ------------------------------------------------------


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_nan_member_makes_the_reduction_nan(backend, dtype, method):
    s = torch.randn(5, 37).to(dtype)
    s[2, 3] = float("nan")  # one NaN member among numbers
    s[0, 7] = float("nan")  # the first member
    s[4, 8] = float("nan")  # the last member
    s[:, 9] = float("nan")  # every member
    s[1, 10], s[3, 10] = float("inf"), -float("inf")  # infinities are numbers: min is -inf
    out = prefkern.ensemble_reduce(s, method, check_finite=False, backend=backend)
    want = truth(s, method)
    for got, exp in zip(out, want):
        assert torch.isnan(got[[3, 7, 8, 9]]).all(), got
        finite = torch.ones(37, dtype=torch.bool)
        finite[[3, 7, 8, 9, 10]] = False
        torch.testing.assert_close(got[finite].double(), exp[finite], atol=ATOL[dtype], rtol=ATOL[dtype])
    if method == "wco":
        assert out.combined[10] == -float("inf")


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("method", METHODS)
def test_nan_hidden_state_never_wins_best_of_n(backend, method):
    """A NaN hidden state at the scored position makes that candidate's score NaN, which ranks last."""
    head = make_head(16, 4, method=method, backend=backend, check_finite=False)
    hidden = torch.randn(8, 5, 16)
    hidden[2, 4, 3] = float("nan")  # candidate 2 of prompt 0 is scored at position 4
    hidden[5, 4, :] = float("nan")  # every member of candidate 1 of prompt 1
    out = head(hidden, group_size=4)
    assert torch.isnan(out.combined[0, 2]) and torch.isnan(out.combined[1, 1])
    sel = prefkern.best_of_n(out.combined)
    assert sel.local[0, 0] != 2 and sel.local[1, 0] != 1
    assert bool(sel.valid.all())


@pytest.mark.parametrize("backend", all_backends())
def test_nan_at_padded_positions_changes_neither_scores_nor_gradients(backend):
    head = make_head(12, 3, method="uwo", backend=backend)
    hidden = torch.randn(4, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    poisoned = hidden.clone()
    poisoned[mask == 0] = float("nan")

    def run(x):
        x = x.clone().requires_grad_()
        head.zero_grad()
        out = head(x, mask)
        (out.combined.sum() + out.var.sum() + out.scores.sum()).backward()
        return out, x.grad, head.weight.grad.clone(), head.bias.grad.clone()

    clean, dirty = run(hidden), run(poisoned)
    for a, b in zip(clean[0], dirty[0]):
        assert torch.equal(a, b)
    for a, b in zip(clean[1:], dirty[1:]):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert bool((dirty[1][mask == 0] == 0).all())


# ---- the functional form -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", all_backends())
def test_ensemble_head_functional_is_the_module(backend):
    head = make_head(20, 5, method="uwo", lam=0.3, backend=backend)
    head.set_normalization([0.1, -0.2, 0.3, 0.0, 1.0], [1.5, 0.5, 1.0, 2.0, 1.0])
    hidden = torch.randn(6, 4, 20, requires_grad=True)
    mask = torch.ones(6, 4)
    mask[1, 2:] = 0
    mod = head(hidden, mask, group_size=3)
    fn = prefkern.ensemble_head(hidden, mask, head.weight, head.bias, mu=head.norm_mean, sigma=head.norm_std,
                                method="uwo", lam=0.3, group_size=3, backend=backend)
    for a, b in zip(mod, fn):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # against float64 numpy truth
    last = torch.tensor([3, 1, 3, 3, 3, 3])
    x = hidden.detach().double().numpy()[np.arange(6), last.numpy()]
    raw = head.weight.detach().double().numpy() @ x.T + head.bias.detach().double().numpy()[:, None]
    mu, sigma = head.norm_mean.numpy()[:, None], head.norm_std.numpy()[:, None]
    combined, mean, var = truth(torch.from_numpy((raw - mu) / sigma), "uwo", lam=0.3)
    torch.testing.assert_close(fn.scores.reshape(5, 6).double(), torch.from_numpy(raw), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn.combined.reshape(6).double(), combined, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn.var.reshape(6).double(), var, atol=1e-5, rtol=1e-5)
    fn.combined.sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None


def test_ensemble_head_functional_argument_errors():
    hidden, w = torch.randn(2, 3, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        prefkern.ensemble_head(hidden, None, w.numpy())
    with pytest.raises(ValueError, match=r"weight must have shape \[K, H\]"):
        prefkern.ensemble_head(hidden, None, w[0])
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\] with H = 8"):
        prefkern.ensemble_head(torch.randn(2, 3, 7), None, w)
    with pytest.raises(ValueError, match=r"bias must have shape \[K\] = \[4\]"):
        prefkern.ensemble_head(hidden, None, w, torch.zeros(3))
    with pytest.raises(ValueError, match="mu and sigma must be given together"):
        prefkern.ensemble_head(hidden, None, w, mu=torch.zeros(4))
    with pytest.raises(ValueError, match="sigma is on meta"):
        prefkern.ensemble_head(hidden, None, w, mu=torch.zeros(4), sigma=torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match="method must be one of"):
        prefkern.ensemble_head(hidden, None, w, method="max")


# ---- calibration buffers round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("src_calibrated", [False, True])
@pytest.mark.parametrize("dst_calibrated", [False, True])
def test_state_dict_round_trips_in_every_direction(src_calibrated, dst_calibrated):
    hidden = torch.randn(5, 3, 8)
    src, dst = make_head(8, 3), make_head(8, 3)
    if src_calibrated:
        src.set_normalization([0.5, -1.0, 2.0], [2.0, 0.25, 1.0])
    if dst_calibrated:
        dst.set_normalization([9.0, 9.0, 9.0], [3.0, 3.0, 3.0])
    result = dst.load_state_dict(src.state_dict())  # strict: no missing or unexpected keys
    assert not result.missing_keys and not result.unexpected_keys
    assert dst.calibrated == src_calibrated
    for a, b in zip(src(hidden), dst(hidden)):
        assert torch.equal(a, b)
    # strict=False must not drop the calibration either
    third = make_head(8, 3)
    third.load_state_dict(src.state_dict(), strict=False)
    assert torch.equal(third.norm_mean, src.norm_mean) and torch.equal(third.norm_std, src.norm_std)


def test_uncalibrated_identity_is_exact_and_old_state_dicts_load():
    head = make_head(8, 3, method="uwo")
    hidden = torch.randn(4, 2, 8)
    out = head(hidden)
    raw = prefkern.ensemble_reduce(out.scores, "uwo")
    assert torch.equal(out.combined, raw.combined) and not head.calibrated
    legacy = {k: v for k, v in head.state_dict().items() if not k.startswith("norm_")}
    other = make_head(8, 3)
    other.set_normalization([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    other.load_state_dict(legacy)  # a state dict saved before the buffers were always present
    assert not other.calibrated
    head.set_normalization([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert head.calibrated
    head.set_normalization(None, None)
    assert not head.calibrated and torch.equal(head(hidden).combined, out.combined)
