"""Eager gradients of a per-pair loss over lm-head log-probs (DESIGN.md section 4, mode ``eager``).

For a loss whose batch value is a sum of per-chunk shares (a mean over pairs, or over unpaired examples,
of per-pair terms, plus a token-mean NLL whose normaliser is known up front), chunks of whole
``[chosen; rejected]`` pairs (or whole examples) go through the lm-head GEMM once: the chunk's token log-probs, the gradient of its share of the loss, the
logit gradient written over the chunk's logits in place, then the dX and dW GEMMs -- all inside
forward. Backward only scales the stored gradients. Cost: 3 matmul units (stream: 4); extra memory one
chunk of fp32 logits plus fp32 dX / dW accumulators.

Used by :class:`prefkern.FusedLinearPreferenceLoss` and :mod:`prefkern.compat.liger`.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._validation import check_labels_in_range
from .dispatch import resolve_backend
from .ops.linear_logprobs import _row_backward_inplace, _row_forward

EAGER_TOKENS_PER_CHUNK = {"cpu": 1024, "cuda": 4096}

Gradients = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]
# chunk_share(token_logps [2c or c, T] (a leaf requiring grad), rows [2c or c] batch rows, s, e) -> 0-d share of the loss
ChunkShare = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def default_memory_budget(device: torch.device) -> int:
    """A tenth of the free memory of ``device`` (bytes)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 10
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 10
    except (OSError, KeyError, ValueError):
        return 1 << 30


def eager_applies(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str,
                  op: str) -> bool:
    """Whether a gradient is wanted at all and the backend has row kernels (float64 inputs and the torch
    reference stream: the eager chunks compute in fp32)."""
    if hidden.dtype == torch.float64 or not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return False
    return resolve_backend(backend, hidden.device, op) != "torch"


def pair_fits(t: int, v: int, memory_budget: Optional[int], device: torch.device, rows: int = 2) -> bool:
    """Whether one unit's fp32 logits ([rows, T, V]: a pair, or ``rows=1`` an unpaired example) fit
    ``memory_budget`` (default: a tenth of free memory)."""
    return rows * t * v * 4 <= (memory_budget or default_memory_budget(device))


class _EagerGradients(torch.autograd.Function):
    """Returns a precomputed loss value whose gradients were computed in forward; backward scales them."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("the eager loss has been backpropagated already (its gradients, computed in forward, "
                               "are scaled in place); FusedLinearPreferenceLoss(mode='stream') builds a graph that "
                               "can be backpropagated twice")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        # scaled in place: the gradients belong to this node alone, and a copy of dW would double its memory
        scale = lambda g: None if g is None else g.mul_(grad_out.to(g.dtype))  # noqa: E731
        return None, scale(gh), scale(gw), scale(gb), None, None, None


def with_gradients(value: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   grads: Gradients) -> torch.Tensor:
    """``value`` (0-d, detached) as a differentiable loss whose gradients w.r.t. hidden/weight/bias are
    ``grads`` (backpropagate it once)."""
    return _EagerGradients.apply(value.detach(), hidden, weight, bias, *grads)


def eager_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int, chunk_share: ChunkShare, *, paired: bool = True, backend: str = "auto",
    memory_budget: Optional[int] = None, op: str = "FusedLinearPreferenceLoss",
) -> Tuple[torch.Tensor, Gradients]:
    """Token log-probs and the gradients of a per-pair (or per-example) loss, chunk by chunk.

    Parameters
    ----------
    hidden : [2B, T, H] ``[chosen; rejected]`` hidden states (``paired=False``: [B, T, H] examples);
        weight : [V, H]; bias : [V] or None.
    labels : [2B, T] (or [B, T]) int64 targets (already shifted), ``ignore_index`` off the completion.
    chunk_share : ``(token_logps [2c, T], rows [2c], s, e) -> 0-d``: the share of the batch loss of
        pairs ``s..e-1`` (rows ``s..e-1`` and ``B+s..B+e-1``; unpaired: ``[c, T]``, rows ``s..e-1``),
        from their token log-probs (a leaf that requires grad; 0 at ignored positions). The batch loss
        must be the sum of the shares.
    paired : chunks hold whole ``[chosen; rejected]`` pairs (True) or whole examples (False).

    Returns
    -------
    token_logps : [2B, T] (or [B, T]) fp32, detached (0 at ignored positions).
    grads : (d hidden, d weight [V, H], d bias [V]) in the inputs' dtypes, None where the input needs no
        gradient.
    """
    b2, t, h = hidden.shape
    per_unit = 2 if paired else 1  # rows per pair / example
    b = b2 // per_unit
    v = weight.shape[0]
    dev = hidden.device
    check_labels_in_range(labels, v, ignore_index)
    backend = resolve_backend(backend, dev, op)
    budget = memory_budget or default_memory_budget(dev)
    want = max(1, EAGER_TOKENS_PER_CHUNK.get(dev.type, 1024) // (per_unit * t))
    chunk = max(1, min(b, want, budget // (per_unit * t * v * 4)))

    need_dx, need_dw = hidden.requires_grad, weight.requires_grad
    need_db = bias is not None and bias.requires_grad
    w32 = weight.detach().to(torch.float32)
    b32 = None if bias is None else bias.detach().to(torch.float32)
    dx = torch.zeros((b2, t, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need_db else None
    token_logps = torch.zeros((b2, t), dtype=torch.float32, device=dev)
    buf = torch.empty((per_unit * chunk * t, v), dtype=torch.float32, device=dev)
    lse = torch.empty(per_unit * chunk * t, dtype=torch.float32, device=dev)
    flat_labels = labels.to(torch.int64)
    mask = labels != ignore_index

    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        rows = torch.arange(s, e, device=dev)
        if paired:
            rows = torch.cat([rows, rows + b])
        nr = rows.shape[0]
        # only scored tokens go through the GEMMs: prompt and padding rows contribute exactly zero
        scored = mask[rows].reshape(-1).nonzero().squeeze(1)
        nv = scored.numel()
        x = hidden.detach()[rows].reshape(-1, h)[scored].to(torch.float32)
        y = flat_labels[rows].reshape(-1)[scored].contiguous()
        z = torch.mm(x, w32.t(), out=buf[:nv])
        if b32 is not None:
            z.add_(b32)
        tok_scored = torch.empty(nv, dtype=torch.float32, device=dev)
        _row_forward(backend, z, y, ignore_index, tok_scored, lse[:nv])
        tok = torch.zeros(nr * t, dtype=torch.float32, device=dev).index_copy_(0, scored, tok_scored)
        leaf = tok.view(nr, t).requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(chunk_share(leaf, rows, s, e), leaf)
        token_logps[rows] = tok.view(nr, t)
        _row_backward_inplace(backend, g.reshape(-1)[scored].contiguous(), z, y, ignore_index, lse[:nv])
        if need_dx:
            dx_rows = torch.zeros((nr * t, h), dtype=torch.float32, device=dev)
            dx_rows.index_copy_(0, scored, torch.mm(z, w32))
            dx[rows] = dx_rows.view(nr, t, h)
        if need_dw:
            dw.addmm_(z.t(), x)
        if need_db:
            db.add_(z.sum(dim=0))

    grads = (None if dx is None else dx.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
             None if db is None else db.to(bias.dtype))
    return token_logps, grads


__all__ = ["EAGER_TOKENS_PER_CHUNK", "default_memory_budget", "eager_applies", "eager_chunks", "pair_fits",
           "with_gradients"]
