"""The one validation layer: every public op, loss, module and compat class checks its arguments here.

Every check takes the argument's name first, then the value, and raises ``TypeError`` (wrong kind or
dtype) or ``ValueError`` (wrong shape, range, device or value) with a message that names the argument
and says what was expected. Numbers are Python or NumPy scalars (never ``bool``); nothing here reads a
tensor's values back to the host except where the docstring says so.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


# ---- tensors: kind, dtype, shape, device -------------------------------------------------------------------


def check_tensor(name: str, x: object) -> torch.Tensor:
    """``x`` itself when it is a tensor; TypeError naming ``name`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(name: str, x: object) -> torch.Tensor:
    """A tensor of any floating dtype (the loss catalog computes in fp32, or fp64 for fp64 inputs)."""
    check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
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


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """ValueError unless every tensor given (None skipped) is on the first one's device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must share "
                             "a device")


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 accumulate in fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def float64_backend(name: str, x: torch.Tensor, backend: str) -> str:
    """The backend an op runs ``x`` on: float64 inputs run on the ``torch`` reference only (for gradcheck)."""
    if x.dtype != torch.float64:
        return backend
    if backend not in ("auto", "torch"):
        raise TypeError(f"float64 {name} run on the 'torch' backend only, not {backend!r}")
    return "torch"


def values_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read back here: not while tracing (fake / meta tensors, ``torch.compile``)
    nor during CUDA graph capture (a host sync is not allowed there). Checks that read values are skipped then;
    the kernels answer bad values with NaN (or token -1) instead of reading out of bounds."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_finite(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    """ValueError when ``x`` (or ``x[where]``) holds NaN or +-inf. Reads the values: one host sync (skipped
    where :func:`values_readable` says no)."""
    if not values_readable(x):
        return
    vals = x.detach()
    if where is not None:
        vals = vals[where]
    if torch.isnan(vals).any():
        raise ValueError(f"{name} contains NaN")
    if not torch.isfinite(vals).all():
        raise ValueError(f"{name} contains +-inf; log-probs passed to a loss must be finite")


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, *, kernels_guard: bool = False,
                          name: str = "labels") -> None:
    """ValueError unless every label is in ``[0, vocab)`` or equals ``ignore_index`` (one host sync).

    ``kernels_guard``: the caller's kernels write NaN for an out-of-range label instead of reading out of
    bounds; the check is then skipped during CUDA graph capture, where a host sync is not allowed.
    """
    if (kernels_guard and labels.is_cuda and torch.cuda.is_current_stream_capturing()) or not values_readable(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"{name}[{', '.join(map(str, where))}] = {int(labels[where])}"
        )


# ---- the lm-head triple every fused path takes ----------------------------------------------------------------


def check_lm_head(hidden: object, weight: object, labels: object, bias: object = None, *,
                  names: Sequence[str] = ("hidden", "weight", "labels", "bias"), hidden_shape: str = "[..., H]",
                  allow_float64: bool = True) -> None:
    """Kinds, dtypes, shapes and devices of ``(hidden, weight, labels, bias)`` before any GEMM.

    hidden ``hidden_shape`` floating (fp32/bf16/fp16, fp64 when ``allow_float64``); weight [V, H] with V > 0;
    labels int64/int32 with hidden's leading shape; bias None or [V]; all on one device. hidden, weight and bias
    may differ in float dtype (a mixed-precision model's bf16 hidden states with an fp32 head): the lm-head then
    runs in one dtype (:func:`prefkern.ops.lm_head_gemm.matched_operands`), but float64 is never mixed with
    another dtype. ``names`` are the caller's argument names (compat classes call them ``_input``, ``lin_weight``...).
    """
    nh, nw, nl, nb = names
    check_tensor(nh, hidden)
    check_tensor(nw, weight)
    check_tensor(nl, labels)
    floats = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_float(nh, hidden, floats)
    check_float(nw, weight, floats)
    check_index(nl, labels)
    if weight.dim() != 2:
        raise ValueError(f"{nw} must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{nh} must have shape {hidden_shape} with H = {weight.shape[1]} ({nw} is [V, H] = "
                         f"{list(weight.shape)}), got {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{nw} must have V > 0 rows, got {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{nl} must have shape {tuple(hidden.shape[:-1])} ({nh}'s leading dims), got "
                         f"{tuple(labels.shape)}")
    if bias is not None:
        check_tensor(nb, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{nb} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        check_float(nb, bias, floats)
    present = [(n, t.dtype) for n, t in ((nh, hidden), (nw, weight), (nb, bias)) if t is not None]
    if any(d == torch.float64 for _, d in present) and any(d != torch.float64 for _, d in present):
        raise TypeError(f"float64 runs on its own (the torch reference): {', '.join(f'{n} is {d}' for n, d in present)}")
    check_same_device(**{nh: hidden, nw: weight, nl: labels, nb: bias})


# ---- numbers and flags ------------------------------------------------------------------------------------------


def _is_real(value: object) -> bool:
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        return False
    return isinstance(value, numbers.Real) or (hasattr(value, "dtype") and getattr(value, "shape", None) == ()
                                               and getattr(value.dtype, "kind", "") in "fiu")


def check_number(name: str, value: object, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = False) -> float:
    """``value`` as a float: a Python or NumPy real number (not a bool), not NaN, within the bounds given."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if finite and v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
    return v


def check_positive_finite(name: str, value: object) -> float:
    """A finite number > 0 (temperatures, scales)."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (v > 0 and v != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def check_integer(name: str, value: object, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as an int: a Python or NumPy integer (not a bool), within the bounds given."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_ignore_index(value: object) -> int:
    """An int that fits the int64 labels it is compared with."""
    return check_integer("ignore_index", value, low=INT64_MIN, high=INT64_MAX)


# ---- per-sequence inputs of the loss catalog ------------------------------------------------------------------


def sequence_inputs(
    named: Sequence[tuple[str, Optional[torch.Tensor]]],
    *,
    dtype: Optional[torch.dtype] = None,
) -> list[Optional[torch.Tensor]]:
    """Validate per-sequence tensors (all ``[B]``, B >= 1, finite) and upcast them.

    Returns the tensors in the same order, converted to a common compute dtype
    (float64 if any is float64, else float32). ``None`` entries pass through.
    """
    present = [(n, check_floating(n, t)) for n, t in named if t is not None]
    check_same_device(**dict(present))
    shape = None
    first = None
    for n, t in present:
        if t.dim() != 1:
            raise ValueError(f"{n} must be a 1-D per-sequence tensor of shape [B], got shape {tuple(t.shape)}")
        if shape is None:
            shape, first = t.shape, n
        elif t.shape != shape:
            raise ValueError(f"{n} has shape {tuple(t.shape)} but {first} has shape {tuple(shape)}; expected the same [B]")
        check_finite(n, t)
    if shape is not None and shape[0] == 0:
        raise ValueError(f"{first} is empty (B=0); a loss needs at least one example")
    dt = dtype if dtype is not None else compute_dtype(*(t for _, t in present))
    return [None if t is None else t.to(dt) for _, t in named]


def lengths_input(name: str, x: object, like: torch.Tensor) -> torch.Tensor:
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
        check_finite(name, x)
    if values_readable(x) and (x < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return x.detach().to(like.dtype)


def check_positive_lengths(name: str, lengths: torch.Tensor, loss: str) -> None:
    if not values_readable(lengths):
        return
    zero = (lengths <= 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"{name} is 0 at rows {zero}: {loss} divides by the completion length (the reference code "
            f"gives 0/0 = NaN); drop empty completions before calling the loss"
        )


def scalar_input(name: str, x: object, like: torch.Tensor) -> torch.Tensor:
    """A scalar (Python/NumPy number or 0-d / 1-element tensor) as a 0-d tensor of ``like``'s dtype/device."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-d tensor), got shape {tuple(x.shape)}")
        if x.device != like.device:
            raise ValueError(f"{name} is on device {x.device} but the log-probs are on {like.device}")
        check_finite(name, x)
        return x.reshape(()).to(like.dtype)
    if _is_real(x):
        t = torch.tensor(float(x), dtype=like.dtype, device=like.device)
        check_finite(name, t)
        return t
    raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
