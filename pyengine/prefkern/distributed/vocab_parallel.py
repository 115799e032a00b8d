"""A vocab-parallel lm-head: token log-probs when each rank of a process group holds rows ``[start, stop)`` of it.

Every rank holds the same hidden states and labels (a tensor-parallel group) and its own slice of the head. Per
scored token (prompt and padding positions never reach a GEMM nor a collective):

- forward: the local logits of each chunk go through the lm-head GEMM (:class:`prefkern.ops.lm_head_gemm.LmHeadGemms`)
  and are reduced at once to the local maximum ``m_r``, the local sum ``s_r = sum_v exp(z_v - m_r)`` and the label
  logit where the label falls in the slice. After the last chunk, two all-reduces combine them:
  ``MAX`` of ``m_r`` (4 bytes per token), then ``SUM`` of ``(s_r exp(m_r - M), z_y or 0, 1 or 0)`` (12 bytes per
  token: the rescaled sums, the label logit from its owning rank, the owner count, which proves every label is owned
  by exactly one rank). ``logp = (z_y - M) - log S``: the maximum and the log of the sum stay apart, as in the
  unsplit kernels.
- backward: each rank recomputes its chunks, writes the logit gradient ``g (1[v = y] - exp(z_v - lse))`` over its
  slice, accumulates its own ``dW`` slice (and ``db`` slice) with no communication, and a partial ``dX``; one
  ``SUM`` all-reduce of the fp32 partial ``dX`` (``4 H`` bytes per token) makes the full ``dX`` on every rank.

The returned ``dX`` is complete (already summed over the group): do not all-reduce it again (a Megatron
``copy_to_tensor_model_parallel_region`` in front of the head would).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .._validation import check_integer, check_tensor
from ..ops.lm_head_gemm import LmHeadGemms

#: bytes per scored token of each collective (fp32 payloads); ``H`` is the hidden size
FORWARD_MAX_BYTES_PER_TOKEN = 4
FORWARD_SUM_BYTES_PER_TOKEN = 12


def backward_bytes_per_token(hidden_size: int) -> int:
    """Bytes per scored token of the backward's ``dX`` all-reduce (fp32): ``4 H``."""
    return 4 * hidden_size


@dataclass(frozen=True)
class VocabParallel:
    """Where this rank's lm-head rows sit in the whole head.

    Parameters
    ----------
    process_group : the group whose ranks hold the slices (all of them the same hidden states and labels);
        None: the default (world) group.
    start, stop : this rank's rows ``[start, stop)`` of the ``[V, H]`` head (``stop == start``: an empty slice).
        The slices of the group must tile ``[0, V)`` without overlap; a label owned by no rank or by several
        raises ``ValueError`` on every rank.
    """

    process_group: Optional[Any]
    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.process_group is not None and not isinstance(self.process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(self.process_group).__name__}")
        start = check_integer("start", self.start)
        stop = check_integer("stop", self.stop)
        if start < 0 or stop < start:
            raise ValueError(f"start and stop must satisfy 0 <= start <= stop, got start={start}, stop={stop}")

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @staticmethod
    def from_dtensor(weight: torch.Tensor) -> "VocabParallel":
        """The slice of a ``[V, H]`` DTensor sharded ``Shard(0)`` on a 1-D device mesh (torch's chunking:
        ``ceil(V / world)`` rows per rank, the last ranks shorter or empty)."""
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(weight, DTensor):
            raise TypeError(f"weight must be a DTensor to take its vocab-parallel layout, got {type(weight).__name__}")
        mesh, placements = weight.device_mesh, weight.placements
        if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
            raise ValueError(f"weight must be a DTensor sharded Shard(0) on a 1-D device mesh for vocab parallelism, "
                             f"got placements {tuple(placements)} on a {mesh.ndim}-D mesh")
        v, world, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
        per_rank = -(-v // world)
        start, stop = min(v, rank * per_rank), min(v, (rank + 1) * per_rank)
        local = weight.to_local()
        if local.shape[0] != stop - start:
            raise ValueError(f"weight's local shard has {local.shape[0]} rows where Shard(0) of V = {v} on {world} "
                             f"ranks gives rank {rank} {stop - start}")
        return VocabParallel(mesh.get_group(), start, stop)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (seconds) when nothing has: no
    DTensor can exist before that module is loaded. False while torch.compile traces."""
    if t is None or torch.compiler.is_compiling():
        return False
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def resolve_vocab_parallel(
    weight: torch.Tensor, bias: Optional[torch.Tensor], vocab_parallel: Union[None, bool, VocabParallel],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[VocabParallel]]:
    """``(weight, bias, options)`` as the kernels take them: local tensors and the slice, or the inputs and None.

    Parameters
    ----------
    weight : [V, H] tensor, [V_r, H] local slice, or a ``Shard(0)`` DTensor of the whole head.
    bias : [V] / [V_r] / DTensor (same layout as ``weight``) or None.
    vocab_parallel : None (default): an unsplit head; a DTensor weight raises ``TypeError`` (an FSDP2 parameter
        outside its module's forward is also a ``Shard(0)`` DTensor, but over ranks holding *different* tokens:
        taking it for a vocab-parallel head would be silently wrong). ``True``: the weight is a ``Shard(0)``
        DTensor whose mesh ranks hold the same tokens. A :class:`VocabParallel`: the weight is this rank's slice.

    Returns
    -------
    A DTensor weight (and bias) comes back as its local tensor through ``to_local()`` (differentiable: the
    gradient reaches the DTensor parameter as a ``Shard(0)`` DTensor).
    """
    if vocab_parallel is None or vocab_parallel is False:
        if is_dtensor(weight) or is_dtensor(bias):
            raise TypeError(
                "weight is a DTensor: under FSDP2 (fully_shard) call the loss inside the forward of the FSDP module "
                "whose parameters include the lm-head (FSDP gathers the weight there and reduce-scatters its "
                "gradient; unshard() outside forward loses the gradient); for a tensor-parallel Shard(0) head whose "
                "ranks hold the same hidden states pass vocab_parallel=True")
        return weight, bias, None
    if vocab_parallel is True:
        options = VocabParallel.from_dtensor(weight)
        if bias is not None:
            if not is_dtensor(bias) or tuple(bias.placements) != tuple(weight.placements):
                raise TypeError("bias must be a DTensor with weight's placements (Shard(0)) when weight is one")
            bias = bias.to_local()
        return weight.to_local(), bias, options
    if not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be None, True or a prefkern.distributed.VocabParallel, got "
                        f"{type(vocab_parallel).__name__}")
    if is_dtensor(weight) or is_dtensor(bias):
        raise TypeError("weight is a DTensor: pass vocab_parallel=True (its layout is read from the DTensor), "
                        "or its local tensor with a VocabParallel")
    return weight, bias, vocab_parallel


def check_inputs(hidden: object, weight: object, labels: object, bias: object, options: VocabParallel,
                 names: Tuple[str, str, str, str] = ("hidden", "weight", "labels", "bias")) -> None:
    """Kinds, dtypes, shapes and devices of a vocab-parallel call (the slice may be empty: ``[0, H]``)."""
    nh, nw, nl, nb = names
    check_tensor(nh, hidden)
    check_tensor(nw, weight)
    check_tensor(nl, labels)
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{nh} must be float32, bfloat16 or float16, got {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{nl} must be int64 or int32, got {labels.dtype}")
    if weight.dim() != 2 or weight.shape[0] != options.rows:
        raise ValueError(f"{nw} must be this rank's slice [stop - start, H] = [{options.rows}, H], got "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{nh} must have shape [..., H] with H = {weight.shape[1]}, got {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{nw} must have the dtype of {nh} ({hidden.dtype}), got {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{nl} must have shape {tuple(hidden.shape[:-1])} ({nh}'s leading dims), got "
                         f"{tuple(labels.shape)}")
    if bias is not None:
        check_tensor(nb, bias)
        if tuple(bias.shape) != (options.rows,):
            raise ValueError(f"{nb} must be this rank's slice [stop - start] = [{options.rows}], got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{nb} must have the dtype of {nh} ({hidden.dtype}), got {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{nh}, {nw}, {nl} and {nb} must be on one device, got {sorted(map(str, devices))}")


# ---- communication (every collective of this package goes through here, so that it can be counted) ------------

#: called as ``hook(op_name, tensor)`` before each collective when set (the benchmark counts bytes with it)
_COLLECTIVE_HOOK: Optional[Callable[[str, torch.Tensor], None]] = None


def set_collective_hook(hook: Optional[Callable[[str, torch.Tensor], None]]) -> None:
    """Install (or clear, with None) a callback ``hook(op, tensor)`` seen before every collective of the package."""
    global _COLLECTIVE_HOOK
    _COLLECTIVE_HOOK = hook


def all_reduce(t: torch.Tensor, op: Any, group: Optional[Any]) -> torch.Tensor:
    if _COLLECTIVE_HOOK is not None:
        _COLLECTIVE_HOOK(str(op), t)
    dist.all_reduce(t, op=op, group=group)
    return t


# ---- the per-token statistics --------------------------------------------------------------------------------


def local_stats(z: torch.Tensor, local_labels: torch.Tensor, out: torch.Tensor) -> None:
    """From a chunk of local logits ``z`` [k, V_r] fp32 (overwritten), ``out`` [k, 4] fp32 gets per row the local
    maximum, the sum of ``exp(z - max)``, the label logit (0 where not owned) and 1 where the label is owned."""
    k, v = z.shape
    owned = (local_labels >= 0) & (local_labels < v)
    if v == 0:
        out.zero_()
        out[:, 0] = float("-inf")
        return
    m = z.amax(dim=1)
    picked = z.gather(1, local_labels.clamp(0, v - 1).unsqueeze(1)).squeeze(1)
    out[:, 2] = torch.where(owned, picked, torch.zeros_like(picked))
    out[:, 3] = owned.to(torch.float32)
    out[:, 0] = m
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out[:, 1] = z.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)


def combine_stats(stats: torch.Tensor, group: Optional[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` [k] fp32 from every rank's ``stats`` [k, 4] (:func:`local_stats`): the two all-reduces.

    Raises ``ValueError`` (on every rank alike) when a label is owned by no rank or by several."""
    if stats.shape[0] == 0:  # the same on every rank (same labels): no collective
        return stats.new_zeros(0), stats.new_zeros(0)
    m = all_reduce(stats[:, 0].contiguous(), dist.ReduceOp.MAX, group)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    local_shift = torch.where(torch.isfinite(stats[:, 0]), stats[:, 0], shift)
    sums = torch.stack([stats[:, 1] * torch.exp(local_shift - shift), stats[:, 2], stats[:, 3]], dim=1)
    sums = all_reduce(sums.contiguous(), dist.ReduceOp.SUM, group)
    owners = sums[:, 2]
    if owners.numel() and bool((owners != 1).any()):
        bad = (owners != 1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"labels at scored positions {bad} are owned by {owners[bad].tolist()} ranks of the "
                         "vocab-parallel group (each label must lie in [0, V) and the slices [start, stop) must tile "
                         "[0, V) without overlap)")
    log_s = torch.log(sums[:, 0])
    return (sums[:, 1] - shift) - log_s, shift + log_s


def local_grad(z: torch.Tensor, local_labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """In place over the local logits ``z`` [k, V_r] fp32: ``grad (1[v = y] - exp(z_v - lse))`` for this slice."""
    k, v = z.shape
    if v == 0:
        return z
    z.sub_(lse.unsqueeze(1)).exp_().mul_(-grad.unsqueeze(1))
    owned = ((local_labels >= 0) & (local_labels < v)).nonzero().squeeze(1)
    if owned.numel():
        z.index_put_((owned, local_labels[owned]), grad[owned], accumulate=True)
    return z


# ---- forward and backward over chunks --------------------------------------------------------------------------


def scored(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).nonzero().squeeze(1)


def vp_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
               options: VocabParallel, ignore_index: int, chunk_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], lse [N])`` fp32 of a [N, H] batch: local statistics chunk by chunk, then one MAX and one SUM
    all-reduce over all scored rows of the call."""
    n = hidden.shape[0]
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    rows = scored(labels, ignore_index)
    m = rows.numel()
    if m == 0:
        return logp, lse
    head = LmHeadGemms(weight, bias)
    stats = torch.empty((m, 4), dtype=torch.float32, device=dev)
    buf = torch.empty((min(chunk_rows, m), options.rows), dtype=torch.float32, device=dev)
    for s in range(0, m, chunk_rows):
        e = min(m, s + chunk_rows)
        sel = rows[s:e]
        z = head.logits(hidden.index_select(0, sel), buf[: e - s])
        local_stats(z, labels.index_select(0, sel) - options.start, stats[s:e])
    lp, ls = combine_stats(stats, options.process_group)
    logp.index_copy_(0, rows, lp)
    lse.index_copy_(0, rows, ls)
    return logp, lse


def vp_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, lse: torch.Tensor, options: VocabParallel, ignore_index: int, chunk_rows: int,
                need_dx: bool, need_dw: bool, need_db: bool):
    """``(dX [N, H] summed over the group, dW [V_r, H], db [V_r])`` fp32, None where not needed."""
    n, h = hidden.shape
    dev = hidden.device
    dx = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((options.rows, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((options.rows,), dtype=torch.float32, device=dev) if need_db else None
    rows = scored(labels, ignore_index)
    m = rows.numel()
    if m > 0 and (need_dw or need_db or (need_dx and options.rows > 0)):
        head = LmHeadGemms(weight, bias)
        buf = torch.empty((min(chunk_rows, m), options.rows), dtype=torch.float32, device=dev)
        for s in range(0, m, chunk_rows):
            e = min(m, s + chunk_rows)
            sel = rows[s:e]
            x = hidden.index_select(0, sel)
            z = head.logits(x, buf[: e - s])
            local_grad(z, labels.index_select(0, sel) - options.start, lse.index_select(0, sel),
                       grad.index_select(0, sel).to(torch.float32))
            dz = head.grad_operand(z)
            if need_dx:
                dx.index_copy_(0, sel, head.grad_hidden(dz))
            if need_dw:
                dw = head.accumulate_grad_weight(dw, dz, x)
            if need_db:
                db.add_(head.grad_bias(z))
    if need_dx and m > 0:
        # the partial dX of the scored rows only: ignored rows are 0 on every rank
        part = all_reduce(dx.index_select(0, rows), dist.ReduceOp.SUM, options.process_group)
        dx.index_copy_(0, rows, part)
    return dx, dw, db


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options, ignore_index, chunk_rows):
        logp, lse = vp_forward(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
                               options, ignore_index, chunk_rows)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.options = (options, ignore_index, chunk_rows)
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        if not (need_dx or need_dw or need_db):
            return None, None, None, None, None, None, None
        dx, dw, db = vp_backward(grad.contiguous(), hidden, weight, bias, labels, lse, *ctx.options,
                                 need_dx, need_dw, need_db)
        return (dx.to(hidden.dtype) if need_dx else None, dw.to(weight.dtype) if need_dw else None,
                db.to(bias.dtype) if need_db else None, None, None, None, None)


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    bias_shard: Optional[torch.Tensor] = None,
    options: Union[bool, VocabParallel] = True,
    ignore_index: int = -100,
    chunk_rows: Optional[int] = None,
    *,
    shift: int = 0,
) -> torch.Tensor:
    """Token log-probs ``log_softmax(hidden @ W.T + b)[..., labels]`` with ``W`` split by rows across a group.

    Parameters
    ----------
    hidden : [..., H] float32 / bfloat16 / float16, the same on every rank of the group.
    weight_shard : [V_r, H] this rank's rows ``[start, stop)`` of the head (``V_r`` may be 0), or, with
        ``options=True``, the whole head as a ``Shard(0)`` DTensor on a 1-D mesh.
    labels : [...] int64/int32 *global* token ids in ``[0, V)`` or ``ignore_index``, the same on every rank.
    bias_shard : [V_r] (or a ``Shard(0)`` DTensor) or None.
    options : a :class:`VocabParallel` ``(process_group, start, stop)``, or True for a DTensor weight.
    ignore_index : label of unscored positions (0 in the output, zero gradient, no GEMM, no communication).
    chunk_rows : tokens per local GEMM chunk (default: a 32 MB fp32 buffer on the CPU, 128 MB on a GPU).
    shift : 0 (labels aligned with hidden) or 1 (causal-LM labels, as :func:`prefkern.linear_logprobs`).

    Communication, per scored token: forward one ``MAX`` all-reduce of 4 bytes and one ``SUM`` all-reduce of 12
    bytes (fp32: rescaled sum of exponentials, label logit from its owning rank, owner count); backward one ``SUM``
    all-reduce of the fp32 partial ``dX``: ``4 H`` bytes (only when ``hidden`` requires grad). No communication for
    ``dW`` / ``db``: each rank writes its own slice. Every rank must make the same call (same shapes, labels and
    ``requires_grad`` flags): the collectives pair up in order.

    Returns
    -------
    [...] float32 (labels' shape), the same on every rank, differentiable w.r.t. hidden (the full ``dX``, already
    summed over the group), weight_shard and bias_shard (this rank's slice).

    Raises
    ------
    TypeError / ValueError naming the argument for wrong kinds, dtypes, shapes or devices; ValueError (on every
    rank) when a scored label is owned by no rank or by several.
    """
    from ..ops.linear_logprobs import default_chunk_rows, shift_labels  # (that module imports this one)

    weight_shard, bias_shard, vp = resolve_vocab_parallel(weight_shard, bias_shard, options)
    if vp is None:
        raise ValueError("options must be a VocabParallel or True (a Shard(0) DTensor weight); for an unsplit head "
                         "call prefkern.linear_logprobs")
    check_inputs(hidden, weight_shard, labels, bias_shard, vp, ("hidden", "weight_shard", "labels", "bias_shard"))
    ignore_index = check_integer("ignore_index", ignore_index)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    lead = labels.shape
    y = shift_labels(labels.to(torch.int64), shift, ignore_index).reshape(-1).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows or default_chunk_rows(max(vp.rows, 1), hidden.device)
    logp = _VocabParallelLogprobs.apply(h2, weight_shard, bias_shard, y, vp, ignore_index, rows)
    return logp.reshape(lead)


def vocab_parallel_token_logps_no_grad(hidden: torch.Tensor, weight_shard: torch.Tensor,
                                       bias_shard: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int,
                                       options: VocabParallel) -> torch.Tensor:
    """[R, T] fp32 token log-probs without gradient (a reference pass on a vocab-parallel head; forward
    communication only)."""
    with torch.no_grad():
        return vocab_parallel_linear_logprobs(hidden.detach(), weight_shard.detach(), labels,
                                              None if bias_shard is None else bias_shard.detach(), options,
                                              ignore_index)


__all__ = ["VocabParallel", "resolve_vocab_parallel", "check_inputs", "vocab_parallel_linear_logprobs",
           "vocab_parallel_token_logps_no_grad", "set_collective_hook", "backward_bytes_per_token",
           "FORWARD_MAX_BYTES_PER_TOKEN", "FORWARD_SUM_BYTES_PER_TOKEN"]
