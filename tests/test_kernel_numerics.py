"""Numerics of the kernels themselves (native C++, Triton under the interpreter), against float64 truth
written here: dtype codes, log-prob precision at large logits, NaN propagation, the tile backward on
ignored rows."""

import math

import pytest
import torch

import prefkern
from prefkern.dispatch import backend_status

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
