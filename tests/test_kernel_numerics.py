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
    logp, lse = torch.empty(2), torch.empty(2)
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
        logp, lse = torch.empty(1), torch.empty(1)
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
