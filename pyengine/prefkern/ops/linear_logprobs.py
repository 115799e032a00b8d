"""``prefkern.linear_logprobs``: token log-probs from hidden states and the lm-head, logits never whole.

Two implementations of the same contract:
- ``chunks`` (the default on every device): k tokens at a time through the BLAS/cuBLAS GEMM
  (:mod:`.lm_head_gemm`: tensor cores in the inputs' dtype on a GPU, fp32 on the CPU) into one reused [k, V]
  fp32 buffer, one fused row pass (native C++, Triton or CUDA C++: :func:`.logprobs.logprobs_rows`) that makes
  lse and the label logit, and in backward the logit gradient in place, then two GEMMs for dX and dW.
- ``tiles`` (Triton, opt-in with ``deterministic=False``): vocabulary tiles in registers, an online
  log-sum-exp, nothing of size V written; its backward sums dX and dW with fp32 atomics.
Both cost 4 matmul units for a trained step (forward, recompute, dX, dW) and one for a reference pass;
only rows with a label are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .. import reference
from .._validation import (
    check_flag, check_ignore_index, check_labels_in_range, check_lm_head, check_number, check_positive_finite,
    float64_backend, values_readable,
)
from ..dispatch import BACKENDS, resolve_backend
from ._backends import device_of, dtype_code, native_module, triton_kernels
from ..distributed.vocab_parallel import VocabParallel, resolve_vocab_parallel, vocab_parallel_linear_logprobs
from .lm_head_gemm import IDENTITY, LmHeadGemms, LogitTransform, matched_operands
from .logprobs import logprobs_rows, logprobs_rows_grad

CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 128 << 20}  # fp32 logits buffer of the chunked path


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, 32 << 20) // (4 * max(vocab, 1)))


def scored_rows(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows that carry a label, or None when all do (or when they cannot be read).

    The chunked paths push only these rows through the GEMMs: prompt and padding positions contribute
    exactly zero to value and gradient, so skipping them is exact and saves their share of the FLOPs.
    Costs one host sync per call (none per chunk). Where values cannot be read (tracing, graph capture) every
    row goes through; the row kernels give ignored rows 0 and a zero gradient.
    """
    if labels.numel() == 0 or not values_readable(labels):
        return None
    idx = (labels != ignore_index).nonzero().squeeze(1)
    return None if idx.numel() == labels.numel() else idx


def _take(t: torch.Tensor, rows: Optional[torch.Tensor], s: int, e: int) -> torch.Tensor:
    """Rows ``s..e-1`` of the selection: a view when every row is selected, else a gather. (``narrow`` and
    ``index_select``, not ``t[...]``: Python indexing of a fake CUDA tensor needs a CUDA runtime.)"""
    return t.narrow(0, s, e - s) if rows is None else t.index_select(0, rows.narrow(0, s, e - s))


STATS = ("entropy", "log_sum_p2", "logit_sum", "top1")  # columns of the optional per-token statistics


STATS_SLICE_BYTES = 32 << 20  # each of row_stats' two fp32 temporaries stays within this many bytes


def row_stats(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, row_scale: float,
              ignore_index: int, backend: str = "torch") -> torch.Tensor:
    """[k, 4] fp32 per-row statistics of the distribution ``softmax(row_scale * z)`` (0 on ignored rows):
    entropy, ``log sum_v p_v^2`` (WPO's weight), the sum of the scaled logits, and whether the label is the
    argmax (1.0 / 0.0). ``z`` [k, V] fp32, ``lse`` [k, 2]: the row kernels' max and log-sum.

    The ``native`` backend (C++) and the ``triton`` backend (and ``cuda``, where Triton is installed) read each row
    once. Otherwise torch ops on slices of rows, two temporaries of at most ``STATS_SLICE_BYTES`` each, updated in
    place (about four reads of the logits)."""
    k, v = z.shape
    out = torch.empty((k, len(STATS)), dtype=torch.float32, device=z.device)
    kernel = _row_stats_route(backend, z)
    if kernel == "native":
        native_module().row_stats_cpu(z.data_ptr(), dtype_code(z), k, v, z.stride(0), labels.data_ptr(), ignore_index,
                                      row_scale, lse.data_ptr(), out.data_ptr())
        return out
    if kernel == "triton":
        with device_of(z):
            return triton_kernels("row_stats").row_stats(z, lse, labels, row_scale, ignore_index, out)
    step = max(1, STATS_SLICE_BYTES // (4 * max(v, 1)))
    for s in range(0, k, step):
        n = min(step, k - s)
        zs, part, ys = z.narrow(0, s, n), lse.narrow(0, s, n), labels.narrow(0, s, n)
        m, log_s = part[:, :1], part[:, 1]
        d = zs * row_scale - m  # log p + log s
        # p * d is 0 * -inf = NaN at a -inf logit (a masked vocabulary entry): such entries add nothing
        entropy = log_s - (d - log_s.unsqueeze(-1)).exp_().mul_(d).masked_fill_(d == float("-inf"), 0.0).sum(dim=-1)
        d.mul_(2.0)
        top = d.amax(dim=-1, keepdim=True)  # 0 up to rounding; -inf for a row of -inf (NaN, like its log-prob)
        log_sum_p2 = d.sub_(top).exp_().sum(dim=-1).log_() + top.squeeze(-1) - 2.0 * log_s
        out.narrow(0, s, n).copy_(torch.stack([
            entropy, log_sum_p2, zs.sum(dim=-1) * row_scale, (zs.argmax(dim=-1) == ys).to(torch.float32),
        ], dim=-1))
    return out.masked_fill_((labels == ignore_index).unsqueeze(-1), 0.0)


def _row_stats_route(backend: str, z: torch.Tensor) -> Optional[str]:
    """``"native"``, ``"triton"`` or None (torch ops) for :func:`row_stats` on ``z``."""
    if not values_readable(z) or z.stride(-1) != 1 or z.dtype != torch.float32:
        return None
    if backend == "native" and not z.is_cuda:
        return "native"
    if backend not in ("triton", "cuda"):
        return None
    try:
        triton_kernels("row_stats")
    except ImportError:
        return None
    return "triton" if backend == "triton" or z.is_cuda else None


def logit_gradient(head: LmHeadGemms, grad: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                   ignore_index: int, backend: str, scratch: Optional[torch.Tensor]) -> torch.Tensor:
    """The chunk's logit gradient ``d(sum_n grad[n] logp[n]) / d(x W^T + b)`` [k, V] fp32: written over the
    logits ``z`` in place, or into ``scratch`` when the transform soft-caps (its derivative needs ``z``)."""
    if head.transform.softcap is None:
        logprobs_rows_grad(grad, z, labels, lse, ignore_index, head.transform.row_scale, backend, z)
        return z
    out = scratch.narrow(0, 0, z.shape[0])
    logprobs_rows_grad(grad, z, labels, lse, ignore_index, head.transform.row_scale, backend, out)
    return head.transform.chain_(out, z)


def chunked_forward(hidden, weight, bias, labels, ignore_index, backend, chunk_rows,
                    transform: LogitTransform = IDENTITY, with_stats: bool = False):
    """``(logp [N], lse [N, 2], stats [N, 4] or [0, 4])`` fp32, ``chunk_rows`` scored rows at a time through the
    lm-head GEMM (``lse``: each row's max and log-sum, :func:`.logprobs.logprobs_rows`; 0 on unscored rows)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros((n, 2), dtype=torch.float32, device=hidden.device)
    stats = torch.zeros((n if with_stats else 0, len(STATS)), dtype=torch.float32, device=hidden.device)
    rows = scored_rows(labels, ignore_index)
    m = n if rows is None else rows.numel()
    if m == 0:
        return logp, lse, stats
    head = LmHeadGemms(weight, bias, transform)
    buf = torch.empty((min(chunk_rows, m), v), dtype=torch.float32, device=hidden.device)
    for s in range(0, m, chunk_rows):
        e = min(m, s + chunk_rows)
        z = head.logits(_take(hidden, rows, s, e), buf.narrow(0, 0, e - s))
        y = _take(labels, rows, s, e)
        part_logp, part_lse = (logp.narrow(0, s, e - s), lse.narrow(0, s, e - s)) if rows is None else \
            (logp.new_empty(e - s), lse.new_empty((e - s, 2)))
        logprobs_rows(z, y, ignore_index, transform.row_scale, backend, part_logp, part_lse)
        part_stats = row_stats(z, part_lse, y, transform.row_scale, ignore_index, backend) if with_stats else None
        if rows is None:
            if with_stats:
                stats.narrow(0, s, e - s).copy_(part_stats)
        else:
            sel = rows.narrow(0, s, e - s)
            logp.index_copy_(0, sel, part_logp)
            lse.index_copy_(0, sel, part_lse)
            if with_stats:
                stats.index_copy_(0, sel, part_stats)
    return logp, lse, stats


def chunked_backward(grad, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows,
                     need_dx, need_dw, need_db, transform: LogitTransform = IDENTITY):
    """``(dX [N, H], dW [V, H], db [V])`` fp32 (None where not needed): each chunk's logits recomputed, the
    logit gradient written over them in place, then the dX and dW GEMMs."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dx = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need_db else None
    rows = scored_rows(labels, ignore_index)
    m = n if rows is None else rows.numel()
    if m == 0:
        return dx, dw, db
    head = LmHeadGemms(weight, bias, transform)
    buf = torch.empty((min(chunk_rows, m), v), dtype=torch.float32, device=dev)
    scratch = torch.empty_like(buf) if transform.softcap else None
    for s in range(0, m, chunk_rows):
        e = min(m, s + chunk_rows)
        x = _take(hidden, rows, s, e)
        if rows is None:  # every row goes through: an ignored row's hidden state (NaN or not) must not reach dW
            x = torch.where((_take(labels, rows, s, e) != ignore_index).unsqueeze(-1), x, 0)
        z = head.logits(x, buf.narrow(0, 0, e - s))
        z = logit_gradient(head, _take(grad, rows, s, e).contiguous(), z, _take(labels, rows, s, e),
                           _take(lse, rows, s, e).contiguous(), ignore_index, backend, scratch)
        dz = head.grad_operand(z)
        if need_dx:
            if rows is None:
                head.grad_hidden(dz, out=dx.narrow(0, s, e - s))
            else:
                dx.index_copy_(0, rows.narrow(0, s, e - s), head.grad_hidden(dz))
        if need_dw:
            dw = head.accumulate_grad_weight(dw, dz, x)
        if need_db:
            db.add_(head.grad_bias(z))
    return dx, dw, db


def _tile_forward(hidden, weight, bias, labels, ignore_index):
    """Triton tile forward on the scored rows only (scattered back; ignored rows give logp 0, lse parts 0)."""
    launch = triton_kernels("linear_logprobs").linear_lse_forward
    rows = scored_rows(labels, ignore_index)
    with device_of(hidden):
        if rows is None:
            return launch(hidden, weight, bias, labels, ignore_index)
        logp_s, lse_s = launch(hidden.index_select(0, rows), weight, bias, labels[rows], ignore_index)
    n = hidden.shape[0]
    logp = hidden.new_zeros(n, dtype=torch.float32).index_copy_(0, rows, logp_s)
    lse = hidden.new_zeros((n, 2), dtype=torch.float32).index_copy_(0, rows, lse_s)
    return logp, lse


def _uses_tiles(backend: str, deterministic: bool) -> bool:
    return backend == "triton" and not deterministic


def _transform(temperature: float, logit_scale: float, logit_softcap: float) -> LogitTransform:
    return LogitTransform(temperature, logit_scale, logit_softcap or None)


@torch.library.custom_op("prefkern::linear_logprobs_forward", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int, backend: str, chunk_rows: int, deterministic: bool,
    temperature: float, logit_scale: float, logit_softcap: float, with_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op: ``(logp [N], lse [N, 2], stats [N, 4] or [0, 4])`` fp32 (``lse``: the max and the log-sum of the
    scaled logits, kept apart for the backward; ``logit_softcap`` 0 = off). ``backend``: auto, native, triton or
    cuda (torch row kernels on chunks when ``auto`` finds neither)."""
    backend = resolve_backend(backend, hidden.device, "linear_logprobs")
    if values_readable(labels):
        check_labels_in_range(labels, weight.shape[0], ignore_index)
    if _uses_tiles(backend, deterministic):
        logp, lse = _tile_forward(hidden, weight, bias, labels, ignore_index)
        return logp, lse, logp.new_zeros((0, len(STATS)))
    return chunked_forward(hidden, weight, bias, labels, ignore_index, backend, chunk_rows,
                           _transform(temperature, logit_scale, logit_softcap), with_stats)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, backend, chunk_rows, deterministic, temperature, logit_scale,
      logit_softcap, with_stats):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty((n, 2), dtype=torch.float32),
            hidden.new_empty((n if with_stats else 0, len(STATS)), dtype=torch.float32))


@torch.library.custom_op("prefkern::linear_logprobs_backward", mutates_args=())
def linear_logprobs_bwd(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, backend: str, chunk_rows: int,
    deterministic: bool, temperature: float, logit_scale: float, logit_softcap: float,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op: ``(dX, dW, db)`` in the dtypes of hidden, weight and bias; an empty tensor where not needed."""
    backend = resolve_backend(backend, hidden.device, "linear_logprobs")
    if _uses_tiles(backend, deterministic):
        with device_of(hidden):
            dx, dw, db = triton_kernels("linear_logprobs").linear_lse_backward(
                grad, hidden, weight, bias, labels, lse, ignore_index, need_dx, need_dw, need_db)
    else:
        dx, dw, db = chunked_backward(grad, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows,
                                      need_dx, need_dw, need_db, _transform(temperature, logit_scale, logit_softcap))
    return (
        dx.to(hidden.dtype) if dx is not None else hidden.new_empty(0),
        dw.to(weight.dtype) if dw is not None else hidden.new_empty(0),
        db.to(bias.dtype) if db is not None else hidden.new_empty(0),
    )


@linear_logprobs_bwd.register_fake
def _(grad, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows, deterministic, temperature,
      logit_scale, logit_softcap, need_dx, need_dw, need_db):
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dx else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if need_db and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, backend, chunk_rows, deterministic, t, scale, cap, _ = inputs
    _, lse, stats = output
    ctx.mark_non_differentiable(lse, stats)
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.options = (ignore_index, backend, chunk_rows, deterministic, t, scale, cap)


def _backward(ctx, grad_logp, _grad_lse, _grad_stats):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (need_dx or need_dw or need_db):
        return (None,) * 12
    dx, dw, db = linear_logprobs_bwd(grad_logp.to(torch.float32).contiguous(), hidden, weight, bias, labels, lse,
                                     *ctx.options, need_dx, need_dw, need_db and bias is not None)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + (None,) * 9


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def reference_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              labels: torch.Tensor, ignore_index: int, transform: LogitTransform = IDENTITY,
                              with_stats: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``torch`` backend: materialised logits in fp32 (fp64 for fp64 inputs), plain autograd; the
    statistics (no gradient) as :func:`row_stats` computes them."""
    if values_readable(labels):
        check_labels_in_range(labels, weight.shape[0], ignore_index)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = torch.where((labels != ignore_index).unsqueeze(-1), hidden.to(dtype), 0.0) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    scaled = transform.materialised(logits)
    logp = reference.logprobs(scaled, labels, ignore_index, compute_dtype=dtype)
    if not with_stats:
        return logp, None
    with torch.no_grad():
        m = scaled.amax(dim=-1)
        log_s = torch.logsumexp(scaled - m.unsqueeze(-1), dim=-1)
        stats = row_stats(scaled.detach(), torch.stack([m, log_s], dim=-1), labels, 1.0, ignore_index)
        stats = stats.to(torch.float32)
    return logp, stats


def shift_labels(labels: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """``labels[..., t + shift]`` at position t, ``ignore_index`` where that runs past the end."""
    if shift == 0:
        return labels
    pad = labels.new_full((*labels.shape[:-1], min(shift, labels.shape[-1])), ignore_index)
    return torch.cat([labels[..., shift:], pad], dim=-1)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    shift: int = 0,
    mode: str = "auto",
    backend: str = "auto",
    chunk_rows: Optional[int] = None,
    deterministic: bool = True,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_stats: bool = False,
    vocab_parallel: Union[None, bool, VocabParallel] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, TokenStats]]:
    """Token log-probs ``log_softmax(hidden @ weight.T + bias)[..., labels]`` without the logits tensor.

    Parameters
    ----------
    hidden : [..., H] float32 / bfloat16 / float16 (float64 on the torch backend, for gradcheck).
    weight : [V, H] (the lm-head). hidden, weight and bias may differ in float dtype: under ``torch.autocast``
        the head runs in the autocast dtype (as ``F.linear``), otherwise in the widest of their dtypes.
    labels : [...] int64/int32, the leading shape of ``hidden``; entries in ``[0, V)`` or ``ignore_index``.
    bias : [V] or None.
    shift : 0 when labels are aligned with hidden positions; 1 for causal-LM labels (position t is
        scored against ``labels[..., t + 1]``; the last position of each row gives 0).
    mode : ``"auto"`` or ``"stream"``: the op never holds more than one chunk of logits (``chunk_rows``
        x V fp32: about 32 MB on the CPU and 128 MB on a GPU by default; the Triton forward holds only
        register tiles). Prompt and padding rows (``ignore_index``) never reach a GEMM. The ``"eager"`` trade
        (gradient inside forward) needs the loss and lives in :class:`prefkern.FusedLinearPreferenceLoss`.
    backend : the row kernels of the chunks: ``"auto"`` (Triton on CUDA, native C++ on CPU; torch row ops,
        with a warning, when neither can run), ``"native"``, ``"triton"``, ``"cuda"`` (CUDA C++) or
        ``"torch"`` (the materialised reference, no chunks).
    chunk_rows : tokens per chunk on the chunked paths (default: a 32 MB fp32 buffer).
    deterministic : ``True`` (default): the backward recomputes the logits chunk by chunk through the
        GEMM (cuBLAS / BLAS), forms the logit gradient in place with the row kernel and takes dX and dW
        with two more GEMMs: bit-reproducible, at the cost of one ``chunk_rows x V`` fp32 buffer.
        ``False`` (Triton only): the register-tile kernels in both directions, nothing of size V in memory,
        but dX and dW are summed with fp32 atomics, so their last bits vary from run to run, and the atomic
        traffic (about N H V / 128 + V H N / 64 adds) probably bounds it on a real GPU (not measured).
    temperature, logit_scale, logit_softcap : the model's logits are ``softcap(scale * z)`` (Cohere's
        ``logit_scale``, Gemma 2's ``final_logit_softcapping``; None: no cap), divided by ``temperature``
        before the softmax (:class:`prefkern.ops.lm_head_gemm.LogitTransform`). Chunked paths only.
    return_stats : also return :class:`TokenStats` (no gradient), computed in the same pass over each chunk:
        per token the entropy, ``log sum_v p_v^2`` (WPO's weight), the sum of the logits over V and whether the
        label is the argmax. Chunked paths only; costs two chunk-sized temporaries.

    vocab_parallel : None (an unsplit head), a :class:`prefkern.distributed.VocabParallel`
        ``(process_group, start, stop)`` when ``weight`` / ``bias`` are this rank's rows ``[start, stop)``, or True
        for a ``Shard(0)`` DTensor weight (:func:`prefkern.distributed.vocab_parallel_linear_logprobs`: labels are
        global ids, the same on every rank; per scored token 4 + 12 bytes of all-reduce forward, 4 H backward).

    Returns
    -------
    [...] float32 tensor (labels' shape), differentiable w.r.t. hidden, weight and bias for any
    upstream gradient; with ``return_stats`` a ``(logps, TokenStats)`` pair. No dW/db work is done when weight/bias do not require grad; no state is
    saved under ``torch.no_grad()`` (a reference pass costs one matmul unit). Labels out of range
    raise ``ValueError``; that check and the selection of scored rows cost a host sync or two per
    call on a GPU.
    """
    if vocab_parallel is not None and vocab_parallel is not False:
        if mode == "eager":
            raise ValueError("mode='eager' needs the loss: use prefkern.FusedLinearPreferenceLoss(mode='eager')")
        if (temperature, logit_scale, logit_softcap, return_stats) != (1.0, 1.0, None, False):
            raise ValueError("temperature, logit_scale, logit_softcap and return_stats are not supported on a "
                             "vocab-parallel head")
        return vocab_parallel_linear_logprobs(hidden, weight, labels, bias, vocab_parallel, ignore_index, chunk_rows,
                                              shift=shift)
    resolve_vocab_parallel(weight, bias, None)  # a DTensor head without vocab_parallel: TypeError saying what to do
    check_lm_head(hidden, weight, labels, bias)
    hidden, weight, bias = matched_operands(hidden, weight, bias)
    ignore_index = check_ignore_index(ignore_index)
    if mode not in ("auto", "stream", "eager"):
        raise ValueError(f"mode must be 'auto', 'stream' or 'eager', got {mode!r}")
    if mode == "eager":
        raise ValueError("mode='eager' computes the gradient inside forward and needs the loss: use "
                         "prefkern.FusedLinearPreferenceLoss(mode='eager'); linear_logprobs streams")
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    transform = logit_transform(temperature, logit_scale, logit_softcap)
    return_stats = check_flag("return_stats", return_stats)

    lead = labels.shape
    labels = shift_labels(labels.to(torch.int64), shift, ignore_index).reshape(-1).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = float64_backend("hidden", hidden, backend)
    if backend == "torch":
        logp, stats = reference_linear_logprobs(h2, weight, bias, labels, ignore_index, transform, return_stats)
    else:
        if not deterministic and (transform != IDENTITY or return_stats):
            raise ValueError("temperature, logit_scale, logit_softcap and return_stats run on the chunked paths: "
                             "pass deterministic=True")
        rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
        logp, _, stats = linear_logprobs_fwd(h2, weight, bias, labels, ignore_index, backend, rows,
                                             bool(deterministic), transform.temperature, transform.scale,
                                             transform.softcap or 0.0, return_stats)
    logp = logp.reshape(lead)
    return (logp, TokenStats.from_columns(stats, lead)) if return_stats else logp


@dataclass
class TokenStats:
    """Per-token statistics of the model's distribution (``[...]`` = the labels' shape, fp32, no gradient,
    0 at ignored positions): ``entropy``, ``log_sum_p2`` (``log sum_v p_v^2``), ``logit_sum`` (sum over V of
    the logits the softmax sees, temperature included), ``top1`` (1.0 where the label is the argmax)."""

    entropy: torch.Tensor
    log_sum_p2: torch.Tensor
    logit_sum: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def from_columns(cls, stats: torch.Tensor, lead) -> "TokenStats":
        return cls(*(stats[:, i].reshape(lead) for i in range(len(STATS))))


def logit_transform(temperature: object = 1.0, logit_scale: object = 1.0,
                    logit_softcap: object = None) -> LogitTransform:
    """Validated :class:`LogitTransform` (temperature and softcap finite > 0, scale finite and non-zero)."""
    t = check_positive_finite("temperature", temperature)
    scale = check_number("logit_scale", logit_scale, finite=True)
    if scale == 0.0:
        raise ValueError("logit_scale must not be 0")
    cap = None if logit_softcap is None else check_positive_finite("logit_softcap", logit_softcap)
    return LogitTransform(t, scale, cap)
