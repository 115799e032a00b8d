"""Ensemble reward scoring (LOSSES.md section E) on every backend this machine can run.

Truth is float64 numpy (written independently of prefkern.reference) or LOSSES.md's vectors.
"""

import math

import numpy as np
import pytest
import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status
from tolerance import assert_within_torch_error

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
METHODS = ["mean", "wco", "uwo"]


def cpu_backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]]


def all_backends():
    return cpu_backends() + ["torch"]


def truth_reduce(scores, method, lam=0.5, ddof=0, mu=None, sigma=None):
    """Float64 numpy truth of (combined, mean, var) for scores [K, N]."""
    s = np.asarray(scores.double() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if mu is not None:
        s = (s - np.asarray(mu, np.float64)[:, None]) / np.asarray(sigma, np.float64)[:, None]
    mean = s.mean(axis=0)
    var = s.var(axis=0, ddof=ddof)
    combined = {"mean": mean, "wco": s.min(axis=0), "uwo": mean - lam * var}[method]
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in (combined, mean, var)]


def truth_head(hidden, last, weight, bias):
    """Float64 [K, B] member scores: hidden[b, last[b]] . weight[k] + bias[k], via numpy."""
    x = hidden.detach().double().numpy()[np.arange(hidden.shape[0]), last.numpy()]
    s = weight.detach().double().numpy() @ x.T
    if bias is not None:
        s = s + bias.detach().double().numpy()[:, None]
    return torch.from_numpy(s)


# ---- LOSSES.md section J vectors -----------------------------------------------------------------------

VECTOR_SCORES = [[1.0, 2.0], [0.5, 3.0], [1.5, -1.0]]
VECTORS = {
    "mean": [1.0, 1.33333],
    "wco": [0.5, -1.0],
    "pop_var": [0.166667, 2.88889],
    "unbiased_var": [0.25, 4.33333],
    "uwo_bon": [0.916667, -0.111111],  # lambda 0.5, ddof 0
    "uwo_ppo": [0.975, 0.9],  # lambda 0.1, ddof 1
}


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_md_vectors(backend, dtype):
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 runs on the torch backend only")
    s = torch.tensor(VECTOR_SCORES, dtype=dtype)

    def check(out, key):
        assert out.tolist() == pytest.approx(VECTORS[key], rel=1e-5, abs=1e-6), key

    r = prefkern.ensemble_reduce(s, "mean", backend=backend)
    check(r.combined, "mean"), check(r.mean, "mean"), check(r.var, "pop_var")
    check(prefkern.ensemble_reduce(s, "wco", backend=backend).combined, "wco")
    check(prefkern.ensemble_reduce(s, "uwo", lam=0.5, ddof=0, backend=backend).combined, "uwo_bon")
    r = prefkern.ensemble_reduce(s, "uwo", lam=0.1, ddof=1, backend=backend)
    check(r.combined, "uwo_ppo"), check(r.var, "unbiased_var")


@pytest.mark.parametrize("backend", all_backends())
def test_losses_md_vectors_through_the_fused_head(backend):
    """The same vectors as three heads' scores: one-hot hidden states and weights that reproduce them."""
    s = torch.tensor(VECTOR_SCORES)
    head = prefkern.EnsembleRewardHead(2, 3, backend=backend)
    with torch.no_grad():
        head.weight.copy_(s)
        head.bias.zero_()
    hidden = torch.eye(2)[:, None, :]  # [B=2, T=1, H=2]: sample b reads column b of the weights
    out = head(hidden, method="uwo", lam=0.1, ddof=1)
    assert out.combined.tolist() == pytest.approx(VECTORS["uwo_ppo"], rel=1e-5)
    assert out.var.tolist() == pytest.approx(VECTORS["unbiased_var"], rel=1e-5)
    assert head(hidden, method="wco").combined.tolist() == pytest.approx(VECTORS["wco"])
    torch.testing.assert_close(out.scores, s)


# ---- ensemble_reduce ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 5), (3, 1), (5, 257), (8, 1000), (13, 300)])
def test_reduce_vs_float64_truth(backend, dtype, k, n):
    scores = (torch.randn(k, n) * 2 + 1).to(dtype)
    mu, sigma = torch.randn(k).tolist(), (torch.rand(k) + 0.5).tolist()
    for method in METHODS:
        for ddof in (0, 1) if k > 1 else (0,):
            for normalize in (None, (mu, sigma)):
                out = prefkern.ensemble_reduce(scores, method, lam=0.7, ddof=ddof, normalize=normalize, backend=backend)
                m, sd = (None, None) if normalize is None else normalize
                ref64 = truth_reduce(scores, method, 0.7, ddof, m, sd)
                # every backend computes in fp32 from the stored values: fp32 PyTorch sets the bar
                torch32 = reference.ensemble_reduce(scores, method, 0.7, ddof,
                                                    None if m is None else torch.tensor(m),
                                                    None if sd is None else torch.tensor(sd))
                for name, got, t32, r in zip(("combined", "mean", "var"), out, torch32, ref64):
                    assert got.dtype == torch.float32 and got.shape == (n,)
                    assert_within_torch_error(got, t32, r, torch.float32, f"{method} ddof={ddof} {name}")


@pytest.mark.parametrize("backend", all_backends())
def test_reduce_strided_and_empty(backend):
    base = torch.randn(6, 40)
    strided = base[::2, ::3]  # row stride 80, column stride 3: copied once
    transposed = torch.randn(30, 4).t()
    for s in (strided, transposed, base[1:4, 5:25]):
        out = prefkern.ensemble_reduce(s, "uwo", backend=backend)
        torch.testing.assert_close(out.combined, truth_reduce(s, "uwo")[0].float(), atol=1e-5, rtol=1e-5)
    empty = prefkern.ensemble_reduce(torch.randn(4, 0), "wco", backend=backend)
    assert empty.combined.shape == empty.mean.shape == empty.var.shape == (0,)


@pytest.mark.parametrize("backend", all_backends())
def test_reduce_single_member_is_the_member(backend):
    s = torch.randn(1, 50)
    for method in METHODS:
        out = prefkern.ensemble_reduce(s, method, lam=3.0, backend=backend)
        torch.testing.assert_close(out.combined, s[0])
        assert torch.equal(out.var, torch.zeros(50))


def test_reduce_group_size_gives_prompts_by_n():
    s = torch.randn(4, 12)
    flat = prefkern.ensemble_reduce(s, "uwo")
    grouped = prefkern.ensemble_reduce(s, "uwo", group_size=3)
    assert grouped.combined.shape == grouped.mean.shape == grouped.var.shape == (4, 3)
    torch.testing.assert_close(grouped.combined, flat.combined.reshape(4, 3))
    with pytest.raises(ValueError, match="group_size=5 must divide the number of samples N=12"):
        prefkern.ensemble_reduce(s, group_size=5)


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 33))
    mu, sigma = rng.normal(size=5), rng.uniform(0.5, 2.0, size=5)
    for method in METHODS:
        for a in (arr, arr.astype(np.float32)):
            got = prefkern.ensemble_reduce(a, method, lam=0.5, ddof=1, normalize=(mu, sigma))
            want = prefkern.ensemble_reduce(torch.from_numpy(a), method, lam=0.5, ddof=1,
                                            normalize=(torch.from_numpy(mu), torch.from_numpy(sigma)))
            assert isinstance(got.combined, np.ndarray) and got.combined.dtype == (np.float64 if a.dtype == np.float64 else np.float32)
            for g, w, t in zip(got, want, truth_reduce(a, method, 0.5, 1, mu, sigma)):
                np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=0)
                np.testing.assert_allclose(g, t.numpy(), rtol=1e-5 if a.dtype == np.float32 else 1e-12, atol=1e-6)


def test_calibration_stats_normalise_to_zero_mean_unit_std():
    ref = torch.randn(4, 500) * torch.tensor([[1.0], [5.0], [0.1], [2.0]]) + torch.tensor([[0.0], [3.0], [-7.0], [1.0]])
    mu, sigma = prefkern.calibration_stats(ref)
    out = prefkern.ensemble_reduce(ref, "mean", normalize=(mu, sigma))
    normed = (ref.double() - mu[:, None]) / sigma[:, None]
    torch.testing.assert_close(out.mean, normed.mean(0).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(normed.std(1, correction=0), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ddof", [0, 1])
def test_reduce_gradcheck_float64(method, ddof):
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    norm = (torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)
    for normalize in (None, norm):
        def f(x):
            out = prefkern.ensemble_reduce(x, method, lam=0.3, ddof=ddof, normalize=normalize)
            return out.combined, out.mean, out.var
        assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("method", METHODS)
def test_reduce_backward_matches_float64_autograd(backend, method):
    s = torch.randn(5, 40)
    g = [torch.randn(40) for _ in range(3)]
    x = s.clone().requires_grad_()
    out = prefkern.ensemble_reduce(x, method, lam=0.4, ddof=1, normalize=([0.1] * 5, [2.0] * 5), backend=backend)
    sum(o @ gi for o, gi in zip(out, g)).backward()
    x64 = s.double().requires_grad_()
    ref = reference.ensemble_reduce(x64, method, 0.4, 1, torch.full((5,), 0.1), torch.full((5,), 2.0), torch.float64)
    sum(o @ gi.double() for o, gi in zip(ref, g)).backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-5)


# ---- fused head -------------------------------------------------------------------------------------------


def make_head(h, k, bias=True, dtype=torch.float32, **kw):
    head = prefkern.EnsembleRewardHead(h, k, bias=bias, **kw)
    with torch.no_grad():
        head.weight.normal_(0, h ** -0.5)  # O(1) scores for O(1) hidden states, as with a trained head
        if bias:
            head.bias.normal_()
    return head.to(dtype)


def random_mask(b, t, side):
    lengths = torch.randint(1, t + 1, (b,))
    pos = torch.arange(t)
    mask = pos[None, :] < lengths[:, None] if side == "right" else pos[None, :] >= (t - lengths)[:, None]
    return mask.long(), lengths


@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,h,k", [(1, 1, 16, 1), (5, 3, 67, 3), (33, 4, 200, 8), (20, 2, 128, 5), (7, 2, 40, 13)])
def test_head_forward_backward_vs_truth(backend, dtype, b, t, h, k):
    hidden = torch.randn(b, t, h).to(dtype)
    mask, _ = random_mask(b, t, "right")
    last = reference.last_token_index(mask)
    head = make_head(h, k, dtype=dtype, backend=backend)
    head.set_normalization(torch.randn(k), torch.rand(k) + 0.5)
    mu, sigma = head.norm_mean, head.norm_std
    s64 = truth_head(hidden, last, head.weight, head.bias)
    for method in METHODS:
        out = head(hidden, mask, method=method, lam=0.5)
        ref64 = [s64, *truth_reduce(s64, method, 0.5, 0, mu, sigma)]
        torch_d = reference.ensemble_head(hidden, last, head.weight, head.bias, method, 0.5, 0, mu.to(dtype),
                                          sigma.to(dtype), compute_dtype=dtype)
        for name, got, td, r in zip(("scores", "combined", "mean", "var"), (out.scores, out.combined, out.mean, out.var), torch_d, ref64):
            assert got.dtype == torch.float32
            assert_within_torch_error(got, td, r, dtype, f"{method} {name}")

    # gradients with respect to hidden, weight and bias, against float64 autograd and torch in dtype d
    gs = [torch.randn(b) for _ in range(3)] + [torch.randn(k, b)]

    def grads(fn, hid, w, bias_, dt):
        hid = hid.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        bias_ = bias_.detach().clone().requires_grad_()
        outs = fn(hid, w, bias_)
        sum((o * gi.to(o.dtype)).sum() for o, gi in zip(outs, gs)).backward()
        return hid.grad, w.grad, bias_.grad

    head.method = "uwo"
    hid = hidden.detach().clone().requires_grad_()
    o = head(hid, mask)
    sum((x * gi).sum() for x, gi in zip((o.combined, o.mean, o.var, o.scores), gs)).backward()
    got = (hid.grad, head.weight.grad, head.bias.grad)

    def ref_fn(dt):
        def f(hid_, w, bias_):
            sc, c, m, v = reference.ensemble_head(hid_, last, w, bias_, "uwo", 0.5, 0, mu.to(dt), sigma.to(dt), dt)
            return c, m, v, sc
        return f

    g64 = grads(ref_fn(torch.float64), hidden.double(), head.weight.double(), head.bias.double(), torch.float64)
    gd = grads(ref_fn(dtype), hidden, head.weight, head.bias.to(dtype), dtype)
    for name, a, d, r in zip(("d hidden", "d weight", "d bias"), got, gd, g64):
        assert_within_torch_error(a, d, r, dtype, name)
    dead = torch.ones(b, t, dtype=torch.bool)
    dead[torch.arange(b), last] = False
    assert torch.all(hid.grad[dead] == 0), "only the scored token receives a gradient"


@pytest.mark.parametrize("backend", all_backends())
def test_padding_left_right_lengths_and_masks_agree(backend):
    b, t, h, k = 9, 6, 40, 4
    head = make_head(h, k, backend=backend)
    hidden = torch.randn(b, t, h)
    for side in ("right", "left"):
        mask, lengths = random_mask(b, t, side)
        last = reference.last_token_index(mask)
        expect = truth_head(hidden, last, head.weight, head.bias).float()
        by_mask = head(hidden, mask).scores
        by_lengths = head(hidden, lengths=lengths, padding_side=side).scores
        torch.testing.assert_close(by_mask, expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(by_lengths, by_mask, atol=0, rtol=0)
        by_numpy = head(hidden, lengths=lengths.numpy(), padding_side=side).scores
        torch.testing.assert_close(by_numpy, by_mask, atol=0, rtol=0)
        if side == "left":
            assert torch.all(last == t - 1)
        else:
            assert torch.equal(last, lengths - 1)
    holes = torch.tensor([[1, 0, 1, 1, 0, 0]] * b)  # any layout: the last nonzero position is scored
    torch.testing.assert_close(head(hidden, holes).scores, truth_head(hidden, torch.full((b,), 3), head.weight, head.bias).float(),
                               atol=1e-5, rtol=1e-5)
    no_mask = head(hidden).scores
    torch.testing.assert_close(no_mask, truth_head(hidden, torch.full((b,), t - 1), head.weight, head.bias).float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", all_backends())
def test_length_one_sequences_and_single_member(backend):
    hidden = torch.randn(6, 1, 24)
    head = make_head(24, 1, backend=backend)
    lin = torch.nn.Linear(24, 1)
    with torch.no_grad():
        lin.weight.copy_(head.weight)
        lin.bias.copy_(head.bias)
    expect = lin(hidden[:, 0]).squeeze(-1)
    for method in METHODS:
        out = head(hidden, torch.ones(6, 1), method=method, lam=2.0)
        torch.testing.assert_close(out.combined, expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mean, expect, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.var, torch.zeros(6))
    out = head(hidden, lengths=torch.ones(6, dtype=torch.long), method="uwo")
    out.combined.sum().backward()
    torch.testing.assert_close(head.weight.grad[0], hidden[:, 0].sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", all_backends())
def test_head_noncontiguous_hidden_and_empty_batch(backend):
    head = make_head(32, 3, backend=backend)
    big = torch.randn(8, 5, 50)
    views = [big[:, :, 7:39], big.transpose(0, 1)[:, :, 9:41], torch.randn(8, 32, 5).transpose(1, 2)]
    for v in views:
        assert not v.is_contiguous()
        last = torch.full((v.shape[0],), v.shape[1] - 1)
        torch.testing.assert_close(head(v).scores, truth_head(v, last, head.weight, head.bias).float(), atol=1e-5, rtol=1e-5)
    out = head(torch.randn(0, 3, 32), torch.ones(0, 3))
    assert out.combined.shape == (0,) and out.scores.shape == (3, 0)


def test_head_gradcheck_float64():
    head = make_head(7, 3, dtype=torch.float64)
    head.set_normalization([0.2, -0.1, 0.0], [1.5, 0.7, 1.0])
    hidden = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]])
    for method in METHODS:
        for ddof in (0, 1):
            def f(x, w, b_):
                scores, c, m, v = prefkern.ops.ensemble.ensemble_head_fwd(
                    x, reference.last_token_index(mask), w, b_, head.norm_mean, head.norm_std,
                    prefkern.ops.ensemble.METHODS.index(method), 0.4, ddof, True, "torch")
                return scores, c, m, v
            assert torch.autograd.gradcheck(f, (hidden, head.weight, head.bias))
    # and through the module
    assert torch.autograd.gradcheck(lambda x: tuple(head(x, mask, method="uwo")), (hidden,))


def test_group_size_on_the_head():
    head = make_head(16, 4)
    hidden = torch.randn(12, 2, 16)
    flat = head(hidden)
    out = head(hidden, group_size=4)
    assert out.combined.shape == (3, 4) and out.scores.shape == (4, 3, 4)
    torch.testing.assert_close(out.scores, flat.scores.reshape(4, 3, 4))
    torch.testing.assert_close(out.combined.argmax(dim=1), flat.combined.reshape(3, 4).argmax(dim=1))


def test_normalization_survives_dtype_casts_and_state_dict():
    head = make_head(16, 2)
    head.set_normalization([0.123456789, -1.0], [1.000001, 2.0])
    head = head.bfloat16()
    assert head.weight.dtype == torch.bfloat16 and head.norm_mean.dtype == torch.float64
    assert head.norm_mean[0].item() == 0.123456789 and head.norm_std[0].item() == 1.000001
    other = make_head(16, 2)
    other.set_normalization([0.0, 0.0], [1.0, 1.0])
    other.load_state_dict(head.state_dict())
    assert other.norm_mean[0].item() == 0.123456789


def test_calibrate_sets_normalization_from_reference_batch():
    head = make_head(16, 3)
    ref = torch.randn(200, 2, 16)
    head.calibrate(ref)
    raw = head(ref).scores.double()
    torch.testing.assert_close(head.norm_mean, raw.mean(1))
    torch.testing.assert_close(head.norm_std, raw.std(1, correction=0))
    normed = head(ref, method="mean").mean
    assert abs(normed.mean().item()) < 1e-5


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", all_backends())
def test_nan_or_inf_scores_raise(backend):
    for bad in (float("nan"), float("inf"), -float("inf")):
        s = torch.randn(3, 10)
        s[1, 4] = bad
        with pytest.raises(ValueError, match=r"scores is NaN or Inf at index \[1, 4\]"):
            prefkern.ensemble_reduce(s, "uwo", backend=backend)
        with pytest.raises(ValueError, match="NaN or Inf"):
            prefkern.ensemble_reduce(s.numpy(), backend=backend)
    head = make_head(8, 2, backend=backend)
    hidden = torch.randn(3, 4, 8)
    hidden[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"member score \[k, b\] is NaN or Inf at index \[0, 1\]"):
        head(hidden)
    mask = torch.ones(3, 4)
    mask[1, 3] = 0  # the NaN sits on padding: never read
    assert torch.isfinite(head(hidden, mask).combined).all()
    s = torch.randn(3, 10)
    s[0, 0] = float("nan")
    assert torch.isnan(prefkern.ensemble_reduce(s, check_finite=False, backend=backend).mean[0])


def test_mismatched_shapes_and_bad_arguments_raise():
    s = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"scores must have shape \[K, N\]"):
        prefkern.ensemble_reduce(torch.randn(5))
    with pytest.raises(ValueError, match=r"scores must have shape \[K, N\]"):
        prefkern.ensemble_reduce(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least one member"):
        prefkern.ensemble_reduce(torch.randn(0, 4))
    with pytest.raises(ValueError, match=r"normalize mu must have shape \[K\] = \[3\], got \(4,\)"):
        prefkern.ensemble_reduce(s, normalize=([0.0] * 4, [1.0] * 4))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        prefkern.ensemble_reduce(s, normalize=([0.0] * 3, [1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="normalize must be None or a pair"):
        prefkern.ensemble_reduce(s, normalize=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="method must be one of"):
        prefkern.ensemble_reduce(s, "max")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        prefkern.ensemble_reduce(s, "uwo", lam=-1.0)
    with pytest.raises(ValueError, match="ddof must be 0"):
        prefkern.ensemble_reduce(s, ddof=2)
    with pytest.raises(ValueError, match="ddof=1 needs more than 1 member"):
        prefkern.ensemble_reduce(torch.randn(1, 4), "uwo", ddof=1)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor or numpy.ndarray"):
        prefkern.ensemble_reduce([[1.0, 2.0]])
    with pytest.raises(TypeError, match="scores must have dtype"):
        prefkern.ensemble_reduce(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="float64 scores run on the 'torch' backend only"):
        prefkern.ensemble_reduce(s.double(), backend="native")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu"):
        prefkern.ensemble_reduce(s, backend="cuda")

    head = make_head(8, 3)
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\] with H = 8, got \(2, 4, 9\)"):
        head(torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, T, H\]"):
        head(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"attention_mask must be a \[B, T\] = \[2, 4\] tensor, got \(2, 5\)"):
        head(torch.randn(2, 4, 8), torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
        head(torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=4\]"):
        head(torch.randn(2, 4, 8), lengths=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=4\]"):
        head(torch.randn(2, 4, 8), lengths=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \[B\] = \[2\]"):
        head(torch.randn(2, 4, 8), lengths=torch.tensor([2, 3, 1]))
    with pytest.raises(ValueError, match="attention_mask is on meta but hidden is on cpu"):
        head(torch.randn(2, 4, 8), torch.ones(2, 4, device="meta"))
    with pytest.raises(ValueError, match="attention_mask or lengths, not both"):
        head(torch.randn(2, 4, 8), torch.ones(2, 4), lengths=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"normalize mu must have shape \[K\] = \[3\]"):
        head.set_normalization([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(TypeError, match="hidden must have dtype"):
        head(torch.ones(2, 4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        head(torch.randn(4, 2, 8), group_size=3)
    with pytest.raises(ValueError, match="ddof=1 needs more than 1 member"):
        prefkern.EnsembleRewardHead(8, 1, ddof=1)


def test_check_finite_false_skips_host_syncs_and_clamps():
    head = make_head(8, 2, check_finite=False)
    hidden = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = head(hidden, mask)  # row 1 has no real token: scored at position 0 instead of raising
    expect = truth_head(hidden, torch.tensor([1, 0, 3]), head.weight, head.bias).float()
    torch.testing.assert_close(out.scores, expect, atol=1e-5, rtol=1e-5)
    out = head(hidden, lengths=torch.tensor([0, 9, 2]))  # clamped into [1, T]
    expect = truth_head(hidden, torch.tensor([0, 3, 1]), head.weight, head.bias).float()
    torch.testing.assert_close(out.scores, expect, atol=1e-5, rtol=1e-5)


# ---- Bradley-Terry training ------------------------------------------------------------------------------


def test_bradley_terry_loss_formula_and_bootstrap_weights():
    s = torch.tensor([[2.0, 0.0, 1.0, 1.0], [0.0, 3.0, 0.5, -1.0]])  # K=2, B=2: chosen cols 0-1, rejected 2-3
    per = prefkern.bradley_terry_loss(s, per_member=True)
    expect = [np.mean([math.log1p(math.exp(-(2 - 1))), math.log1p(math.exp(-(0 - 1)))]),
              np.mean([math.log1p(math.exp(-(0 - 0.5))), math.log1p(math.exp(-(3 + 1)))])]
    assert per.tolist() == pytest.approx(expect, rel=1e-6)
    assert prefkern.bradley_terry_loss(s).item() == pytest.approx(np.mean(expect), rel=1e-6)
    w = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    weighted = prefkern.bradley_terry_loss(s, w, per_member=True)
    assert weighted[0].item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    g = torch.Generator().manual_seed(3)
    bw = prefkern.bootstrap_weights(5, 7, generator=g)
    assert bw.shape == (5, 7) and torch.equal(bw.sum(1), torch.full((5,), 7.0))
    assert torch.equal(bw, prefkern.bootstrap_weights(5, 7, generator=torch.Generator().manual_seed(3)))
    assert not all(torch.equal(bw[0], bw[i]) for i in range(1, 5)), "members get different resamples"
    with pytest.raises(ValueError, match=r"member_scores must be a \[K, 2B\] tensor"):
        prefkern.bradley_terry_loss(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"weights must have shape \[K, B\] = \[2, 2\]"):
        prefkern.bradley_terry_loss(s, torch.ones(2, 3))


@pytest.mark.parametrize("bootstrap", [False, True])
def test_training_the_ensemble_learns_the_preference(bootstrap):
    """Pairs whose chosen completion is higher along a hidden direction: every member learns it."""
    torch.manual_seed(1)
    b, t, h, k = 64, 3, 16, 4
    direction = torch.randn(h)
    x = torch.randn(2 * b, t, h)
    score = x[:, -1] @ direction
    chosen_first = score[:b] > score[b:]
    chosen = torch.where(chosen_first[:, None, None], x[:b], x[b:])
    rejected = torch.where(chosen_first[:, None, None], x[b:], x[:b])
    batch = torch.cat([chosen, rejected])
    head = prefkern.EnsembleRewardHead(h, k)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = head.pairwise_loss(batch, bootstrap=bootstrap, generator=gen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    s = head(batch).scores
    accuracy = (s[:, :b] > s[:, b:]).float().mean(1)
    assert torch.all(accuracy > 0.9), accuracy
    assert not torch.allclose(head.weight[0], head.weight[1]), "members stay distinct"


# ---- K reward models ----------------------------------------------------------------------------------


def _tiny_reward_models(k):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                                   max_position_embeddings=32)
    models = []
    for seed in range(k):
        torch.manual_seed(100 + seed)
        models.append(transformers.LlamaForSequenceClassification(cfg).eval())
    return models


def test_reward_ensemble_with_transformers_models():
    models = _tiny_reward_models(3)
    ens = prefkern.RewardEnsemble(models, method="uwo", lam=0.5)
    assert ens.num_members == 3 and len(list(ens.parameters())) > 0
    ids = torch.randint(1, 50, (6, 7))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[4, 2:] = 0
    ids[mask == 0] = 0  # right padding with the pad token
    with torch.no_grad():
        out = ens(input_ids=ids, attention_mask=mask)
        per = [m(input_ids=ids, attention_mask=mask).logits[:, 0] for m in models]
    stacked = torch.stack(per)
    torch.testing.assert_close(out.scores, stacked)
    for got, want in zip(out, truth_reduce(stacked, "uwo", 0.5)):
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    assert len({round(float(p[0]), 6) for p in per}) == 3, "differently seeded members disagree"
    grouped = ens(input_ids=ids, attention_mask=mask, group_size=3, method="wco")
    assert grouped.combined.shape == (2, 3) and grouped.scores.shape == (3, 2, 3)
    torch.testing.assert_close(grouped.combined, stacked.min(0).values.reshape(2, 3))


def test_reward_ensemble_with_callables_and_errors():
    ens = prefkern.RewardEnsemble([lambda x: x.sum(-1), lambda x: x.mean(-1, keepdim=True), lambda x: x[:, 0]],
                                  method="mean", normalize=([0.0, 0.0, 1.0], [1.0, 2.0, 1.0]))
    x = torch.randn(5, 4)
    out = ens(x)
    stacked = torch.stack([x.sum(-1), x.mean(-1), x[:, 0]])
    torch.testing.assert_close(out.scores, stacked)
    torch.testing.assert_close(out.combined, ((stacked - torch.tensor([[0.0], [0.0], [1.0]])) / torch.tensor([[1.0], [2.0], [1.0]])).mean(0))
    with pytest.raises(ValueError, match=r"reward model 1 returned scores of shape \(4,\); expected \[B\] or \[B, 1\] with B = 5"):
        prefkern.RewardEnsemble([lambda x: x[:, 0], lambda x: x[:4, 0]])(x)
    with pytest.raises(ValueError, match=r"reward model 0 returned scores of shape \(5, 4\)"):
        prefkern.RewardEnsemble([lambda x: x])(x)
    with pytest.raises(ValueError, match="at least one reward model"):
        prefkern.RewardEnsemble([])
    with pytest.raises(TypeError, match="models\\[1\\] is not callable"):
        prefkern.RewardEnsemble([lambda x: x, 3])


# ---- compile, 64-bit offsets ---------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    head = make_head(24, 4, method="uwo")
    hidden = torch.randn(6, 3, 24)

    def loss(x):
        out = head(x)
        return (out.combined * 2 + out.var).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out_c = compiled(x1)
    out_c.backward()
    wg = head.weight.grad.clone()
    head.weight.grad = None
    out_e = loss(x2)
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(wg, head.weight.grad)


def test_more_than_2_pow_31_elements_native():
    """64-bit offsets: the scored token of row 1 sits past element 2^31 of a lazily zeroed buffer."""
    b, t, h = 2, 2**20 + 1, 1024
    assert b * t * h > 2**31
    try:
        hidden = torch.zeros(b, t, h, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4.3 GB of address space")
    hidden[1, t - 1] = 1.0
    hidden[0, 5] = 2.0
    head = make_head(h, 2, dtype=torch.bfloat16, backend="native")
    with torch.no_grad():
        head.bias.zero_()
    out = head(hidden, lengths=torch.tensor([6, t]))
    w = head.weight.float()
    torch.testing.assert_close(out.scores[:, 1], w.sum(1), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.scores[:, 0], 2 * w.sum(1), atol=1e-3, rtol=1e-4)
