"""Input checks shared by every loss: types, shapes, devices, dtypes, finiteness.

Every public loss validates its tensors here first so that bad input raises a
``TypeError``/``ValueError`` naming the argument instead of producing a silent NaN.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 accumulate in fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    return x


def check_finite(x: torch.Tensor, name: str, where: Optional[torch.Tensor] = None) -> None:
    if x.device.type == "meta":
        return
    vals = x.detach()
    if where is not None:
        vals = vals[where]
    if torch.isnan(vals).any():
        raise ValueError(f"{name} contains NaN")
    if not torch.isfinite(vals).all():
        raise ValueError(f"{name} contains +-inf; log-probs passed to a loss must be finite")


def check_same_device(named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    if not present:
        return
    n0, t0 = present[0]
    for n, t in present[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on device {t.device} but {n0} is on {t0.device}; all inputs must share a device")


def sequence_inputs(
    named: Sequence[tuple[str, Optional[torch.Tensor]]],
    *,
    dtype: Optional[torch.dtype] = None,
) -> list[Optional[torch.Tensor]]:
    """Validate per-sequence tensors (all ``[B]``, B >= 1, finite) and upcast them.

    Returns the tensors in the same order, converted to a common compute dtype
    (float64 if any is float64, else float32). ``None`` entries pass through.
    """
    present = [(n, check_tensor(t, n)) for n, t in named if t is not None]
    check_same_device(present)
    shape = None
    first = None
    for n, t in present:
        if t.dim() != 1:
            raise ValueError(f"{n} must be a 1-D per-sequence tensor of shape [B], got shape {tuple(t.shape)}")
        if shape is None:
            shape, first = t.shape, n
        elif t.shape != shape:
            raise ValueError(f"{n} has shape {tuple(t.shape)} but {first} has shape {tuple(shape)}; expected the same [B]")
        check_finite(t, n)
    if shape is not None and shape[0] == 0:
        raise ValueError(f"{first} is empty (B=0); a loss needs at least one example")
    dt = dtype if dtype is not None else compute_dtype(*(t for _, t in present))
    return [None if t is None else check_tensor(t, n).to(dt) for n, t in named]


def lengths_input(x: object, name: str, like: torch.Tensor) -> torch.Tensor:
    """Validate completion lengths ``[B]`` (int or float, >= 0) and return them in ``like``'s dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(x).__name__}")
    if x.dim() != 1 or x.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} ([B]), got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on device {x.device} but the log-probs are on {like.device}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer or floating tensor, got {x.dtype}")
    if x.is_floating_point():
        check_finite(x, name)
    if x.device.type != "meta" and (x < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return x.detach().to(like.dtype)


def check_positive_lengths(lengths: torch.Tensor, name: str, loss: str) -> None:
    if lengths.device.type == "meta":
        return
    zero = (lengths <= 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"{name} is 0 at rows {zero}: {loss} divides by the completion length (the reference code "
            f"gives 0/0 = NaN); drop empty completions before calling the loss"
        )


def scalar_input(x: object, name: str, like: torch.Tensor) -> torch.Tensor:
    """A scalar (python number or 0-d / 1-element tensor) as a 0-d tensor of ``like``'s dtype/device."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-d tensor), got shape {tuple(x.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on device {x.device} but the log-probs are on {like.device}")
        check_finite(x, name)
        return x.reshape(()).to(like.dtype)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        t = torch.tensor(float(x), dtype=like.dtype, device=like.device)
        check_finite(t, name)
        return t
    raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")


def check_number(x: object, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    v = float(x)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v
