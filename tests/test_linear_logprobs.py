"""prefkern.linear_logprobs (hidden states + lm-head) against the materialised float64 reference."""

import pytest
import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status
from tolerance import assert_within_torch_error

CPU = torch.device("cpu")
BACKENDS = [b for b in ("native", "triton") if backend_status(b, CPU)[0]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(n, h, v, dtype, bias=True, ignore_every=4):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5 * 2).to(dtype)
    b = (torch.randn(v) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,))
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, g):
    params = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(*params, labels)
    out.backward(g.to(out.dtype))
    return out.detach(), [None if p is None else p.grad for p in params]


@pytest.mark.parametrize("backend,deterministic", [(b, True) for b in BACKENDS] + [("triton", False)] * ("triton" in BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,v,bias", [(47, 31, 123, True), (16, 64, 300, False), (1, 8, 5, True)])
def test_values_and_gradients_vs_float64(backend, deterministic, dtype, n, h, v, bias):
    hidden, weight, b, labels = make(n, h, v, dtype, bias)
    g = torch.randn(n)
    ours, ours_g = run(lambda x, w, bb, y: prefkern.linear_logprobs(x, w, y, bb, backend=backend, chunk_rows=10,
                                                                     deterministic=deterministic),
                       hidden, weight, b, labels, g)
    ref, ref_g = run(lambda x, w, bb, y: reference.linear_logprobs(x, w, y, bb, compute_dtype=torch.float64),
                     hidden.double(), weight.double(), None if b is None else b.double(), labels, g.double())
    tor, tor_g = run(lambda x, w, bb, y: reference.linear_logprobs(x, w, y, bb, compute_dtype=dtype),
                     hidden, weight, b, labels, g)
    assert ours.dtype == torch.float32
    assert_within_torch_error(ours, tor, ref, dtype, "logp")
    for name, a, r, t in zip(("d_hidden", "d_weight", "d_bias"), ours_g, ref_g, tor_g):
        if r is None:
            continue
        assert a.dtype == dtype, name
        assert_within_torch_error(a, t, r, dtype, name)


def test_triton_tile_backward_matches_chunked_backward():
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    hidden, weight, b, labels = make(40, 24, 77, torch.float32)
    g = torch.randn(40)
    tiles = run(lambda x, w, bb, y: prefkern.linear_logprobs(x, w, y, bb, backend="triton", deterministic=False),
                hidden, weight, b, labels, g)
    chunks = run(lambda x, w, bb, y: prefkern.linear_logprobs(x, w, y, bb, backend="triton", deterministic=True,
                                                               chunk_rows=16), hidden, weight, b, labels, g)
    torch.testing.assert_close(tiles[0], chunks[0], atol=1e-5, rtol=1e-5)
    for a, c in zip(tiles[1], chunks[1]):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_shift_and_batched_shape(backend):
    bsz, t, h, v = 3, 11, 16, 29
    hidden = torch.randn(bsz, t, h)
    weight = torch.randn(v, h) * 0.3
    ids = torch.randint(0, v, (bsz, t))
    ids[:, :4] = -100
    out = prefkern.linear_logprobs(hidden, weight, ids, shift=1, backend=backend)
    assert out.shape == (bsz, t)
    manual = reference.linear_logprobs(hidden[:, :-1].reshape(-1, h), weight, ids[:, 1:].reshape(-1)).reshape(bsz, t - 1)
    torch.testing.assert_close(out[:, :-1], manual, atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_reference_pass(backend):
    hidden, weight, b, labels = make(20, 12, 50, torch.float32)
    x = hidden.clone().requires_grad_()
    out = prefkern.linear_logprobs(x, weight, labels, b, backend=backend)
    out.sum().backward()
    assert weight.grad is None and x.grad is not None
    expect = run(lambda xx, w, bb, y: reference.linear_logprobs(xx, w, y, bb, compute_dtype=torch.float64),
                 hidden.double(), weight.double(), b.double(), labels, torch.ones(20, dtype=torch.float64))[1][0]
    torch.testing.assert_close(x.grad, expect.float(), atol=1e-5, rtol=1e-4)
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        ref_pass = prefkern.linear_logprobs(hidden, w, labels, b, backend=backend)
    assert ref_pass.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_fully_masked_and_empty(backend):
    hidden, weight, b, labels = make(9, 8, 21, torch.float32)
    labels[:] = -100
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = prefkern.linear_logprobs(x, w, labels, backend=backend)
    assert torch.equal(out, torch.zeros(9))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    empty = prefkern.linear_logprobs(torch.randn(0, 8), weight, torch.zeros(0, dtype=torch.long), backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    big = torch.randn(30, 40)
    bias = torch.randn(66)[::2]  # stride 2
    hidden = big[::2, 5:29]  # [15, 24], row stride 80
    weight_t = torch.randn(24, 33)
    weight = weight_t.t()  # [33, 24], column stride 33
    labels = torch.randint(0, 33, (15,))
    out = prefkern.linear_logprobs(hidden, weight, labels, bias, backend=backend)
    torch.testing.assert_close(out, reference.linear_logprobs(hidden, weight, labels, bias), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    hidden, weight, b, labels = make(4, 8, 10, torch.float32)
    with pytest.raises(TypeError, match="float64 runs on its own"):
        prefkern.linear_logprobs(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="weight must have dtype in"):
        prefkern.linear_logprobs(hidden, weight.to(torch.int32), labels)
    with pytest.raises(ValueError, match=r"hidden must have shape \[..., H\] with H = 8"):
        prefkern.linear_logprobs(hidden[:, :5], weight, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        prefkern.linear_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match=r"bias must have shape \[V\] = \[10\]"):
        prefkern.linear_logprobs(hidden, weight, labels, b[:4])
    with pytest.raises(ValueError, match="labels must lie in"):
        prefkern.linear_logprobs(hidden, weight, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="needs the loss"):
        prefkern.linear_logprobs(hidden, weight, labels, mode="eager")
    with pytest.raises(ValueError, match="shift must be an int >= 0"):
        prefkern.linear_logprobs(hidden, weight, labels, shift=-1)


def test_gradcheck_float64_reference_path():
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 6, -100, 3, 3])
    assert torch.autograd.gradcheck(lambda x, w, b: prefkern.linear_logprobs(x, w, labels, b), (hidden, weight, bias))


def test_torch_compile_fullgraph():
    hidden, weight, b, labels = make(12, 16, 40, torch.float32)

    def f(x, w):
        return prefkern.linear_logprobs(x, w, labels).sum()

    x1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    x2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out_c = torch.compile(f, fullgraph=True)(x1, w1)
    out_e = f(x2, w2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_more_than_2_pow_31_elements_native():
    """64-bit offsets: the only scored position sits past element 2^31 of the hidden states; only scored
    rows are read (gathered before the GEMM), so the untouched 4.3 GB stay address space."""
    b, t, h, v = 2, 2**20 + 8, 1024, 300
    assert b * t * h > 2**31
    try:
        hidden = torch.empty(b, t, h, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4.3 GB of address space")
    g = torch.Generator().manual_seed(0)
    row = torch.randn(h, generator=g).to(torch.bfloat16)
    hidden[1, t - 1] = row
    weight = (torch.randn(v, h, generator=g) * 0.05).to(torch.bfloat16).requires_grad_()
    labels = torch.full((b, t), -100)
    labels[1, t - 1] = 17
    out = prefkern.linear_logprobs(hidden, weight, labels, backend="native")
    want = reference.logprobs(row.float()[None] @ weight.detach().float().t(), torch.tensor([17]))
    assert out[0].abs().max() == 0 and out[1, : t - 1].abs().max() == 0
    torch.testing.assert_close(out[1, t - 1], want[0], atol=1e-4, rtol=1e-4)
    out.sum().backward()
    logits = row.float()[None] @ weight.detach().float().t()
    p = torch.softmax(logits, -1)[0]
    onehot = torch.zeros(v)
    onehot[17] = 1
    torch.testing.assert_close(weight.grad.float(), ((onehot - p)[:, None] * row.float()[None]), atol=1e-3, rtol=1e-2)
