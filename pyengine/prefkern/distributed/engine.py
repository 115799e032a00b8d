"""The fused-loss engine on a vocab-parallel head: eager and stream, as :mod:`prefkern.fused.engine`.

:func:`vocab_parallel_fused_loss` is what :func:`prefkern.fused.fused_loss` hands a call to when the head is split by
rows across a group; :func:`vocab_parallel_eager_gradients` mirrors :func:`prefkern.fused.eager.eager_gradients`:
chunks of whole pairs, each chunk's local logits once through the GEMM, its two forward all-reduces (4 + 12 bytes per
scored token), the chunk's loss gradient, the logit gradient in place, the local ``dW`` slice and a partial ``dX``;
one ``SUM`` all-reduce of the partial ``dX`` (``4 H`` bytes per scored token) after the last chunk. All ranks take
the same mode and the same chunks (one all-reduce ``MIN`` of one int64 per call decides both, as the memory budget
and the slice sizes may differ between ranks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..fused.eager import chunk_batch_rows, chunk_units, loss_with_gradients
from ..fused.engine import EngineOptions, FusedResult, default_memory_budget, wants_gradient
from ..fused.objective import BatchObjective
from ..ops.linear_logprobs import default_chunk_rows
from ..ops.lm_head_gemm import LmHeadGemms
from .vocab_parallel import (
    VocabParallel, _VocabParallelLogprobs, all_reduce, combine_stats, local_grad, local_stats, vp_backward,
)

Gradients = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def agreed_eager_chunk(objective: BatchObjective, hidden: torch.Tensor, options: EngineOptions,
                       vp: VocabParallel, vocab_rows: int) -> int:
    """Pairs (examples) per eager chunk agreed by every rank, or 0 for stream (one all-reduce MIN of an int64)."""
    unit_rows = 1 if objective.unpaired else 2
    units = hidden.shape[0] // unit_rows
    budget = options.memory_budget or default_memory_budget(hidden.device)
    v = max(vocab_rows, 1)
    fits = options.mode == "eager" or unit_rows * hidden.shape[1] * v * 4 <= budget
    chunk = chunk_units(units, unit_rows, hidden.shape[1], v, hidden.device, budget) if fits else 0
    t = torch.tensor([chunk], dtype=torch.int64, device=hidden.device)
    return int(all_reduce(t, dist.ReduceOp.MIN, vp.process_group)[0])


def vocab_parallel_eager_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int, objective: BatchObjective, backend: str, budget: int, options: VocabParallel,
    chunk: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Gradients]:
    """:func:`prefkern.fused.eager.eager_gradients` on this rank's slice of the head.

    Parameters
    ----------
    hidden : [R, T, H] rows (the same on every rank); weight : [V_r, H] this rank's rows; bias : [V_r] or None.
    labels : [R, T] int64 global ids (already shifted), ``ignore_index`` off the completion.
    objective : the batch loss (:meth:`BatchObjective.chunk_share`); backend : accepted for the same signature (the
        row statistics of a slice are torch ops); budget : bytes of fp32 logits a chunk may take.
    options : the slice; chunk : pairs per chunk, the same on every rank (default: from ``budget`` and ``V_r``,
        which is only safe when every rank computes the same number).

    Returns
    -------
    token_logps : [R, T] fp32 detached (0 where ignored); lse : [R * T] fp32 global log-sum-exp (0 where ignored);
    grads : (d hidden [R, T, H] summed over the group, d weight [V_r, H], d bias [V_r]) in the inputs' dtypes,
    None where no gradient is wanted.
    """
    r, t, h = hidden.shape
    unit_rows = 1 if objective.unpaired else 2
    units = r // unit_rows
    v = weight.shape[0]
    dev = hidden.device
    if chunk is None:
        chunk = chunk_units(units, unit_rows, t, max(v, 1), dev, budget)
    need_dx, need_dw = hidden.requires_grad, weight.requires_grad
    need_db = bias is not None and bias.requires_grad
    head = LmHeadGemms(weight, bias)
    dx = torch.zeros((r * t, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need_db else None
    token_logps = torch.zeros((r, t), dtype=torch.float32, device=dev)
    lse = torch.zeros((r, t), dtype=torch.float32, device=dev)
    buf = torch.empty((unit_rows * chunk * t, v), dtype=torch.float32, device=dev)
    mask = labels != ignore_index
    all_scored = []

    for s in range(0, units, chunk):
        e = min(units, s + chunk)
        rows = chunk_batch_rows(s, e, units, not objective.unpaired, dev)
        nr = rows.shape[0]
        scored = mask[rows].reshape(-1).nonzero().squeeze(1)
        nv = scored.numel()
        flat = (rows.unsqueeze(1) * t + torch.arange(t, device=dev)).reshape(-1)[scored]  # rows of [R * T]
        x = hidden.detach().reshape(-1, h).index_select(0, flat)
        y = labels.reshape(-1).index_select(0, flat) - options.start
        z = head.logits(x, buf[:nv])
        stats = torch.empty((nv, 4), dtype=torch.float32, device=dev)
        local_stats(z.clone() if nv else z, y, stats)
        tok_scored, lse_scored = combine_stats(stats, options.process_group)
        tok = torch.zeros(nr * t, dtype=torch.float32, device=dev).index_copy_(0, scored, tok_scored)
        leaf = tok.view(nr, t).requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(objective.chunk_share(leaf, rows, s, e), leaf)
        token_logps[rows] = tok.view(nr, t)
        lse.view(-1).index_copy_(0, flat, lse_scored)
        local_grad(z, y, lse_scored, g.reshape(-1)[scored].contiguous())
        dz = head.grad_operand(z)
        if need_dx:
            dx.index_copy_(0, flat, head.grad_hidden(dz))
        if need_dw:
            dw = head.accumulate_grad_weight(dw, dz, x)
        if need_db:
            db.add_(head.grad_bias(z))
        all_scored.append(flat)

    if need_dx:
        flat = torch.cat(all_scored) if all_scored else torch.zeros(0, dtype=torch.int64, device=dev)
        if flat.numel():
            dx.index_copy_(0, flat, all_reduce(dx.index_select(0, flat), dist.ReduceOp.SUM, options.process_group))
    grads = (None if dx is None else dx.view(r, t, h).to(hidden.dtype),
             None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
    return token_logps, lse.view(-1), grads


class _VocabParallelEagerTokenLogps(torch.autograd.Function):
    """The eager pass's token log-probs as a differentiable output (the recomputing vocab-parallel backward runs
    only if a gradient reaches them)."""

    @staticmethod
    def forward(ctx, token_logps, hidden, weight, bias, labels, lse, options, ignore_index, chunk_rows):
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (options, ignore_index, chunk_rows)
        return token_logps.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[1:4]
        need_db = need_db and bias is not None
        h2 = hidden.detach().reshape(-1, hidden.shape[-1])
        dx, dw, db = vp_backward(grad.reshape(-1).to(torch.float32).contiguous(), h2, weight.detach(),
                                 None if bias is None else bias.detach(), labels.reshape(-1).contiguous(), lse,
                                 *ctx.options, need_dx, need_dw, need_db)
        return (None, dx.view(hidden.shape).to(hidden.dtype) if need_dx else None,
                dw.to(weight.dtype) if need_dw else None, db.to(bias.dtype) if need_db else None,
                None, None, None, None, None)


def vocab_parallel_fused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              labels: torch.Tensor, objective: BatchObjective, options: EngineOptions,
                              vp: VocabParallel) -> FusedResult:
    """:func:`prefkern.fused.fused_loss` with ``weight`` [V_r, H] (and ``bias`` [V_r]) this rank's slice.

    The mode follows ``options.mode`` as the unsplit engine does (``"auto"``: eager when a gradient is wanted, the
    objective splits per pair and a chunk fits the budget on every rank); the outputs are the same on every rank.
    """
    if options.mode == "stream" or not objective.per_pair or not wants_gradient(hidden, weight, bias):
        chunk = 0
    else:
        chunk = agreed_eager_chunk(objective, hidden, options, vp, weight.shape[0])
    rows = default_chunk_rows(max(weight.shape[0], 1), hidden.device)
    if chunk == 0:
        tok = _VocabParallelLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                           labels.reshape(-1).contiguous(), vp, options.ignore_index, rows)
        tok = tok.view(labels.shape)
        return FusedResult(objective.evaluate(tok), tok, False)
    objective.check()
    budget = options.memory_budget or default_memory_budget(hidden.device)
    tok, lse, grads = vocab_parallel_eager_gradients(hidden, weight, bias, labels, options.ignore_index, objective,
                                                     options.backend, budget, vp, chunk)
    tok = _VocabParallelEagerTokenLogps.apply(tok, hidden, weight, bias, labels, lse, vp, options.ignore_index, rows)
    out = objective.evaluate(tok)
    return FusedResult(replace(out, loss=loss_with_gradients(out.loss, hidden, weight, bias, grads)), tok, True)


__all__ = ["vocab_parallel_eager_gradients", "vocab_parallel_fused_loss", "agreed_eager_chunk"]
