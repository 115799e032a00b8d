"""GPU-only checks (marked ``gpu``; skipped without CUDA, run by benchmarks/gpu_check.sh)."""

import pytest
import torch

import prefkern
from prefkern import reference
from tolerance import assert_within_torch_error

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v", [(1, 7), (257, 32000), (64, 128256), (33, 50257)])
def test_logprobs_gpu(backend, dtype, n, v):
    logits = (torch.randn(n, v, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::5] = -100
    logits[:, :3] = -float("inf")  # masked entries first in the row (online max starts at -inf)
    labels = torch.where(labels == -100, labels, labels.clamp(min=3))
    ref64 = reference.logprobs(logits, labels, compute_dtype=torch.float64)
    torch_d = reference.logprobs(logits, labels, compute_dtype=dtype)
    ours = prefkern.logprobs(logits, labels, backend=backend)
    assert_within_torch_error(ours, torch_d, ref64, dtype, "logp")
    g = torch.randn(n, device="cuda")
    x = logits.clone().requires_grad_()
    prefkern.logprobs(x, labels, backend=backend).backward(g)
    x64 = logits.double().requires_grad_()
    reference.logprobs(x64, labels, compute_dtype=torch.float64).backward(g.double())
    xd = logits.clone().requires_grad_()
    reference.logprobs(xd, labels, compute_dtype=dtype).backward(g.to(dtype))
    assert_within_torch_error(x.grad, xd.grad, x64.grad, dtype, "grad")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_logprobs_captures_in_a_cuda_graph(backend):
    """No host sync inside: the op captures; an out-of-range label, unchecked there, gives NaN."""
    logits = torch.randn(64, 32000, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 32000, (64,), device="cuda")
    prefkern.logprobs(logits, labels, backend=backend)  # warm-up (JIT, allocator)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = prefkern.logprobs(logits, labels, backend=backend)
    labels[5] = 32000
    graph.replay()
    torch.cuda.synchronize()
    ok = torch.arange(64, device="cuda") != 5
    want = reference.logprobs(logits, labels.clamp(max=31999), compute_dtype=torch.float64)
    assert torch.isnan(out[5])
    torch.testing.assert_close(out[ok].double(), want[ok], atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="labels must lie in"):
        prefkern.logprobs(logits, labels, backend=backend)  # outside capture the check still runs


def test_linear_logprobs_triton_forward_captures_in_a_cuda_graph():
    """The Triton tile forward (a reference pass under no_grad) captures: no row selection, no range check."""
    hidden = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, 1000, (2, 64), device="cuda")
    labels[:, :10] = -100
    with torch.no_grad():
        want = prefkern.linear_logprobs(hidden, weight, labels, backend="triton")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = prefkern.linear_logprobs(hidden, weight, labels, backend="triton")
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-3)
    assert (out[:, :10] == 0).all()
