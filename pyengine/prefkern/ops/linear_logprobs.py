"""``prefkern.linear_logprobs``: token log-probs from hidden states and the lm-head, logits never whole.

Two implementations of the same contract:
- ``tiles`` (Triton forward on CUDA): vocabulary tiles in registers, an online log-sum-exp, nothing of
  size V written. Its tile backward (fp32 atomics into dX and dW) is opt-in: ``deterministic=False``.
- ``chunks`` (native C++ on CPU, CUDA C++, and every backward by default): k tokens at a time through
  the BLAS/cuBLAS GEMM into one reused [k, V] fp32 buffer, one fused pass that makes lse and the label
  logit, and in backward the logit gradient in place, then two GEMMs for dX and dW.
Both cost 4 matmul units for a trained step (forward, recompute, dX, dW) and one for a reference pass;
only rows with a label are computed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from .._validation import (
    FLOAT_DTYPES, check_float, check_index, check_labels_in_range, check_same_device, check_tensor,
)
from ..dispatch import BACKENDS, resolve_backend
from ._backends import cuda_stream, native_module, triton_kernels

CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 128 << 20}  # fp32 logits buffer of the chunked path


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, 32 << 20) // (4 * max(vocab, 1)))


def _row_forward(backend: str, buf: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                 logp: torch.Tensor, lse: torch.Tensor) -> None:
    k, v = buf.shape
    if backend == "torch":
        torch.logsumexp(buf, dim=-1, out=lse)
        ignored = labels == ignore_index
        picked = buf.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
        logp.copy_((picked - lse).masked_fill(ignored, 0.0))
        return
    if backend == "triton":
        lp, ls = triton_kernels("logprobs").logprobs_forward(buf, labels, ignore_index, 1.0)
        logp.copy_(lp)
        lse.copy_(ls)
        return
    args = (buf.data_ptr(), 0, k, v, buf.stride(0), labels.data_ptr(), ignore_index, 1.0, logp.data_ptr(), lse.data_ptr())
    if backend == "native":
        native_module().logprobs_forward_cpu(*args)
    else:
        native_module().logprobs_forward_cuda(*args, cuda_stream(buf))


def _row_backward_inplace(backend: str, grad: torch.Tensor, buf: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int, lse: torch.Tensor) -> None:
    k, v = buf.shape
    if backend == "torch":
        ignored = labels == ignore_index
        g = grad.masked_fill(ignored, 0.0).unsqueeze(-1)
        safe = labels.masked_fill(ignored, 0).unsqueeze(-1)
        buf.sub_(lse.unsqueeze(-1)).exp_().mul_(-g)
        buf.scatter_add_(-1, safe, g)
        return
    if backend == "triton":
        triton_kernels("logprobs").logprobs_backward(grad, buf, labels, lse, ignore_index, 1.0, out=buf)
        return
    args = (grad.data_ptr(), buf.data_ptr(), 0, k, v, buf.stride(0), labels.data_ptr(), ignore_index, 1.0,
            lse.data_ptr(), buf.data_ptr(), buf.stride(0))
    if backend == "native":
        native_module().logprobs_backward_cpu(*args)
    else:
        native_module().logprobs_backward_cuda(*args, cuda_stream(buf))


def _chunk_logits(x: torch.Tensor, w32: torch.Tensor, b32: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    torch.mm(x, w32.t(), out=out)
    if b32 is not None:
        out.add_(b32)
    return out


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32)


def scored_rows(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows that carry a label, or None when all do.

    The chunked paths push only these rows through the GEMMs: prompt and padding positions contribute
    exactly zero to value and gradient, so skipping them is exact and saves their share of the FLOPs.
    Costs one host sync per call (none per chunk).
    """
    idx = (labels != ignore_index).nonzero().squeeze(1)
    return None if idx.numel() == labels.numel() else idx


def _pick(rows: Optional[torch.Tensor], s: int, e: int):
    return slice(s, e) if rows is None else rows[s:e]


def chunked_forward(hidden, weight, bias, labels, ignore_index, backend, chunk_rows):
    n = hidden.shape[0]
    v = weight.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    rows = scored_rows(labels, ignore_index) if n else None
    m = n if rows is None else rows.numel()
    if m == 0:
        return logp, lse
    w32, b32 = weight.to(torch.float32), _fp32(bias)
    buf = torch.empty((min(chunk_rows, m), v), dtype=torch.float32, device=hidden.device)
    for s in range(0, m, chunk_rows):
        e = min(m, s + chunk_rows)
        sel = _pick(rows, s, e)
        z = _chunk_logits(hidden[sel].to(torch.float32), w32, b32, buf[: e - s])
        if rows is None:
            _row_forward(backend, z, labels[sel], ignore_index, logp[sel], lse[sel])
        else:
            part_logp, part_lse = logp.new_empty(e - s), lse.new_empty(e - s)
            _row_forward(backend, z, labels[sel], ignore_index, part_logp, part_lse)
            logp.index_copy_(0, sel, part_logp)
            lse.index_copy_(0, sel, part_lse)
    return logp, lse


def chunked_backward(grad, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows,
                     need_dx, need_dw, need_db):
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dx = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need_db else None
    rows = scored_rows(labels, ignore_index) if n else None
    m = n if rows is None else rows.numel()
    if m == 0:
        return dx, dw, db
    w32, b32 = weight.to(torch.float32), _fp32(bias)
    buf = torch.empty((min(chunk_rows, m), v), dtype=torch.float32, device=dev)
    for s in range(0, m, chunk_rows):
        e = min(m, s + chunk_rows)
        sel = _pick(rows, s, e)
        x = hidden[sel].to(torch.float32)
        z = _chunk_logits(x, w32, b32, buf[: e - s])
        _row_backward_inplace(backend, grad[sel].contiguous(), z, labels[sel], ignore_index, lse[sel].contiguous())
        if need_dx:
            if rows is None:
                torch.mm(z, w32, out=dx[sel])
            else:
                dx.index_copy_(0, sel, torch.mm(z, w32))
        if need_dw:
            dw.addmm_(z.t(), x)
        if need_db:
            db.add_(z.sum(dim=0))
    return dx, dw, db


def _tile_forward(hidden, weight, bias, labels, ignore_index):
    """Triton tile forward on the scored rows only (scattered back; ignored rows give logp 0, lse 0)."""
    launch = triton_kernels("linear_logprobs").linear_lse_forward
    # under CUDA graph capture every row goes through (selecting rows would sync); ignored rows still give 0
    capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
    rows = scored_rows(labels, ignore_index) if hidden.shape[0] and not capturing else None
    if rows is None:
        return launch(hidden, weight, bias, labels, ignore_index)
    logp_s, lse_s = launch(hidden.index_select(0, rows), weight, bias, labels[rows], ignore_index)
    n = hidden.shape[0]
    logp = hidden.new_zeros(n, dtype=torch.float32).index_copy_(0, rows, logp_s)
    lse = hidden.new_zeros(n, dtype=torch.float32).index_copy_(0, rows, lse_s)
    return logp, lse


def _uses_tile_backward(backend: str, deterministic: bool) -> bool:
    return backend == "triton" and not deterministic


@torch.library.custom_op("prefkern::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int, backend: str, chunk_rows: int, deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw op: ``(logp [N], lse [N])`` fp32. ``backend``: auto, native, triton or cuda (torch row
    kernels on chunks when ``auto`` finds neither)."""
    backend = resolve_backend(backend, hidden.device, "linear_logprobs")
    # the chunked path selects scored rows with a host sync anyway; the Triton tile forward skips both under capture
    check_labels_in_range(labels, weight.shape[0], ignore_index, kernels_guard=backend == "triton")
    if backend == "triton":
        return _tile_forward(hidden, weight, bias, labels, ignore_index)
    return chunked_forward(hidden, weight, bias, labels, ignore_index, backend, chunk_rows)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, backend, chunk_rows, deterministic):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("prefkern::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, backend: str, chunk_rows: int,
    deterministic: bool, need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op: ``(dX, dW, db)`` in the dtypes of hidden, weight and bias; an empty tensor where not needed."""
    backend = resolve_backend(backend, hidden.device, "linear_logprobs")
    if _uses_tile_backward(backend, deterministic):
        dx, dw, db = triton_kernels("linear_logprobs").linear_lse_backward(
            grad, hidden, weight, bias, labels, lse, ignore_index, need_dx, need_dw, need_db)
    else:
        dx, dw, db = chunked_backward(grad, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows,
                                      need_dx, need_dw, need_db)
    return (
        dx.to(hidden.dtype) if dx is not None else hidden.new_empty(0),
        dw.to(weight.dtype) if dw is not None else hidden.new_empty(0),
        db.to(bias.dtype) if db is not None else hidden.new_empty(0),
    )


@linear_logprobs_bwd.register_fake
def _(grad, hidden, weight, bias, labels, lse, ignore_index, backend, chunk_rows, deterministic, need_dx, need_dw, need_db):
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dx else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else hidden.new_empty(0),
        torch.empty_like(bias) if need_db and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, backend, chunk_rows, deterministic = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.options = (ignore_index, backend, chunk_rows, deterministic)


def _backward(ctx, grad_logp, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (need_dx or need_dw or need_db):
        return None, None, None, None, None, None, None, None
    dx, dw, db = linear_logprobs_bwd(grad_logp.to(torch.float32).contiguous(), hidden, weight, bias, labels, lse,
                                     *ctx.options, need_dx, need_dw, need_db and bias is not None)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None, None)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


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
) -> torch.Tensor:
    """Token log-probs ``log_softmax(hidden @ weight.T + bias)[..., labels]`` without the logits tensor.

    Parameters
    ----------
    hidden : [..., H] float32 / bfloat16 / float16 (float64 on the torch backend, for gradcheck).
    weight : [V, H], same dtype as ``hidden`` (the lm-head).
    labels : [...] int64/int32, the leading shape of ``hidden``; entries in ``[0, V)`` or ``ignore_index``.
    bias : [V] or None.
    shift : 0 when labels are aligned with hidden positions; 1 for causal-LM labels (position t is
        scored against ``labels[..., t + 1]``; the last position of each row gives 0).
    mode : ``"auto"`` or ``"stream"``: the op never holds more than one chunk of logits (``chunk_rows``
        x V fp32: about 32 MB on the CPU and 128 MB on a GPU by default; the Triton forward holds only
        register tiles). Prompt and padding rows (``ignore_index``) never reach a GEMM. The ``"eager"`` trade
        (gradient inside forward) needs the loss and lives in :class:`prefkern.FusedLinearPreferenceLoss`.
    backend : ``"auto"`` (Triton tiles on CUDA, native chunks on CPU; torch row ops on chunks, with a
        warning, when neither can run), ``"native"``, ``"triton"``, ``"cuda"`` (CUDA C++ row kernels on
        cuBLAS chunks) or ``"torch"`` (the materialised reference).
    chunk_rows : tokens per chunk on the chunked paths (default: a 32 MB fp32 buffer).
    deterministic : ``True`` (default): the backward recomputes the logits chunk by chunk through the
        GEMM (cuBLAS / BLAS), forms the logit gradient in place with the row kernel and takes dX and dW
        with two more GEMMs: bit-reproducible, at the cost of one ``chunk_rows x V`` fp32 buffer.
        ``False`` (Triton only): the fused tile backward, nothing of size V in memory, but dX and dW
        are summed with fp32 atomics, so their last bits vary from run to run, and the atomic traffic
        (about N H V / 128 + V H N / 64 adds) probably bounds it on a real GPU (not measured).

    Returns
    -------
    [...] float32 tensor (labels' shape), differentiable w.r.t. hidden, weight and bias for any
    upstream gradient. No dW/db work is done when weight/bias do not require grad; no state is
    saved under ``torch.no_grad()`` (a reference pass costs one matmul unit). Labels out of range
    raise ``ValueError``; that check and the selection of scored rows cost a host sync or two per
    call on a GPU.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        check_tensor(name, t)
    allowed = FLOAT_DTYPES + (torch.float64,)
    check_float("hidden", hidden, allowed)
    check_index("labels", labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must have shape [..., H] with H = {weight.shape[1]} (weight is [V, H]), got {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(labels.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if weight.shape[0] == 0:
        raise ValueError("weight must have V > 0 rows")
    if mode not in ("auto", "stream", "eager"):
        raise ValueError(f"mode must be 'auto', 'stream' or 'eager', got {mode!r}")
    if mode == "eager":
        raise ValueError("mode='eager' computes the gradient inside forward and needs the loss: use "
                         "prefkern.FusedLinearPreferenceLoss(mode='eager'); linear_logprobs streams")
    if not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")

    lead = labels.shape
    labels = shift_labels(labels.to(torch.int64), shift, ignore_index).reshape(-1).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if hidden.dtype == torch.float64:
        if backend not in ("auto", "torch"):
            raise TypeError(f"float64 inputs run on the 'torch' backend only, not {backend!r}")
        backend = "torch"
    if backend == "torch":
        check_labels_in_range(labels, weight.shape[0], ignore_index)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return reference.linear_logprobs(h2, weight, labels, bias, ignore_index, compute_dtype=dtype).reshape(lead)
    rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
    logp, _ = linear_logprobs_fwd(h2, weight, bias, labels, ignore_index, backend, rows, bool(deterministic))
    return logp.reshape(lead)
