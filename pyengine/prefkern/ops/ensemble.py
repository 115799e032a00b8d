"""Raw ensemble ops: ``prefkern::ensemble_reduce_fwd`` and ``prefkern::ensemble_head_fwd``.

Both return fp32 (float64 for float64 inputs on the torch backend). Their backward is shared: the
gradient reaching the member scores through the reduction (``_members_grad``) is a few [K, N] torch
ops; the head's weight/hidden gradients (``prefkern::ensemble_head_bwd``) are one native pass over the
scored rows on the CPU and two small GEMMs on the gathered last-token rows elsewhere.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .. import reference
from ..dispatch import resolve_backend
from ._backends import cuda_stream, dtype_code, native_module, triton_kernels

METHODS = ("mean", "wco", "uwo")  # index = method code of the kernels


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _on_device(t: torch.Tensor):
    """Runs a launch under ``t``'s CUDA device (its stream and context), not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _unaliased(outs) -> tuple:
    """Custom ops may not return one tensor twice (the reference's combined *is* its mean for "mean")."""
    seen, res = set(), []
    for t in outs:
        res.append(t.clone() if id(t) in seen else t)
        seen.add(id(t))
    return tuple(res)


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: {what} is NaN or Inf at index {idx} ({t[tuple(idx)].item()})")


# ---- reduction ------------------------------------------------------------------------------------


@torch.library.custom_op("prefkern::ensemble_reduce_fwd", mutates_args=())
def ensemble_reduce_fwd(
    scores: torch.Tensor, mu: Optional[torch.Tensor], sigma: Optional[torch.Tensor],
    method: int, lam: float, ddof: int, check_finite: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op: ``(combined, mean, var)`` [N] of ``scores`` [K, N] (unit column stride). A NaN member
    makes all three NaN for its sample on every backend."""
    if check_finite:
        _check_finite("ensemble_reduce", scores, "scores")
    return _launch_reduce(resolve_backend(backend, scores.device, "ensemble_reduce"), scores, mu, sigma, method,
                          lam, ddof)


def _launch_reduce(
    chosen: str, scores: torch.Tensor, mu: Optional[torch.Tensor], sigma: Optional[torch.Tensor], method: int,
    lam: float, ddof: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one backend ladder of ``ensemble_reduce_fwd``."""
    if chosen == "torch":
        return _unaliased(reference.ensemble_reduce(scores, METHODS[method], lam, ddof, mu, sigma, _compute_dtype(scores)))
    with _on_device(scores):
        if chosen == "triton":
            return triton_kernels("ensemble").ensemble_reduce(scores, mu, sigma, method, lam, ddof)
        k, n = scores.shape
        out = [torch.empty(n, dtype=torch.float32, device=scores.device) for _ in range(3)]
        args = (scores.data_ptr(), dtype_code(scores), k, n, scores.stride(0), _ptr(mu), _ptr(sigma), method, lam,
                ddof, *(t.data_ptr() for t in out))
        if chosen == "cuda":
            native_module().ensemble_reduce_cuda(*args, cuda_stream(scores))
        else:
            native_module().ensemble_reduce_cpu(*args)
        return tuple(out)


@ensemble_reduce_fwd.register_fake
def _(scores, mu, sigma, method, lam, ddof, check_finite, backend):
    n = scores.shape[1]
    return tuple(scores.new_empty(n, dtype=_compute_dtype(scores)) for _ in range(3))


def _members_grad(
    scores: torch.Tensor, mu: Optional[torch.Tensor], sigma: Optional[torch.Tensor], method: int, lam: float,
    ddof: int, g_combined: Optional[torch.Tensor], g_mean: Optional[torch.Tensor], g_var: Optional[torch.Tensor],
) -> torch.Tensor:
    """d(loss)/d(raw member scores) [K, N] from the gradients of (combined, mean, var) [N] (None = zero)."""
    dtype = _compute_dtype(scores)
    s = scores.to(dtype)
    if mu is not None:
        s = (s - mu.to(dtype)[:, None]) / sigma.to(dtype)[:, None]
    k = s.shape[0]
    zero = s.new_zeros(s.shape[1])
    gc = zero if g_combined is None else g_combined.to(dtype)
    gm = zero if g_mean is None else g_mean.to(dtype)
    gv = zero if g_var is None else g_var.to(dtype)
    # d mean / d s_k = 1/K; d var / d s_k = 2 (s_k - mean) / (K - ddof) (the mean's own term sums to zero)
    if method == 0:
        gm = gm + gc
    elif method == 2:
        gm = gm + gc
        gv = gv - lam * gc
    dvar = 2.0 * (s - s.mean(dim=0)) / (k - ddof)
    grad = (gm / k)[None, :] + gv[None, :] * dvar
    if method == 1:  # the minimum passes its gradient to the first member that attains it
        grad = grad + torch.zeros_like(s).scatter_(0, s.argmin(dim=0, keepdim=True), gc[None, :])
    if sigma is not None:
        grad = grad / sigma.to(dtype)[:, None]
    return grad


def _reduce_setup_context(ctx, inputs, output):
    scores, mu, sigma, method, lam, ddof, _check, _backend = inputs
    ctx.save_for_backward(scores, mu, sigma)
    ctx.method, ctx.lam, ctx.ddof = method, lam, ddof


def _reduce_backward(ctx, g_combined, g_mean, g_var):
    scores, mu, sigma = ctx.saved_tensors
    grad = _members_grad(scores, mu, sigma, ctx.method, ctx.lam, ctx.ddof, g_combined, g_mean, g_var)
    return grad.to(scores.dtype), None, None, None, None, None, None, None


ensemble_reduce_fwd.register_autograd(_reduce_backward, setup_context=_reduce_setup_context)


# ---- fused head -----------------------------------------------------------------------------------


@torch.library.custom_op("prefkern::ensemble_head_fwd", mutates_args=())
def ensemble_head_fwd(
    hidden: torch.Tensor, last: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    mu: Optional[torch.Tensor], sigma: Optional[torch.Tensor], method: int, lam: float, ddof: int,
    check_finite: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op: ``(scores [K, B], combined [B], mean [B], var [B])`` of K heads on ``hidden[b, last[b]]``.

    ``hidden`` [B, T, H] and ``weight`` [K, H] share a dtype and have unit last-dimension stride;
    ``last`` [B] int64 in [0, T); ``bias``, ``mu``, ``sigma`` [K] in the compute dtype or None.
    """
    out = _launch_head_forward(resolve_backend(backend, hidden.device, "ensemble_head"), hidden, last, weight, bias,
                               mu, sigma, method, lam, ddof)
    if check_finite:
        _check_finite("EnsembleRewardHead", out[0], "the member score [k, b]")
    return tuple(out)


def _launch_head_forward(
    chosen: str, hidden: torch.Tensor, last: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    mu: Optional[torch.Tensor], sigma: Optional[torch.Tensor], method: int, lam: float, ddof: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one backend ladder of ``ensemble_head_fwd``."""
    if chosen == "torch":
        return _unaliased(reference.ensemble_head(hidden, last, weight, bias, METHODS[method], lam, ddof, mu, sigma,
                                                  _compute_dtype(hidden)))
    with _on_device(hidden):
        if chosen == "triton":
            return triton_kernels("ensemble").ensemble_head_forward(hidden, last, weight, bias, mu, sigma, method,
                                                                    lam, ddof)
        b, _, h = hidden.shape
        k = weight.shape[0]
        scores = torch.empty((k, b), dtype=torch.float32, device=hidden.device)
        rest = [torch.empty(b, dtype=torch.float32, device=hidden.device) for _ in range(3)]
        args = (hidden.data_ptr(), dtype_code(hidden), b, h, hidden.stride(0), hidden.stride(1), last.data_ptr(),
                weight.data_ptr(), k, weight.stride(0), _ptr(bias), _ptr(mu), _ptr(sigma), method, lam, ddof,
                scores.data_ptr(), *(t.data_ptr() for t in rest))
        if chosen == "cuda":
            native_module().ensemble_head_forward_cuda(*args, cuda_stream(hidden))
        else:
            native_module().ensemble_head_forward_cpu(*args)
        return (scores, *rest)


@ensemble_head_fwd.register_fake
def _(hidden, last, weight, bias, mu, sigma, method, lam, ddof, check_finite, backend):
    b, k, dtype = hidden.shape[0], weight.shape[0], _compute_dtype(hidden)
    return (hidden.new_empty((k, b), dtype=dtype), *(hidden.new_empty(b, dtype=dtype) for _ in range(3)))


@torch.library.custom_op("prefkern::ensemble_head_bwd", mutates_args=())
def ensemble_head_bwd(
    grad: torch.Tensor, hidden: torch.Tensor, last: torch.Tensor, weight: torch.Tensor, need_hidden: bool,
    need_weight: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw op: ``(grad_hidden [B, T, H] in hidden's dtype, grad_weight [K, H] in the compute dtype)`` from
    ``grad`` [K, B] = d loss / d raw scores; an output not asked for comes back as an empty tensor."""
    return _launch_head_backward(resolve_backend(backend, hidden.device, "ensemble_head"), grad, hidden, last,
                                 weight, need_hidden, need_weight)


def _launch_head_backward(
    chosen: str, grad: torch.Tensor, hidden: torch.Tensor, last: torch.Tensor, weight: torch.Tensor,
    need_hidden: bool, need_weight: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The one backend ladder of ``ensemble_head_bwd``: one native pass over the scored rows on the CPU,
    two small GEMMs on the gathered rows elsewhere (only ``hidden[b, last[b]]`` is ever read)."""
    b, _, h = hidden.shape
    k = weight.shape[0]
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    if chosen == "native":
        grad_weight = torch.empty((k, h), dtype=torch.float32) if need_weight else grad.new_empty(0)
        native_module().ensemble_head_backward_cpu(
            grad.data_ptr(), hidden.data_ptr(), dtype_code(hidden), b, h, hidden.stride(0), hidden.stride(1),
            last.data_ptr(), weight.data_ptr(), k, weight.stride(0), grad_hidden.data_ptr() if need_hidden else 0,
            grad_hidden.stride(0) if need_hidden else 0, grad_hidden.stride(1) if need_hidden else 0,
            grad_weight.data_ptr() if need_weight else 0,
        )
        return grad_hidden, grad_weight
    rows = torch.arange(b, device=hidden.device)
    if need_hidden:
        grad_hidden[rows, last] = (grad.t() @ weight.to(grad.dtype)).to(hidden.dtype)
    grad_weight = grad @ hidden[rows, last].to(grad.dtype) if need_weight else grad.new_empty(0)
    return grad_hidden, grad_weight


@ensemble_head_bwd.register_fake
def _(grad, hidden, last, weight, need_hidden, need_weight, backend):
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    gw = grad.new_empty(weight.shape) if need_weight else grad.new_empty(0)
    return gh, gw


def _head_setup_context(ctx, inputs, output):
    hidden, last, weight, bias, mu, sigma, method, lam, ddof, _check, backend = inputs
    scores = output[0]
    ctx.save_for_backward(hidden, last, weight, scores, mu, sigma)
    ctx.method, ctx.lam, ctx.ddof, ctx.has_bias, ctx.backend = method, lam, ddof, bias is not None, backend


def _head_backward(ctx, g_scores, g_combined, g_mean, g_var):
    hidden, last, weight, scores, mu, sigma = ctx.saved_tensors
    g = _members_grad(scores, mu, sigma, ctx.method, ctx.lam, ctx.ddof, g_combined, g_mean, g_var)
    if g_scores is not None:
        g = g + g_scores.to(g.dtype)
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden or need_weight:
        gh, gw = ensemble_head_bwd(g.contiguous(), hidden, last, weight, need_hidden, need_weight, ctx.backend)
        grad_hidden = gh if need_hidden else None
        grad_weight = gw.to(weight.dtype) if need_weight else None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = g.sum(dim=1)
    return grad_hidden, None, grad_weight, grad_bias, None, None, None, None, None, None, None


ensemble_head_fwd.register_autograd(_head_backward, setup_context=_head_setup_context)
