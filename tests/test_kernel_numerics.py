"""Numerics of the kernels themselves (native C++, Triton under the interpreter), against float64 truth
written here: dtype codes, log-prob precision at large logits, NaN propagation, the tile backward on
ignored rows, gradient precision at large logits."""

import math

import pytest
import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status
from prefkern.losses import preference_batch
from prefkern.ops.linear_logprobs import linear_logprobs_fwd
from tolerance import assert_within_torch_error

CPU = torch.device("cpu")
EPS32 = 2.0**-24  # unit roundoff of float32


def cpu_backends():
    return [b for b in ("native", "triton") if backend_status(b, CPU)[0]]


def native():
    if not backend_status("native", CPU)[0]:
        pytest.skip("prefkern._native is not built")
    import prefkern._native as mod

    return mod


def truth64(z, labels):
    """Float64 log-softmax at the labels, from logits that are exact in float32 (labels all valid)."""
    z = z.double()
    m = z.max(dim=-1, keepdim=True).values
    log_s = (z - m).exp().sum(-1).log()
    return (z.gather(-1, labels.unsqueeze(-1)) - m).squeeze(-1) - log_s


# ---- 1. unknown dtype codes ------------------------------------------------------------------------


def test_native_cpu_rejects_unknown_dtype_code():
    mod = native()
    logits = torch.zeros(2, 8)
    labels = torch.zeros(2, dtype=torch.int64)
    logp, lse = torch.empty(2), torch.empty(2, 2)
    with pytest.raises(ValueError, match="dtype code 7"):
        mod.logprobs_forward_cpu(logits.data_ptr(), 7, 2, 8, 8, labels.data_ptr(), -100, 1.0, logp.data_ptr(),
                                 lse.data_ptr())
    grad, out = torch.ones(2), torch.empty(2, 8)
    with pytest.raises(ValueError, match="dtype code -1"):
        mod.logprobs_backward_cpu(grad.data_ptr(), logits.data_ptr(), -1, 2, 8, 8, labels.data_ptr(), -100, 1.0,
                                  lse.data_ptr(), out.data_ptr(), 8)
    one_f, one_i = torch.ones(2), torch.zeros(2, dtype=torch.int64)
    tokens = torch.empty(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype code 3"):
        mod.sample_cpu(logits.data_ptr(), 3, 2, 8, 8, one_i.data_ptr(), one_f.data_ptr(), one_i.data_ptr(),
                       one_f.data_ptr(), torch.zeros(2).data_ptr(), one_i.data_ptr(), one_i.data_ptr(),
                       tokens.data_ptr(), logp.data_ptr())


def test_native_cpu_accepts_the_three_dtype_codes():
    mod = native()
    for code, dtype in ((0, torch.float32), (1, torch.bfloat16), (2, torch.float16)):
        logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=dtype)
        labels = torch.tensor([0])
        logp, lse = torch.empty(1), torch.empty(1, 2)
        mod.logprobs_forward_cpu(logits.data_ptr(), code, 1, 3, 3, labels.data_ptr(), -100, 1.0, logp.data_ptr(),
                                 lse.data_ptr())
        assert logp.item() == pytest.approx(truth64(logits.float(), labels).item(), abs=1e-6)


def test_native_cuda_entry_points_check_the_dtype_code_on_the_host():
    mod = native()
    if not mod.has_cuda():
        pytest.skip("built without the CUDA kernels")
    # n = 0: a valid code returns before touching the device, so this runs without a GPU
    with pytest.raises(ValueError, match="dtype code 7"):
        mod.logprobs_forward_cuda(0, 7, 0, 8, 8, 0, -100, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="dtype code 9"):
        mod.logprobs_backward_cuda(0, 0, 9, 0, 8, 8, 0, -100, 1.0, 0, 0, 8, 0)
    with pytest.raises(ValueError, match="dtype code 5"):
        mod.sample_cuda(0, 5, 0, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    mod.logprobs_forward_cuda(0, 2, 0, 8, 8, 0, -100, 1.0, 0, 0, 0)


# ---- 2. log-prob precision: (z_y - m) - log s ------------------------------------------------------


def offset_logits(n, v, offset, seed=0):
    """Multiples of 1/8 within +-8 plus an offset: exact in float32 up to offsets of 2^20."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 65, (n, v), generator=g).float() / 8
    return base + torch.tensor(offset, dtype=torch.float32)


def fp32_bound(ref, v):
    # a sum of v terms in [0, 1] plus one log and two subtractions: a few ulp of |logp| and of log s,
    # independent of |lse| (forming z_y - lse would err by up to half an ulp of |lse|)
    return EPS32 * (4 * ref.abs() + 4 + math.log2(v)) + 1e-12


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
def test_logprobs_do_not_lose_the_offset(backend, dtype, offset):
    # the truth starts from the stored values, exact in float64: whatever the storage dtype, all that
    # is measured is the kernel's own float32 arithmetic, so one bound serves the three dtypes
    n, v = 12, 700
    z = offset_logits(n, v, offset).to(dtype)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    ours = prefkern.logprobs(z, labels, backend=backend).double()
    ref = truth64(z, labels)
    err = (ours - ref).abs()
    assert torch.all(err <= fp32_bound(ref, v)), f"max error {err.max().item():.3e} at offset {offset}"


@pytest.mark.parametrize("backend", cpu_backends())
def test_confident_token_keeps_its_tiny_log_prob(backend):
    ours = prefkern.logprobs(torch.tensor([[16.0, 0.0]]), torch.tensor([0]), backend=backend).item()
    ref = -math.log1p(math.exp(-16.0))  # -1.1254e-7
    # the only rounding left is that of s = 1 + e^-16 in float32: at most half an ulp of 1
    assert ours != 0.0
    assert abs(ours - ref) <= EPS32 + 4 * EPS32 * abs(ref)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_confident_tokens_at_offsets(backend, offset, temperature):
    # label logit d above the rest, e^-d between ~2e-7 and ~5e-4: lse = m + tiny gets rounded at m's ulp
    gaps = torch.tensor([8.0, 9.5, 11.0, 12.5, 14.0, 15.25])
    v = 33
    x = torch.zeros(len(gaps), v)
    x[:, 1:] = -gaps.unsqueeze(1) - torch.arange(v - 1).float() / 4
    x += offset
    labels = torch.zeros(len(gaps), dtype=torch.int64)
    ours = prefkern.logprobs(x, labels, temperature=temperature, backend=backend).double()
    # the kernels scale by the float32 1/T and round each z once; the truth starts from those z, so that
    # a label logit formed otherwise (say, fused into an FMA with "- m") shows up at large offsets
    z = x * torch.tensor(1.0 / temperature, dtype=torch.float32)
    ref = truth64(z, labels)
    err = (ours - ref).abs()
    assert torch.all(err <= fp32_bound(ref, v)), (ours.tolist(), ref.tolist())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
def test_linear_logprobs_do_not_lose_the_offset(backend, offset):
    # hidden and weight in multiples of 1/4 with small H: every logit is exact in float32, the offset
    # enters through the bias
    n, h, v = 9, 4, 100
    g = torch.Generator().manual_seed(2)
    hidden = torch.randint(-8, 9, (n, h), generator=g).float() / 4
    weight = torch.randint(-8, 9, (v, h), generator=g).float() / 4
    bias = torch.full((v,), offset)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    ours = prefkern.linear_logprobs(hidden, weight, labels, bias, backend=backend).double()
    z = hidden.double() @ weight.double().t() + offset
    keep = labels != -100
    ref = truth64(z[keep], labels[keep])
    assert ours[~keep].eq(0).all()
    err = (ours[keep] - ref).abs()
    assert torch.all(err <= fp32_bound(ref, v)), f"max error {err.max().item():.3e} at offset {offset}"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offset", [0.0, 1.0e4])
def test_sampling_logprob_keeps_the_offset(backend, offset):
    z = offset_logits(6, 300, offset, seed=3)
    z[:, 7] += 12.0  # a confident token, drawn almost surely
    for kwargs in ({}, {"top_k": 5}):
        tokens, lp = prefkern.sample(z, seed=5, return_logprobs=True, backend=backend, **kwargs)
        zf = z.double()
        if kwargs:
            kth = zf.topk(5, dim=-1).values[:, -1:]
            zf = torch.where(zf >= kth, zf, torch.full_like(zf, -math.inf))
        ref = truth64(zf, tokens)
        err = (lp.double() - ref).abs()
        assert torch.all(err <= EPS32 * (4 * ref.abs() + 4 + math.log2(300))), (kwargs, err.max().item())


# ---- 3. NaN logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_logit_makes_its_row_nan(backend, dtype):
    v = 5000  # more than one native block of 2048 and one Triton block of 4096
    z = torch.full((6, v), -math.inf)
    z[0, 100] = math.nan  # alone among -inf in its row
    z[1, 4500] = math.nan  # in the last block, the others all -inf ...
    z[1, 10] = 1.0  # ... while an earlier block holds the max
    z[2, :] = torch.linspace(-3, 3, v)
    z[2, 2047] = math.nan  # among finite values
    z[3, :] = 0.5  # a clean row: finite
    z[4, 0] = math.nan  # first element, rest -inf
    z[4, 1] = -2.0
    z[5, 3000] = 1.0
    z[5, 2100] = math.nan
    labels = torch.tensor([3, 10, 0, 7, 1, 3000])
    ours = prefkern.logprobs(z.to(dtype), labels, backend=backend)
    expected_nan = torch.tensor([True, True, True, False, True, True])
    assert torch.equal(torch.isnan(ours), expected_nan), ours.tolist()
    assert ours[3].item() == pytest.approx(-math.log(v), rel=1e-6)


# ---- 4. Triton tile backward: ignored rows -------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_tile_backward_ignored_row_with_huge_logits(bias):
    if "triton" not in cpu_backends():
        pytest.skip("triton is not importable")
    n, h, v = 10, 8, 40
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[4] = -100
    # the ignored row shares its token tile with the others; its logit for column 0 is far above 88.7,
    # where exp(z - 0) overflows (ignored rows carry lse = 0)
    hidden[4] = 40.0 * torch.sign(weight[0])
    assert (hidden[4] @ weight.t()).max() > 100
    upstream = torch.randn(n, generator=g)

    def grads(x, w, bb, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((bb,) if bb is not None else ())]
        out = prefkern.linear_logprobs(leaves[0], leaves[1], labels, leaves[2] if bb is not None else None, **kw)
        (out * upstream.to(out.dtype)).sum().backward()
        return out, [t.grad for t in leaves]

    out, tiles = grads(hidden, weight, b, backend="triton", deterministic=False)
    out64, ref = grads(hidden.double(), weight.double(), b.double() if bias else None, backend="torch")
    assert out[4].item() == 0.0
    for name, ours, r in zip(("dX", "dW", "db"), tiles, ref):
        assert torch.isfinite(ours).all(), f"{name} has non-finite entries"
        torch.testing.assert_close(ours.double(), r, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.all(tiles[0][4] == 0)


# ---- 5. gradient precision: the backward's softmax from (m, log s), never from an fp32 lse -----------


def grad_backends():
    return cpu_backends() + ["torch"]


def softmax_grad_bound(z64, g):
    """Per entry, for logits exact in float32 at any offset: the rounding of (z - m) - log s, of log s, of the
    exp and of g * (onehot - p) in float32 -- a few ulp of |z - m| + log s relative to p, nothing of |lse|."""
    m = z64.max(dim=-1, keepdim=True).values
    log_s = (z64 - m).exp().sum(-1, keepdim=True).log()
    p = ((z64 - m) - log_s).exp()
    return EPS32 * (8 * p * ((z64 - m).abs() + log_s + 4) + 2) * g.abs().unsqueeze(-1)


def logit_grads(fn, logits, g):
    x = logits.detach().clone().requires_grad_()
    fn(x).backward(g.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    return x.grad


@pytest.mark.parametrize("backend", grad_backends())
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
@pytest.mark.parametrize("temperature", [1.0, 0.5])  # 1/T a power of two: z = x / T exact at every offset
def test_logprobs_gradient_does_not_lose_the_offset(backend, offset, temperature):
    n, v = 12, 700
    x = offset_logits(n, v, offset, seed=5)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(6))
    labels[4] = -100
    g = torch.randn(n, generator=torch.Generator().manual_seed(7))
    ours = logit_grads(lambda t: prefkern.logprobs(t, labels, temperature=temperature, backend=backend), x, g)
    ref = logit_grads(lambda t: torch.log_softmax(t / temperature, -1).gather(-1, labels.clamp(min=0)[:, None])
                      .squeeze(-1).masked_fill(labels == -100, 0.0), x.double(), g.double())
    assert ours[4].eq(0).all()
    err = (ours.double() - ref).abs()
    bound = softmax_grad_bound(x.double() / temperature, g) / temperature
    assert torch.all(err <= bound), f"max error / bound {(err / bound).max().item():.1f} at offset {offset}"


@pytest.mark.parametrize("backend", grad_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
def test_logprobs_gradient_at_offsets_low_precision(backend, dtype, offset):
    n, v = 12, 700
    x = offset_logits(n, v, offset, seed=5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(6))
    g = torch.randn(n, generator=torch.Generator().manual_seed(7))
    ours = logit_grads(lambda t: prefkern.logprobs(t, labels, backend=backend), x, g)
    ref = logit_grads(lambda t: torch.log_softmax(t, -1).gather(-1, labels[:, None]).squeeze(-1),
                      x.double(), g.double())
    tor = logit_grads(lambda t: torch.log_softmax(t, -1).gather(-1, labels[:, None]).squeeze(-1), x, g)
    assert ours.dtype == dtype
    assert_within_torch_error(ours, tor, ref, dtype, f"d logits at offset {offset}")


@pytest.mark.parametrize("backend", grad_backends())
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
def test_confident_token_gradients_at_offsets(backend, offset):
    # label logit d above the rest: lse = m + e^-d, whose fp32 rounding once gave every other p an error of
    # up to half an ulp of |m| (relative) and the label p = 1 exactly
    gaps = torch.tensor([8.0, 9.5, 11.0, 12.5, 14.0, 15.25])
    v = 33
    x = torch.zeros(len(gaps), v)
    x[:, 1:] = -gaps.unsqueeze(1) - torch.arange(v - 1).float() / 4
    x += offset
    labels = torch.zeros(len(gaps), dtype=torch.int64)
    g = torch.linspace(-2.0, 3.5, len(gaps))
    ours = logit_grads(lambda t: prefkern.logprobs(t, labels, backend=backend), x, g)
    ref = logit_grads(lambda t: torch.log_softmax(t, -1)[:, 0], x.double(), g.double())
    err = (ours.double() - ref).abs()
    bound = softmax_grad_bound(x.double(), g)
    assert torch.all(err <= bound), f"max error / bound {(err / bound).max().item():.1f} at offset {offset}"
    # the label's own gradient g (1 - p_y) = g (1 - e^-(log s)): not rounded to 0
    assert torch.all(ours[:, 0] != 0)


def exact_head(n, h, v, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-8, 9, (n, h), generator=g).float() / 4
    weight = torch.randint(-8, 9, (v, h), generator=g).float() / 4
    return hidden, weight, g


def linear_runs():
    runs = [(b, True) for b in cpu_backends()] + [("triton", False)] * ("triton" in cpu_backends())
    return runs + [("torch-rows", True), ("torch", True)]


def linear_grads(backend, deterministic, hidden, weight, bias, labels, g):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    if backend == "torch-rows":  # the chunked paths with the torch row ops (what "auto" falls back to)
        out = linear_logprobs_fwd(*leaves, labels, -100, "torch", 5, True, 1.0, 1.0, 0.0, False)[0]
    else:
        out = prefkern.linear_logprobs(leaves[0], leaves[1], labels, leaves[2], backend=backend, chunk_rows=5,
                                       deterministic=deterministic)
    out.backward(g.to(out.dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend,deterministic", linear_runs())
@pytest.mark.parametrize("offset", [0.0, 300.0, 1.0e4])
def test_linear_logprobs_gradient_does_not_lose_the_offset(backend, deterministic, offset):
    # every logit exact in float32 (the offset enters through the bias); the GEMMs of dX and dW on top of
    # the logit gradient add sums of H or N products, far below the bound
    n, h, v = 13, 4, 100
    hidden, weight, gen = exact_head(n, h, v, seed=8)
    bias = torch.full((v,), offset) + torch.randint(-8, 9, (v,), generator=gen).float() / 8
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[3] = -100
    g = torch.randn(n, generator=gen)
    ours = linear_grads(backend, deterministic, hidden, weight, bias, labels, g)
    ref = linear_grads("torch", True, hidden.double(), weight.double(), bias.double(), labels, g.double())
    assert torch.all(ours[0][3] == 0)
    for name, a, r in zip(("dX", "dW", "db"), ours, ref):
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-5 * r.abs().max().item(), f"{name}: max error {err:.3e} of max {r.abs().max().item():.3e}"


@pytest.mark.parametrize("backend,deterministic", linear_runs())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_logprobs_gradient_at_an_offset_low_precision(backend, deterministic, dtype):
    n, h, v = 13, 4, 100
    hidden, weight, gen = exact_head(n, h, v, seed=8)
    bias = torch.full((v,), 1.0e4) + torch.randint(-8, 9, (v,), generator=gen).float()
    labels = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    x, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    ours = linear_grads(backend, deterministic, x, w, b, labels, g)
    ref = linear_grads("torch", True, x.double(), w.double(), b.double(), labels, g.double())
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    reference.linear_logprobs(*leaves[:2], labels, leaves[2], compute_dtype=dtype).backward(g.to(dtype))
    for name, a, r, t in zip(("dX", "dW", "db"), ours, ref, [t.grad for t in leaves]):
        assert a.dtype == dtype
        assert_within_torch_error(a, t, r, dtype, name)


@pytest.mark.parametrize("through", ["loss", "token_logps"])
def test_eager_dpo_gradient_at_a_large_offset(through):
    # the eager pass forms the logit gradient inside forward (its row kernels' own state) and saves the
    # state for a gradient that reaches the token log-probs later (_EagerTokenLogps): both at |z| ~ 1e4
    b_, t, h, v = 2, 9, 4, 60
    hidden, weight, gen = exact_head(2 * b_ * t, h, v, seed=9)
    hidden = hidden.view(2 * b_, t, h)
    bias = torch.full((v,), 1.0e4) + torch.randint(-8, 9, (v,), generator=gen).float() / 8
    labels = torch.randint(0, v, (2 * b_, t), generator=gen)
    labels[:, :2] = -100
    ref_logps = torch.tensor([-30.0, -28.0, -31.0, -27.5])
    weights = torch.tensor([0.7, -1.3])

    def value(out):
        return out.loss if through == "loss" else (out.losses * weights.to(out.losses.dtype)).sum()

    leaves = [p.detach().clone().requires_grad_() for p in (hidden, weight, bias)]
    out = prefkern.FusedLinearPreferenceLoss("sigmoid", mode="eager")(*leaves[:2], labels, leaves[2],
                                                                     ref_logps=ref_logps)
    value(out).backward()
    ours = [p.grad for p in leaves]

    leaves64 = [p.detach().double().requires_grad_() for p in (hidden, weight, bias)]
    tok = torch.log_softmax(leaves64[0] @ leaves64[1].t() + leaves64[2], -1)
    mask = labels != -100
    tok = tok.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    ref_mask = torch.ones(2 * b_, 1, dtype=torch.bool)  # one per-sequence reference log-prob per row
    batch = preference_batch(tok, mask, ref_logps.double().unsqueeze(1), ref_mask=ref_mask)
    exact = prefkern.preference_loss("sigmoid", batch=batch)
    value(exact).backward()
    for name, a, r in zip(("dX", "dW", "db"), ours, (p.grad for p in leaves64)):
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-5 * r.abs().max().item(), f"{name}: max error {err:.3e} of max {r.abs().max().item():.3e}"
