"""Suite ``preference``: DPO from hidden states + lm-head with a reference model: prefkern's fused
loss (eager and stream) against plain torch (TRL-style), Liger-Kernel and Cut Cross-Entropy + DPO."""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

import prefkern
from prefkern import reference
from prefkern.compat.liger import LigerFusedLinearDPOLoss as LigerDPOCompat

from ..harness import Case

DEFAULT_DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}
REPS = {"cpu": 3, "cuda": 10}  # a CPU step at the target size takes seconds

# (pairs, T, H, V)
CPU_SIZES = [(4, 512, 1024, 32000)]
GPU_SIZES = [(8, 1024, 4096, 128256)]
QUICK_SIZES = [(2, 128, 256, 8000)]


def _liger() -> Callable | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception:
        return None
    module = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)

    def run(x, w, y, rx, rw):
        return module(w, x, y, None, rx, rw)[0]

    return run


def _cce_dpo() -> Callable | None:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return None

    def run(x, w, y, rx, rw):
        mask = y != -100
        tok = -linear_cross_entropy(x, w, y, reduction="none")
        with torch.no_grad():
            ref = -linear_cross_entropy(rx, rw, y, reduction="none")
        seq, rseq = (tok * mask).sum(-1), (ref * mask).sum(-1)
        b = seq.shape[0] // 2
        return prefkern.dpo_loss(seq[:b], seq[b:], rseq[:b], rseq[b:], beta=0.1).loss

    return run


def methods(device: torch.device) -> Tuple[List[Tuple[str, Callable, bool]], List[str]]:
    """(name, loss(x, w, y, ref_x, ref_w) -> scalar, computes gradients in forward)."""
    notes = []
    eager = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.1, mode="eager")
    stream = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.1, mode="stream")
    out = [
        ("torch", lambda x, w, y, rx, rw: reference.preference_loss_from_hidden(
            "sigmoid", x, w, y, ref_hidden=rx, ref_weight=rw, beta=0.1).loss, False),
        ("prefkern-eager", lambda x, w, y, rx, rw: eager(x, w, y, ref_hidden=rx, ref_weight=rw).loss, True),
        ("prefkern-stream", lambda x, w, y, rx, rw: stream(x, w, y, ref_hidden=rx, ref_weight=rw).loss, False),
    ]
    if device.type == "cuda":
        tiles = prefkern.FusedLinearPreferenceLoss("sigmoid", beta=0.1, mode="stream", deterministic=False)
        out.append(("prefkern-stream-tiles",
                    lambda x, w, y, rx, rw: tiles(x, w, y, ref_hidden=rx, ref_weight=rw).loss, False))
        notes.append("prefkern-stream = cuBLAS chunks (tensor cores, fp32 logits chunk) + Triton row kernels, the "
                     "default; prefkern-stream-tiles = the Triton register-tile kernels (deterministic=False).")
    compat = LigerDPOCompat(beta=0.1, use_ref_model=True)
    out.append(("prefkern-liger-api", lambda x, w, y, rx, rw: compat(w, x, y, None, rx, rw)[0], True))
    notes.append("prefkern-liger-api = prefkern.compat.liger.LigerFusedLinearDPOLoss, the drop-in with Liger's "
                 "signature and aux outputs (eager underneath).")
    liger = _liger()
    if liger is not None:
        out.append(("liger", liger, True))
        if device.type == "cpu":
            notes.append("Liger-Kernel runs on the CPU through torch.compile (its chunked losses are compiled torch).")
    else:
        notes.append("Liger-Kernel is not installed here: no liger rows.")
    cce = _cce_dpo() if device.type == "cuda" else None
    if cce is not None:
        out.append(("cce+dpo", cce, False))
    else:
        notes.append("Cut Cross-Entropy + DPO: GPU only (or not installed): no rows.")
    notes.append("torch = prefkern.reference.preference_loss_from_hidden: full logits in the input dtype, fp32 "
                 "log_softmax, gather, DPO (TRL's path).")
    notes.append("FLOPs: the fw-bw rows count the GEMM floor 8 N H V over the N scored (completion) tokens: "
                 "reference forward + policy forward, dX, dW; prompt tokens (a quarter here) need none. "
                 "Methods that push prompt tokens through the lm-head do more work than the floor.")
    return out, notes


def cases(device: torch.device, dtypes: List[torch.dtype], quick: bool) -> Tuple[List[Case], List[str]]:
    sizes = QUICK_SIZES if quick else (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    fns, notes = methods(device)
    out: List[Case] = []
    for dtype in dtypes:
        for pairs, t, h, v in sizes:
            size = f"B={pairs} T={t} H={h} V={v}"
            dname = str(dtype).replace("torch.", "")
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(2 * pairs, t, h, device=device, generator=gen).to(dtype).requires_grad_()
            w = (torch.randn(v, h, device=device, generator=gen) / h**0.5).to(dtype).requires_grad_()
            rx = (x.detach() + 0.01 * torch.randn_like(x, dtype=torch.float32).to(dtype)).to(dtype)
            rw = w.detach().clone()
            y = torch.randint(0, v, (2 * pairs, t), device=device, generator=gen)
            y[:, : t // 4] = -100  # prompt
            grad_bytes = (x.numel() + w.numel()) * x.element_size()
            scored = int((y != -100).sum())  # prompt positions need no lm-head work at all

            def fresh(x=x, w=w, y=y, rx=rx, rw=rw):
                x.grad = None
                w.grad = None
                return x, w, y, rx, rw

            for method, fn, grads_in_forward in fns:
                out += [
                    Case("preference", method, "fw", size, dname, fresh, lambda s, fn=fn: fn(*s),
                         result_bytes=grad_bytes if grads_in_forward else 0),
                    Case("preference", method, "bw", size, dname, lambda fresh=fresh, fn=fn: fn(*fresh()),
                         lambda loss: loss.backward(), result_bytes=grad_bytes),
                    Case("preference", method, "fw-bw", size, dname, fresh, lambda s, fn=fn: fn(*s).backward(),
                         flops=8.0 * scored * h * v, result_bytes=grad_bytes),
                ]
    return out, notes
