"""``prefkern.logprobs``: token log-probs from logits, with a one-pass fused backward."""

from __future__ import annotations

from typing import Tuple

import torch

from .._validation import (
    FLOAT_DTYPES, check_float, check_index, check_ignore_index, check_labels_in_range, check_ndim, check_positive_finite,
    check_same_device, check_tensor, float64_backend,
)
from ..dispatch import resolve_backend
from ._backends import cuda_stream, device_of, dtype_code, native_module, triton_kernels


def _torch_compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---- the row kernels: the one place that picks a kernel per backend --------------------------------------------


@torch.library.custom_op("prefkern::logprobs_rows", mutates_args=("logp", "lse"))
def logprobs_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float, backend: str,
                  logp: torch.Tensor, lse: torch.Tensor) -> None:
    """Row kernel: ``logp[n] = log_softmax(scale * logits[n])[labels[n]]`` (0 where ignored) into ``logp`` [N] and
    the row's log-sum-exp in two parts into ``lse`` [N, 2]: ``lse[n, 0] = m`` (the max of ``scale * logits[n]``)
    and ``lse[n, 1] = log sum_v exp(scale * logits[n, v] - m)``, fp32 (fp64 for fp64 logits on the torch backend).
    Their sum rounded to fp32 would be off by one ulp of ``|lse|``, and every softmax probability the backward
    forms from it by as much, relatively. ``logits`` [N, V] has unit column stride; ``labels`` int64;
    ``backend`` is a concrete backend (``torch``, ``triton``, ``native`` or ``cuda``). Used by the logprobs op,
    the chunked ``linear_logprobs`` paths and the fused-loss engine."""
    n, v = logits.shape
    if backend == "torch":
        z = logits.to(_torch_compute_dtype(logits)) * scale
        ignored = labels == ignore_index
        # the max and the log of the sum stay apart, and the max's own term (exactly 1) is taken out of the sum:
        # (z_y - m) - log1p(sum of the others) is exact to the log-prob's own rounding, not to one ulp of |lse|
        m = z.amax(dim=-1, keepdim=True)
        e = torch.exp(z - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        e.scatter_(-1, z.argmax(dim=-1, keepdim=True), 0.0)
        log_s = torch.log1p(e.sum(dim=-1))
        m = m.squeeze(-1)
        picked = z.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
        lse.copy_(torch.stack([m, log_s], dim=-1))
        logp.copy_(((picked - m) - log_s).masked_fill(ignored, 0.0))
        return
    with device_of(logits):
        if backend == "triton":
            lp, ls = triton_kernels("logprobs").logprobs_forward(logits, labels, ignore_index, scale)
            logp.copy_(lp)
            lse.copy_(ls)
            return
        args = (logits.data_ptr(), dtype_code(logits), n, v, logits.stride(0), labels.data_ptr(), ignore_index,
                scale, logp.data_ptr(), lse.data_ptr())
        if backend == "native":
            native_module().logprobs_forward_cpu(*args)
        else:
            native_module().logprobs_forward_cuda(*args, cuda_stream(logits))


@logprobs_rows.register_fake
def _(logits, labels, ignore_index, scale, backend, logp, lse):
    return None


@torch.library.custom_op("prefkern::logprobs_rows_grad", mutates_args=("out",))
def logprobs_rows_grad(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                       ignore_index: int, scale: float, backend: str, out: torch.Tensor) -> None:
    """Row kernel of the backward: ``out[n] = grad[n] * scale * (onehot(labels[n]) - softmax(scale * logits[n]))``
    (0 for ignored rows), the softmax as ``exp((scale * logits - m) - log s)`` from the forward's ``lse`` [N, 2].
    ``out`` [N, V] may be ``logits`` itself (in place, as the chunked paths use it) or a new tensor in any float
    dtype."""
    n, v = logits.shape
    if backend == "torch":
        dtype = _torch_compute_dtype(logits)
        ignored = labels == ignore_index
        parts = lse.to(dtype)
        p = torch.exp((logits.to(dtype) * scale - parts[:, :1]) - parts[:, 1:])
        g = (grad.to(dtype) * scale).masked_fill(ignored, 0.0).unsqueeze(-1)
        p.mul_(-g).scatter_add_(-1, labels.masked_fill(ignored, 0).unsqueeze(-1), g)
        out.copy_(p.masked_fill_(ignored.unsqueeze(-1), 0.0))  # exactly 0 for an ignored row, NaN logits or not
        return
    with device_of(logits):
        if backend == "triton":
            if out.data_ptr() == logits.data_ptr():
                triton_kernels("logprobs").logprobs_backward(grad, logits, labels, lse, ignore_index, scale, out=out)
            else:
                out.copy_(triton_kernels("logprobs").logprobs_backward(grad, logits, labels, lse, ignore_index, scale))
            return
        args = (grad.data_ptr(), logits.data_ptr(), dtype_code(logits), n, v, logits.stride(0), labels.data_ptr(),
                ignore_index, scale, lse.data_ptr(), out.data_ptr(), out.stride(0))
        if backend == "native":
            native_module().logprobs_backward_cpu(*args)
        else:
            native_module().logprobs_backward_cuda(*args, cuda_stream(logits))


@logprobs_rows_grad.register_fake
def _(grad, logits, labels, lse, ignore_index, scale, backend, out):
    return None


# ---- the public op ------------------------------------------------------------------------------------------------


@torch.library.custom_op("prefkern::logprobs_forward", mutates_args=())
def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw op: ``(logp [N], lse [N, 2])`` in fp32 (fp64 for fp64 logits); ``lse`` holds the row max and the log of
    the sum apart (:func:`logprobs_rows`). ``logits`` [N, V] has unit column stride; labels int64."""
    n, v = logits.shape
    chosen = resolve_backend(backend, logits.device, "logprobs")
    check_labels_in_range(labels, v, ignore_index, kernels_guard=chosen != "torch")
    dtype = _torch_compute_dtype(logits) if chosen == "torch" else torch.float32
    logp = torch.empty(n, dtype=dtype, device=logits.device)
    lse = torch.empty((n, 2), dtype=dtype, device=logits.device)
    logprobs_rows(logits, labels, ignore_index, 1.0 / temperature, chosen, logp, lse)
    return logp, lse


@logprobs_fwd.register_fake
def _(logits, labels, ignore_index, temperature, backend):
    n = logits.shape[0]
    dtype = _torch_compute_dtype(logits)
    return logits.new_empty(n, dtype=dtype), logits.new_empty((n, 2), dtype=dtype)


@torch.library.custom_op("prefkern::logprobs_backward", mutates_args=())
def logprobs_bwd(
    grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, temperature: float, backend: str,
) -> torch.Tensor:
    """Raw op: ``grad[n] * d logp[n] / d logits[n, :]`` as a new [N, V] tensor in the dtype of ``logits``."""
    chosen = resolve_backend(backend, logits.device, "logprobs")
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    logprobs_rows_grad(grad, logits, labels, lse, ignore_index, 1.0 / temperature, chosen, out)
    return out


@logprobs_bwd.register_fake
def _(grad, logits, labels, lse, ignore_index, temperature, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, temperature, backend = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index, ctx.temperature, ctx.backend = ignore_index, temperature, backend


def _backward(ctx, grad_logp, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_logits = logprobs_bwd(
        grad_logp.to(lse.dtype).contiguous(), logits, labels, lse, ctx.ignore_index, ctx.temperature, ctx.backend
    )
    return grad_logits, None, None, None, None


logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Token log-probs ``log_softmax(logits / temperature)[n, labels[n]]`` without a second [N, V] tensor.

    The forward reads each row once with an online log-sum-exp; the backward writes the gradient
    ``g[n] / T * (onehot(labels[n]) - softmax(logits[n] / T))`` in one pass from the saved
    log-sum-exp, its max and log-sum kept apart (the softmax keeps fp32 precision at any logit offset).
    Rows whose label is ``ignore_index`` give 0 and receive a zero gradient.

    Parameters
    ----------
    logits : [N, V] tensor, float32 / bfloat16 / float16 (float64 too, on the torch backend, for
        gradcheck). Rows may be strided (any row stride); a tensor whose last dimension is not
        contiguous is copied once.
    labels : [N] int64 or int32 tensor; each entry in ``[0, V)`` or equal to ``ignore_index``.
    ignore_index : label value that marks a position to skip.
    temperature : divides the logits before the softmax (> 0).
    backend : ``"auto"`` (Triton on CUDA, native C++ on CPU), ``"native"``, ``"triton"``, ``"cuda"``
        or ``"torch"`` (the plain-PyTorch reference).

    Returns
    -------
    [N] float32 tensor (float64 for float64 logits), differentiable with respect to ``logits``
    (first derivatives only).

    Raises
    ------
    TypeError for non-tensors or unsupported dtypes; ValueError for wrong shapes, tensors on
    different devices, a non-positive temperature or labels out of range (the range check reads
    the labels once: one host sync per call on a GPU). Under CUDA graph capture the check is skipped
    (a sync is not allowed there) and the prefkern kernels give NaN for an out-of-range label.
    """
    check_tensor("logits", logits)
    check_tensor("labels", labels)
    check_float("logits", logits, FLOAT_DTYPES + (torch.float64,))
    check_index("labels", labels)
    check_ndim("logits", logits, 2, "[N, V]")
    check_ndim("labels", labels, 1, "[N]")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape [N] = [{logits.shape[0]}] to match logits, got {tuple(labels.shape)}")
    if logits.shape[1] == 0 and logits.shape[0] > 0:
        raise ValueError("logits must have a vocabulary dimension V > 0")
    check_same_device(logits=logits, labels=labels)
    check_positive_finite("temperature", temperature)
    ignore_index = check_ignore_index(ignore_index)
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    labels = labels.to(torch.int64).contiguous()
    backend = float64_backend("logits", logits, backend)
    logp, _ = logprobs_fwd(logits, labels, ignore_index, float(temperature), backend)
    return logp
