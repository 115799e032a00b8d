"""Suite ``logprobs``: token log-probs from logits, prefkern against plain torch (and Liger on GPU)."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

import prefkern
from prefkern import reference
from prefkern.dispatch import backend_status

from ..harness import Case

DEFAULT_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16]}

CPU_SIZES = [(1024, 32000), (4096, 32000), (1024, 128256)]
# V = 50257 (GPT-2): rows start at odd 2-byte offsets, the peeled-head path of the row kernels
GPU_SIZES = [(4096, 32000), (16384, 128256), (8192, 152064), (8192, 50257)]
QUICK_SIZES = [(256, 32000)]


def _liger_logprobs() -> Callable | None:
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:
        return None
    ce = LigerCrossEntropyLoss(reduction="none", ignore_index=-100)
    return lambda x, y: -ce(x, y)


def methods(device: torch.device) -> Tuple[List[Tuple[str, Callable]], List[str]]:
    notes = []
    out = [("torch", lambda x, y: reference.logprobs(x, y))]
    for backend in ("native", "triton", "cuda"):
        ok, why = backend_status(backend, device)
        if ok and not (backend == "triton" and device.type == "cpu"):
            out.append((f"prefkern-{backend}", lambda x, y, b=backend: prefkern.logprobs(x, y, backend=b)))
    if device.type == "cuda":
        liger = _liger_logprobs()
        if liger is not None:
            out.append(("liger", liger))
        else:
            notes.append("Liger-Kernel is not installed here: no liger rows.")
    else:
        notes.append("Liger-Kernel's cross-entropy is a Triton GPU kernel: no liger rows on the CPU.")
    notes.append("Cut Cross-Entropy takes hidden states, not logits: it is compared in the fused-loss suite.")
    notes.append("torch = prefkern.reference.logprobs (fp32 log_softmax + gather), the tests' reference.")
    return out, notes


def cases(device: torch.device, dtypes: List[torch.dtype], quick: bool) -> Tuple[List[Case], List[str]]:
    sizes = QUICK_SIZES if quick else (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    fns, notes = methods(device)
    out: List[Case] = []
    for dtype in dtypes:
        for n, v in sizes:
            size = f"N={n} V={v}"
            dname = str(dtype).replace("torch.", "")
            elt = torch.finfo(dtype).bits // 8
            logits = torch.randn(n, v, device=device).mul_(3).to(dtype).requires_grad_()
            labels = torch.randint(0, v, (n,), device=device)
            labels[::7] = -100
            g = torch.randn(n, device=device)

            def fresh(logits=logits):
                logits.grad = None
                return logits

            for method, fn in fns:
                def fw_setup(fresh=fresh, labels=labels):
                    return fresh(), labels

                def bw_setup(fresh=fresh, labels=labels, fn=fn):
                    return fn(fresh(), labels)

                def fwbw_run(s, fn=fn, g=g):
                    fn(*s).backward(g)

                out += [
                    Case("logprobs", method, "fw", size, dname, fw_setup, lambda s, fn=fn: fn(*s),
                         bytes=n * v * elt + 16 * n),
                    Case("logprobs", method, "bw", size, dname, bw_setup, lambda out, g=g: out.backward(g),
                         bytes=2 * n * v * elt + 16 * n, result_bytes=n * v * elt),
                    Case("logprobs", method, "fw-bw", size, dname, fw_setup, fwbw_run,
                         bytes=3 * n * v * elt + 32 * n, result_bytes=n * v * elt),
                ]
    return out, notes
