"""The eager pass: a per-pair loss's gradients taken chunk by chunk inside forward (DESIGN.md section 4).

For a loss whose batch value is a sum of per-chunk shares (a mean over pairs, or over unpaired examples, of
per-pair terms, plus a token-mean NLL whose normaliser is known up front), chunks of whole ``[chosen; rejected]``
pairs (or whole examples) go through the lm-head GEMM once: the chunk's token log-probs, the gradient of its share
of the loss, the logit gradient written over the chunk's logits in place, then the dX and dW GEMMs. Backward only
scales the stored gradients. Cost: 3 matmul units (stream: 4); extra memory one chunk of fp32 logits plus fp32
dX / dW accumulators.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.linear_logprobs import STATS, linear_logprobs_bwd, logit_gradient, row_stats
from ..ops.lm_head_gemm import IDENTITY, LmHeadGemms, LogitTransform
from ..ops.logprobs import logprobs_rows
from .objective import BatchObjective

EAGER_TOKENS_PER_CHUNK = {"cpu": 1024, "cuda": 4096}

Gradients = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def chunk_units(units: int, unit_rows: int, t: int, v: int, device: torch.device, budget: int) -> int:
    """Pairs (or examples) per eager chunk: about ``EAGER_TOKENS_PER_CHUNK`` tokens, within ``budget`` bytes of
    fp32 logits."""
    want = max(1, EAGER_TOKENS_PER_CHUNK.get(device.type, 1024) // (unit_rows * t))
    return max(1, min(units, want, budget // (unit_rows * t * v * 4)))


def chunk_batch_rows(s: int, e: int, units: int, paired: bool, device: torch.device) -> torch.Tensor:
    """The batch rows of pairs ``s..e-1`` (``[s, e)`` and ``[units + s, units + e)``), or of examples ``s..e-1``."""
    rows = torch.arange(s, e, device=device)
    return torch.cat([rows, rows + units]) if paired else rows


def eager_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int, objective: BatchObjective, backend: str, budget: int, transform: LogitTransform = IDENTITY,
    with_stats: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Gradients, Optional[torch.Tensor]]:
    """Token log-probs, their log-sum-exps and the gradients of ``objective``'s batch loss, chunk by chunk.

    Parameters
    ----------
    hidden : [R, T, H] rows (``[chosen; rejected]`` pairs, or examples when ``objective.unpaired``);
        weight : [V, H]; bias : [V] or None.
    labels : [R, T] int64 targets (already shifted), ``ignore_index`` off the completion.
    objective : gives each chunk's share of the batch loss (:meth:`BatchObjective.chunk_share`).
    backend : a concrete backend of the row kernels; budget : bytes of fp32 logits a chunk may take.
    transform : the model's scale / soft-cap / temperature of the logits.
    with_stats : also the per-token statistics of :func:`..ops.linear_logprobs.row_stats`, from each chunk's logits
        before its gradient overwrites them (no extra GEMM).

    Returns
    -------
    token_logps : [R, T] fp32, detached (0 at ignored positions); lse : [R * T, 2] fp32, each token's max and
    log-sum of the scaled logits kept apart (:func:`..ops.logprobs.logprobs_rows`; 0 at ignored positions);
    grads : (d hidden, d weight [V, H], d bias [V]) in the inputs' dtypes, None where no gradient is wanted;
    stats : [R * T, 4] fp32 (``STATS`` columns, 0 at ignored positions) or None.
    """
    r, t, h = hidden.shape
    unit_rows = 1 if objective.unpaired else 2
    units = r // unit_rows
    v = weight.shape[0]
    dev = hidden.device
    chunk = chunk_units(units, unit_rows, t, v, dev, budget)

    need_dx, need_dw = hidden.requires_grad, weight.requires_grad
    need_db = bias is not None and bias.requires_grad
    head = LmHeadGemms(weight, bias, transform)
    dx = torch.zeros((r, t, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need_db else None
    token_logps = torch.zeros((r, t), dtype=torch.float32, device=dev)
    lse = torch.zeros((r, t, 2), dtype=torch.float32, device=dev)
    stats = torch.zeros((r, t, len(STATS)), dtype=torch.float32, device=dev) if with_stats else None
    buf = torch.empty((unit_rows * chunk * t, v), dtype=torch.float32, device=dev)
    scratch = torch.empty_like(buf) if transform.softcap else None
    mask = labels != ignore_index

    for s in range(0, units, chunk):
        e = min(units, s + chunk)
        rows = chunk_batch_rows(s, e, units, not objective.unpaired, dev)
        nr = rows.shape[0]
        # only scored tokens go through the GEMMs: prompt and padding rows contribute exactly zero
        scored = mask[rows].reshape(-1).nonzero().squeeze(1)
        nv = scored.numel()
        x = hidden.detach()[rows].reshape(-1, h)[scored]
        y = labels[rows].reshape(-1)[scored].contiguous()
        z = head.logits(x, buf[:nv])
        tok_scored = torch.empty(nv, dtype=torch.float32, device=dev)
        lse_scored = torch.empty((nv, 2), dtype=torch.float32, device=dev)
        logprobs_rows(z, y, ignore_index, transform.row_scale, backend, tok_scored, lse_scored)
        tok = torch.zeros(nr * t, dtype=torch.float32, device=dev).index_copy_(0, scored, tok_scored)
        leaf = tok.view(nr, t).requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(objective.chunk_share(leaf, rows, s, e), leaf)
        token_logps[rows] = tok.view(nr, t)
        lse_rows = torch.zeros((nr * t, 2), dtype=torch.float32, device=dev).index_copy_(0, scored, lse_scored)
        lse[rows] = lse_rows.view(nr, t, 2)
        if with_stats:
            part = row_stats(z, lse_scored, y, transform.row_scale, ignore_index, backend)
            stats_rows = torch.zeros((nr * t, len(STATS)), dtype=torch.float32, device=dev).index_copy_(0, scored, part)
            stats[rows] = stats_rows.view(nr, t, len(STATS))
        z = logit_gradient(head, g.reshape(-1)[scored].contiguous(), z, y, lse_scored, ignore_index, backend, scratch)
        dz = head.grad_operand(z)
        if need_dx:
            dx_rows = torch.zeros((nr * t, h), dtype=torch.float32, device=dev)
            dx_rows.index_copy_(0, scored, head.grad_hidden(dz))
            dx[rows] = dx_rows.view(nr, t, h)
        if need_dw:
            dw = head.accumulate_grad_weight(dw, dz, x)
        if need_db:
            db.add_(head.grad_bias(z))

    grads = (None if dx is None else dx.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
             None if db is None else db.to(bias.dtype))
    return token_logps, lse.view(-1, 2), grads, None if stats is None else stats.view(-1, len(STATS))


class _EagerLoss(torch.autograd.Function):
    """A precomputed loss value whose gradients were computed in forward; backward scales them."""

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


def loss_with_gradients(value: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], grads: Gradients) -> torch.Tensor:
    """``value`` (0-d) as a differentiable loss whose gradients w.r.t. hidden/weight/bias are ``grads``
    (backpropagate it once)."""
    return _EagerLoss.apply(value.detach(), hidden, weight, bias, *grads)


class _EagerTokenLogps(torch.autograd.Function):
    """The eager pass's token log-probs [R, T] as a differentiable output: a gradient that reaches them (from
    per-pair losses or rewards built by the caller) is taken by the chunked recomputing backward, exactly as in
    stream mode. Nothing runs unless such a gradient arrives."""

    @staticmethod
    def forward(ctx, token_logps, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows, transform):
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (ignore_index, backend, chunk_rows, transform)
        return token_logps.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[1:4]
        ignore_index, backend, chunk_rows, t = ctx.options
        h2 = hidden.reshape(-1, hidden.shape[-1])
        dx, dw, db = linear_logprobs_bwd(grad.reshape(-1).to(torch.float32).contiguous(), h2, weight, bias,
                                         labels.reshape(-1).contiguous(), lse, ignore_index, backend, chunk_rows,
                                         True, t.temperature, t.scale, t.softcap or 0.0,
                                         need_dx, need_dw, need_db and bias is not None)
        return (None, dx.reshape(hidden.shape) if need_dx else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None)


def differentiable_token_logps(token_logps: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], labels: torch.Tensor, lse: torch.Tensor,
                               ignore_index: int, backend: str, chunk_rows: int,
                               transform: LogitTransform = IDENTITY) -> torch.Tensor:
    return _EagerTokenLogps.apply(token_logps, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows,
                                  transform)


__all__ = ["EAGER_TOKENS_PER_CHUNK", "chunk_batch_rows", "chunk_units", "eager_gradients", "loss_with_gradients",
           "differentiable_token_logps"]
