"""The fused-loss engine: one place decides eager or stream, resolves the backend and sizes the memory.

Every front end (:class:`prefkern.FusedLinearPreferenceLoss`, :mod:`prefkern.compat.liger`, integrations)
validates its own arguments, builds an :class:`~prefkern.fused.objective.BatchObjective` for the batch and calls
:func:`fused_loss`; data goes down from here to the kernels and never back up into a front end:

    fused_loss -> eager_gradients (chunks of pairs: GEMM, row kernel, loss gradient, dX/dW GEMMs)
               or linear_logprobs (stream: online log-sum-exp forward, recomputing backward)
               -> objective.evaluate -> the catalog loss
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .._validation import check_labels_in_range, float64_backend
from ..dispatch import resolve_backend
from ..losses import PreferenceLossOutput
from ..ops.linear_logprobs import TokenStats, default_chunk_rows, linear_logprobs
from ..ops.lm_head_gemm import IDENTITY, LogitTransform, matched_operands
from ..distributed.vocab_parallel import resolve_vocab_parallel, vocab_parallel_token_logps_no_grad
from .eager import differentiable_token_logps, eager_gradients, loss_with_gradients
from .objective import BatchObjective

MODES = ("auto", "stream", "eager")


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a call.

    ignore_index : label of unscored positions. mode : ``"auto"`` (eager when a gradient is wanted, the objective
    splits per pair and one unit's fp32 logits fit ``memory_budget``), ``"stream"`` or ``"eager"`` (eager whenever
    it applies). backend : row kernels (``"auto"``, ``"native"``, ``"triton"``, ``"cuda"``, ``"torch"``).
    memory_budget : bytes an eager chunk of fp32 logits may take (None: a tenth of free memory).
    op : the front end's name, for messages. transform : the model's logit scale / soft-cap / temperature.
    deterministic : False lets the stream path use the Triton register-tile kernels (fp32 atomics in backward;
    see :func:`prefkern.linear_logprobs`). return_stats : also per-token statistics of the distribution
    (:class:`prefkern.ops.linear_logprobs.TokenStats`) from the same pass over each chunk of logits.
    """

    ignore_index: int = -100
    mode: str = "auto"
    backend: str = "auto"
    memory_budget: Optional[int] = None
    op: str = "FusedLinearPreferenceLoss"
    transform: LogitTransform = IDENTITY
    deterministic: bool = True
    vocab_parallel: Any = None  # None, True (a Shard(0) DTensor head) or a prefkern.distributed.VocabParallel
    return_stats: bool = False


@dataclass
class FusedResult:
    """``output``: the objective's output, ``loss`` differentiable (in eager mode its gradients were taken in
    forward; backpropagate it once). ``token_logps``: [R, T] fp32, differentiable in both modes. ``eager``: the
    mode taken. ``stats``: [R, T] :class:`TokenStats` when ``EngineOptions.return_stats``, else None."""

    output: PreferenceLossOutput
    token_logps: torch.Tensor
    eager: bool
    stats: Optional[TokenStats] = None


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


@torch.compiler.assume_constant_result
def _concrete_backend(requested: str, device: torch.device, op: str) -> str:
    """:func:`prefkern.dispatch.resolve_backend`, a constant for ``torch.compile`` (it reads no tensor)."""
    return resolve_backend(requested, device, op)


def wants_gradient(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
               objective: BatchObjective, options: EngineOptions) -> FusedResult:
    """``objective`` on the token log-probs of ``hidden @ weight.T + bias`` at ``labels``, logits never whole.

    Parameters
    ----------
    hidden : [R, T, H] validated rows (``[chosen; rejected]``, or examples when ``objective.unpaired``).
    weight : [V, H]; bias : [V] or None (float dtypes may differ: see
        :func:`prefkern.ops.lm_head_gemm.matched_operands`; autocast is respected).
    labels : [R, T] int64 (already shifted), ``options.ignore_index`` off the completion.
    objective : the loss bound to this batch; options : :class:`EngineOptions`.

    Returns
    -------
    :class:`FusedResult`.
    """
    weight, bias, vp = resolve_vocab_parallel(weight, bias, options.vocab_parallel)
    if vp is not None:
        from ..distributed.engine import vocab_parallel_fused_loss

        if options.transform != IDENTITY or options.return_stats:
            raise ValueError("temperature, logit_scale, logit_softcap and return_stats are not supported on a "
                             "vocab-parallel head")
        return vocab_parallel_fused_loss(hidden, weight, bias, labels, objective, options, vp)
    hidden, weight, bias = matched_operands(hidden, weight, bias)
    backend = _concrete_backend(float64_backend("hidden", hidden, options.backend), hidden.device, options.op)
    # under torch.compile the eager pass (autograd inside forward, a loop over data-dependent chunks) is not
    # traceable: the call streams, whose ops are custom ops with fake implementations
    if options.mode == "stream" or backend == "torch" or not objective.per_pair \
            or not wants_gradient(hidden, weight, bias) or torch.compiler.is_compiling():
        return _stream(hidden, weight, bias, labels, objective, options, backend)
    budget = options.memory_budget or default_memory_budget(hidden.device)
    unit_rows = 1 if objective.unpaired else 2
    if options.mode == "auto" and unit_rows * hidden.shape[1] * weight.shape[0] * 4 > budget:
        return _stream(hidden, weight, bias, labels, objective, options, backend)
    objective.check()  # input errors before any GEMM
    check_labels_in_range(labels, weight.shape[0], options.ignore_index)
    tok, lse, grads, stats = eager_gradients(hidden, weight, bias, labels, options.ignore_index, objective, backend,
                                             budget, options.transform, options.return_stats)
    tok = differentiable_token_logps(tok, hidden, weight, bias, labels, lse, options.ignore_index, backend,
                                     default_chunk_rows(weight.shape[0], hidden.device), options.transform)
    out = objective.evaluate(tok)
    stats = None if stats is None else TokenStats.from_columns(stats, labels.shape)
    return FusedResult(replace(out, loss=loss_with_gradients(out.loss, hidden, weight, bias, grads)), tok, True, stats)


def _stream(hidden, weight, bias, labels, objective, options, backend) -> FusedResult:
    t = options.transform
    tok = linear_logprobs(hidden, weight, labels, bias, ignore_index=options.ignore_index, backend=backend,
                          temperature=t.temperature, logit_scale=t.scale, logit_softcap=t.softcap,
                          deterministic=options.deterministic, return_stats=options.return_stats)
    tok, stats = tok if options.return_stats else (tok, None)
    return FusedResult(objective.evaluate(tok), tok, False, stats)


def token_logps_no_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        labels: torch.Tensor, ignore_index: int, backend: str,
                        transform: LogitTransform = IDENTITY, vocab_parallel: Any = None) -> torch.Tensor:
    """[R, T] fp32 token log-probs without gradient (a reference model's pass: one matmul unit)."""
    weight, bias, vp = resolve_vocab_parallel(weight, bias, vocab_parallel)
    if vp is not None:
        return vocab_parallel_token_logps_no_grad(hidden, weight, bias, labels, ignore_index, vp)
    with torch.no_grad():
        return linear_logprobs(hidden.detach(), weight.detach(), labels, None if bias is None else bias.detach(),
                               ignore_index=ignore_index, backend=backend, temperature=transform.temperature,
                               logit_scale=transform.scale, logit_softcap=transform.softcap)


__all__ = ["EngineOptions", "FusedResult", "MODES", "default_memory_budget", "fused_loss", "token_logps_no_grad",
           "wants_gradient"]
