"""Small helpers the op modules share to hand tensors to the native and Triton launchers."""

from __future__ import annotations

import torch

from .._native_loader import native

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def cuda_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def native_module():
    mod = native()
    if mod is None:  # resolve_backend has already checked; this guards direct misuse
        raise RuntimeError("prefkern._native is not available")
    return mod


def triton_kernels(name: str):
    """Imports ``prefkern.kernels.<name>`` lazily so that CPU-only installs never import triton."""
    import importlib

    return importlib.import_module(f"prefkern.kernels.{name}")
