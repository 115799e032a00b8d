"""Argument checks shared by the public ops: clear TypeError/ValueError naming the argument."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(name: str, x: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_index(name: str, x: torch.Tensor) -> None:
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {x.dtype}")


def check_ndim(name: str, x: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_positive_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, *, kernels_guard: bool = False) -> None:
    """ValueError unless every label is in ``[0, vocab)`` or equals ``ignore_index`` (one host sync).

    ``kernels_guard``: the caller's kernels write NaN for an out-of-range label instead of reading out of
    bounds; the check is then skipped during CUDA graph capture, where a host sync is not allowed.
    """
    if kernels_guard and labels.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"labels[{', '.join(map(str, where))}] = {int(labels[where])}"
        )
