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
