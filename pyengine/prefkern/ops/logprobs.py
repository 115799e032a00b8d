"""``prefkern.logprobs``: token log-probs from logits, with a one-pass fused backward."""

from __future__ import annotations

from typing import Tuple

import torch

from .. import reference
from .._validation import FLOAT_DTYPES, check_float, check_labels_in_range, check_index, check_ndim, check_positive_finite, check_same_device, check_tensor
from ..dispatch import resolve_backend
from ._backends import cuda_stream, dtype_code, native_module, triton_kernels


def _torch_compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("prefkern::logprobs_fwd", mutates_args=())
def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw op: ``(logp [N], lse [N])`` in fp32. ``logits`` [N, V] has unit column stride; labels int64."""
    n, v = logits.shape
    scale = 1.0 / temperature
    chosen = resolve_backend(backend, logits.device, "logprobs")
    check_labels_in_range(labels, v, ignore_index, kernels_guard=chosen != "torch")
    if chosen == "torch":
        dtype = _torch_compute_dtype(logits)
        logp = reference.logprobs(logits, labels, ignore_index, temperature, compute_dtype=dtype)
        return logp, torch.logsumexp(logits.to(dtype) * scale, dim=-1)
    if chosen == "triton":
        return triton_kernels("logprobs").logprobs_forward(logits, labels, ignore_index, scale)
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    mod = native_module()
    args = (logits.data_ptr(), dtype_code(logits), n, v, logits.stride(0), labels.data_ptr(), ignore_index,
            scale, logp.data_ptr(), lse.data_ptr())
    if chosen == "native":
        mod.logprobs_forward_cpu(*args)
    else:
        mod.logprobs_forward_cuda(*args, cuda_stream(logits))
    return logp, lse


@logprobs_fwd.register_fake
def _(logits, labels, ignore_index, temperature, backend):
    n = logits.shape[0]
    dtype = _torch_compute_dtype(logits)
    return logits.new_empty(n, dtype=dtype), logits.new_empty(n, dtype=dtype)


@torch.library.custom_op("prefkern::logprobs_bwd", mutates_args=())
def logprobs_bwd(
    grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, temperature: float, backend: str,
) -> torch.Tensor:
    """Raw op: ``grad[n] * d logp[n] / d logits[n, :]`` as a new [N, V] tensor in the dtype of ``logits``."""
    n, v = logits.shape
    scale = 1.0 / temperature
    chosen = resolve_backend(backend, logits.device, "logprobs")
    if chosen == "torch":
        p = torch.exp(logits.to(_torch_compute_dtype(logits)) * scale - lse.unsqueeze(-1))
        ignored = labels == ignore_index
        onehot = torch.zeros_like(p).scatter_(-1, labels.masked_fill(ignored, 0).unsqueeze(-1), 1.0)
        g = (grad * scale).masked_fill(ignored, 0.0).unsqueeze(-1)
        return (g * (onehot - p)).to(logits.dtype)
    if chosen == "triton":
        return triton_kernels("logprobs").logprobs_backward(grad, logits, labels, lse, ignore_index, scale)
    out = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    mod = native_module()
    args = (grad.data_ptr(), logits.data_ptr(), dtype_code(logits), n, v, logits.stride(0), labels.data_ptr(),
            ignore_index, scale, lse.data_ptr(), out.data_ptr(), out.stride(0))
    if chosen == "native":
        mod.logprobs_backward_cpu(*args)
    else:
        mod.logprobs_backward_cuda(*args, cuda_stream(logits))
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
    log-sum-exp. Rows whose label is ``ignore_index`` give 0 and receive a zero gradient.

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
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    labels = labels.to(torch.int64).contiguous()
    if logits.dtype == torch.float64:
        if backend not in ("auto", "torch"):
            raise TypeError(f"float64 logits run on the 'torch' backend only, not {backend!r}")
        backend = "torch"
    logp, _ = logprobs_fwd(logits, labels, ignore_index, float(temperature), backend)
    return logp
