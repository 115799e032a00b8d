"""Suite ``sampling``: token sampling (temperature-only, top-k + top-p, top-p, min-p), prefkern against torch's sort path and FlashInfer."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status

from ..harness import Case

DEFAULT_DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}

CPU_SIZES = [(64, 32000)]
# V = 50257 (GPT-2): rows start at odd 2-byte offsets, the peeled-head path of the row kernels
GPU_SIZES = [(256, 128256), (256, 32000), (256, 50257)]
QUICK_SIZES = [(16, 32000)]
TOP_K, TOP_P, MIN_P = 50, 0.9, 0.05
# (label, prefkern kwargs); the torch sort path has no min-p
VARIANTS = [
    ("temp", {}),
    (f"top-k{TOP_K}+top-p{TOP_P}", {"top_k": TOP_K, "top_p": TOP_P}),
    (f"top-p{TOP_P}", {"top_p": TOP_P}),
    (f"min-p{MIN_P}", {"min_p": MIN_P}),
]


def _flashinfer():
    try:
        import flashinfer.sampling as fs
    except Exception:
        return None
    return fs


def methods(device: torch.device, kw: dict) -> Tuple[List[Tuple[str, Callable]], List[str]]:
    notes: List[str] = []
    out: List[Tuple[str, Callable]] = []
    if "min_p" not in kw:
        out.append(("torch", lambda x, s: reference.sample_sort_path(x, top_k=kw.get("top_k"), top_p=kw.get("top_p"))))
    for backend in ("native", "triton", "cuda"):
        ok, _ = backend_status(backend, device)
        if ok and not (backend == "triton" and device.type == "cpu"):
            out.append((f"prefkern-{backend}",
                        lambda x, s, b=backend: prefkern.sample(x, seed=s, validate=False, backend=b, **kw)))
    if device.type == "cuda":
        fs = _flashinfer()
        if fs is None:
            notes.append("FlashInfer is not installed here: no flashinfer rows.")
        elif not kw:
            out.append(("flashinfer", lambda x, s: fs.sampling_from_logits(x)))
        elif "min_p" in kw:
            out.append(("flashinfer", lambda x, s: fs.min_p_sampling_from_probs(torch.softmax(x.float(), -1), kw["min_p"])))
        elif "top_k" in kw:
            out.append(("flashinfer", lambda x, s: fs.top_k_top_p_sampling_from_logits(x, kw["top_k"], kw["top_p"])))
        else:
            out.append(("flashinfer", lambda x, s: fs.top_p_sampling_from_probs(torch.softmax(x.float(), -1), kw["top_p"])))
    else:
        notes.append("FlashInfer's samplers are CUDA kernels: no flashinfer rows on the CPU.")
    notes.append("torch = prefkern.reference.sample_sort_path (vLLM's native path: sort, softmax, cumsum, "
                 "scatter, exponential-race draw); it has no min-p, so min-p rows have prefkern only.")
    notes.append("prefkern rows pass the seed as a device tensor and validate=False (no host sync, graph-safe).")
    notes.append("bytes = one read of the logits (R*V*element size); fraction = that over the measured copy rate.")
    return out, notes


def cases(device: torch.device, dtypes: List[torch.dtype], quick: bool) -> Tuple[List[Case], List[str]]:
    sizes = QUICK_SIZES if quick else (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    out: List[Case] = []
    notes: List[str] = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        elt = torch.finfo(dtype).bits // 8
        for r, v in sizes:
            logits = (torch.randn(r, v, device=device) * 3).to(dtype)
            seed = torch.arange(r, device=device)
            for label, kw in VARIANTS:
                fns, notes = methods(device, kw)
                size = f"R={r} V={v} {label}"
                for method, fn in fns:
                    out.append(Case("sampling", method, "fw", size, dname, lambda x=logits, s=seed: (x, s),
                                    lambda st, fn=fn: fn(*st), bytes=r * v * elt))
    return out, notes
