"""Backend selection (DESIGN.md section 3).

``auto`` picks ``triton`` for CUDA tensors and ``native`` for CPU tensors; ``cuda`` names the CUDA C++
kernels; ``torch`` is the plain-PyTorch reference and always runs. A backend asked for by name that
cannot run raises; ``auto`` falls back to ``torch`` only with a one-time warning that says why.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from ._native_loader import native, native_error

BACKENDS = ("auto", "native", "triton", "cuda", "torch")
_warned: set = set()


def triton_interpreting() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import time
        return f"triton does not import: {exc}"
    return None


def backend_status(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run an op on ``device``, and a sentence saying why (or why not)."""
    if name == "torch":
        return True, "plain PyTorch reference"
    if name == "native":
        if device.type != "cpu":
            return False, "the native C++ kernels run on CPU tensors only"
        if native() is None:
            return False, native_error() or "prefkern._native is missing"
        return True, f"C++ kernels, {native().omp_threads()} OpenMP threads"
    if name == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        if device.type == "cuda":
            return True, "Triton JIT on the GPU"
        if device.type == "cpu" and triton_interpreting():
            return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for tests)"
        return False, "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "cuda":
        mod = native()
        if mod is None:
            return False, native_error() or "prefkern._native is missing"
        if not mod.has_cuda():
            return False, "prefkern was built without a CUDA compiler (PREFKERN_CUDA=OFF or no nvcc)"
        if device.type != "cuda":
            return False, "the CUDA C++ kernels need a CUDA tensor"
        return True, f"CUDA C++ kernels built for {mod.cuda_archs()}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def resolve_backend(requested: str, device: torch.device, op: str) -> str:
    """The concrete backend for ``op`` on ``device``: ``requested`` itself, or the choice ``auto`` makes.

    ``PREFKERN_BACKEND`` in the environment overrides ``auto`` (never an explicit name).
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, got {type(requested).__name__}")
    if requested == "auto":
        requested = os.environ.get("PREFKERN_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        ok, why = backend_status(requested, device)
        if not ok:
            raise RuntimeError(f"prefkern.{op}: backend {requested!r} cannot run on {device}: {why}")
        return requested
    preferred = _preferred(device)
    ok, why = backend_status(preferred, device)
    if ok:
        return preferred
    key = (op, preferred, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"prefkern.{op}: backend 'auto' fell back to the plain-PyTorch reference on {device.type} "
            f"because {preferred!r} cannot run: {why}",
            RuntimeWarning,
            stacklevel=3,
        )
    return "torch"


def info() -> Dict[str, Dict[str, str]]:
    """Which backends can run here, per device type, with the reason for each.

    Returns ``{device_type: {backend: "yes: ..." | "no: ..."}}`` for ``cpu`` and, when present, ``cuda``.
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    report: Dict[str, Dict[str, str]] = {}
    for dev in devices:
        row = {}
        for name in ("native", "triton", "cuda", "torch"):
            ok, why = backend_status(name, dev)
            row[name] = ("yes: " if ok else "no: ") + why
        preferred = _preferred(dev)
        row["auto"] = f"-> {preferred if backend_status(preferred, dev)[0] else 'torch'}"
        report[dev.type] = row
    return report


def _preferred(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "native"


def format_info() -> str:
    """``info()`` as the text ``python -m prefkern info`` prints."""
    from . import __version__

    mod = native()
    lines = [f"prefkern {__version__}  torch {torch.__version__}"]
    if mod is not None:
        lines.append(f"native extension: built, CUDA kernels {'compiled for ' + mod.cuda_archs() if mod.has_cuda() else 'not compiled'}")
    else:
        lines.append(f"native extension: {native_error()}")
    for dev, row in info().items():
        lines.append(f"[{dev}]")
        for name, text in row.items():
            lines.append(f"  {name:<7} {text}")
    return "\n".join(lines)
