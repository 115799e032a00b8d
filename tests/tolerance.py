"""The tolerance rule of DESIGN.md section 9 and a verbose comparison helper.

A kernel in dtype d passes when ``|kernel - ref64| <= 2 * |torch_d - ref64| + atol_d`` elementwise,
where ``torch_d`` is plain PyTorch computing in dtype d: its own error sets the bar.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def assert_within_torch_error(
    kernel: torch.Tensor, torch_d: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, name: str = "value"
) -> None:
    kernel, torch_d, ref64 = kernel.double(), torch_d.double(), ref64.double()
    assert kernel.shape == ref64.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref64.shape)}"
    nan_k, nan_r = torch.isnan(kernel), torch.isnan(ref64)
    assert torch.equal(nan_k, nan_r), f"{name}: NaN at {nan_k.nonzero()[:5].tolist()} vs reference {nan_r.nonzero()[:5].tolist()}"
    finite = ~nan_r
    err = (kernel - ref64).abs()[finite]
    bound = (2 * (torch_d - ref64).abs() + ATOL[dtype])[finite]
    bad = err > bound
    if bool(bad.any()):
        idx = bad.nonzero()[:5].flatten().tolist()
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {err.numel()} entries exceed 2*|torch-ref|+{ATOL[dtype]}; "
            f"max error {err.max().item():.3e}; first flat indices {idx}: "
            f"kernel {kernel[finite][idx].tolist()} ref {ref64[finite][idx].tolist()}"
        )
