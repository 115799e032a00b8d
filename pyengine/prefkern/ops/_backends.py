"""Small helpers the op modules share to hand tensors to the native and Triton launchers."""

from __future__ import annotations

import contextlib

import torch

from .._native_loader import native

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def device_of(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device for a launch (Triton and the CUDA C++ kernels launch on
    the current device and stream); a no-op for CPU tensors."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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
