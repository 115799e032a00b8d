"""Suite ``ensemble``: K reward heads on the last token + mean/WCO/UWO, prefkern against plain torch."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from prefkern import reference
from prefkern.dispatch import backend_status
from prefkern.ops.ensemble import METHODS, ensemble_head_fwd, ensemble_reduce_fwd

from ..harness import Case

DEFAULT_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16]}

T = 4  # positions per sequence; only the last real one is read
CPU_SIZES = [(1024, 4096, 8), (4096, 4096, 8), (4096, 2048, 5)]
GPU_SIZES = [(4096, 4096, 8), (16384, 4096, 8), (16384, 8192, 5)]
QUICK_SIZES = [(512, 1024, 8)]
REDUCE_SIZES = {"cpu": [(8, 1 << 20)], "cuda": [(8, 1 << 24)]}
METHOD = "uwo"


def methods(device: torch.device) -> Tuple[List[Tuple[str, str]], List[str]]:
    notes = [
        "torch = prefkern.reference.ensemble_head: gather of the last-token rows, F.linear with the [K, H] "
        "weight, then mean/min/var over the members in fp32 (the tests' reference); the hidden states are "
        "converted to fp32 only after the gather.",
        f"Hidden states [N, T={T}, H]; the last-token indices are precomputed and shared by all methods. "
        f"Reduction {METHOD!r} (lambda 0.5, ddof 0) with per-member normalisation.",
        "Bytes counted for the head: the N x H last-token rows read once plus the K x H weight and the "
        "outputs; '% of limit' is that rate over the copy bandwidth (read + write) measured in the same run.",
        "fw-bw rows: forward, then the backward of sum(combined) to the hidden states, weight and bias. "
        "Every method allocates a zeroed gradient as large as the hidden states (autograd needs a dense one), "
        "which dominates these rows; prefkern's CPU backward then writes the scored rows and dW in one pass, "
        "its GPU backward is two small GEMMs on the gathered rows.",
    ]
    out = [("torch", "torch")]
    for backend in ("native", "triton", "cuda"):
        ok, _ = backend_status(backend, device)
        if ok and not (backend == "triton" and device.type == "cpu"):
            out.append((f"prefkern-{backend}", backend))
    if device.type == "cuda":
        notes.append("prefkern-triton is what backend='auto' runs on a GPU; prefkern-cuda is the CUDA C++ kernel "
                     "(backend='cuda'). Both backwards are the same two small GEMMs.")
    return out, notes


def _head_fn(backend: str) -> Callable:
    code = METHODS.index(METHOD)
    if backend == "torch":
        return lambda x, last, w, b, mu, sd: reference.ensemble_head(x, last, w, b, METHOD, 0.5, 0, mu, sd)
    return lambda x, last, w, b, mu, sd: ensemble_head_fwd(x, last, w, b, mu, sd, code, 0.5, 0, False, backend)


def _reduce_fn(backend: str) -> Callable:
    code = METHODS.index(METHOD)
    if backend == "torch":
        return lambda s, mu, sd: reference.ensemble_reduce(s, METHOD, 0.5, 0, mu, sd)
    return lambda s, mu, sd: ensemble_reduce_fwd(s, mu, sd, code, 0.5, 0, False, backend)


def cases(device: torch.device, dtypes: List[torch.dtype], quick: bool) -> Tuple[List[Case], List[str]]:
    sizes = QUICK_SIZES if quick else (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    fns, notes = methods(device)
    out: List[Case] = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        elt = torch.finfo(dtype).bits // 8
        for n, h, k in sizes:
            size = f"N={n} H={h} K={k}"
            hidden = torch.randn(n, T, h, device=device).to(dtype).requires_grad_()
            last = torch.randint(0, T, (n,), device=device)
            weight = (torch.randn(k, h, device=device) * h ** -0.5).to(dtype).requires_grad_()
            bias = torch.zeros(k, device=device, requires_grad=True)
            mu = torch.randn(k, device=device)
            sd = torch.rand(k, device=device) + 0.5
            head_bytes = n * h * elt + k * h * elt + 4 * n * (k + 3) + 8 * n

            def fresh(hidden=hidden, last=last, weight=weight, bias=bias, mu=mu, sd=sd):
                hidden.grad = weight.grad = bias.grad = None
                return hidden, last, weight, bias, mu, sd

            for method, backend in fns:
                fn = _head_fn(backend)

                def fw(s, fn=fn):
                    with torch.no_grad():
                        return fn(*s)

                def fwbw(s, fn=fn):
                    fn(*s)[1].sum().backward()

                out += [
                    Case("ensemble", method, "fw", size, dname, fresh, fw, bytes=head_bytes),
                    Case("ensemble", method, "fw-bw", size, dname, fresh, fwbw, bytes=2 * head_bytes + k * h * elt,
                         result_bytes=(hidden.numel() + weight.numel()) * elt + 4 * k),
                ]
        if quick:
            continue
        for k, n in REDUCE_SIZES[device.type]:
            size = f"reduce K={k} N={n}"
            scores = torch.randn(k, n, device=device).to(dtype)
            mu = torch.randn(k, device=device)
            sd = torch.rand(k, device=device) + 0.5
            for method, backend in fns:
                fn = _reduce_fn(backend)
                out.append(Case("ensemble", method, "fw", size, dname, lambda s=scores, mu=mu, sd=sd: (s, mu, sd),
                                lambda st, fn=fn: fn(*st), bytes=k * n * elt + 12 * n))
    return out, notes
