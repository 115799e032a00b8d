"""Ensemble reward scoring: K reward heads on the last real token plus the ensemble reduction, one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prefkern.dispatch import triton_interpreting

MAX_MEMBERS = 256


@triton.jit
def _combine(s, kmask, K, lam, inv_dof, METHOD: tl.constexpr):
    """(combined, mean, var) over axis 1 of the [BLOCK_N, BLOCK_K] member scores ``s`` (columns kmask)."""
    mean = tl.sum(tl.where(kmask, s, 0.0), axis=1) / K
    d = tl.where(kmask, s - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) * inv_dof
    if METHOD == 0:
        combined = mean
    elif METHOD == 1:
        # tl.min drops NaN on the GPU: a NaN member must make the minimum NaN (it would win best-of-n)
        lo = tl.min(tl.where(kmask, s, float("inf")), axis=1)
        has_nan = tl.max(tl.where(kmask & (s != s), 1, 0), axis=1) > 0
        combined = tl.where(has_nan, mean, lo)  # the mean of a column holding NaN is NaN
    else:
        combined = mean - lam * var
    return combined, mean, var


@triton.jit
def _normalize(s, ks, kmask, mu_ptr, sigma_ptr, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        mu = tl.load(mu_ptr + ks, mask=kmask, other=0.0)
        sigma = tl.load(sigma_ptr + ks, mask=kmask, other=1.0)
        s = (s - mu[None, :]) / sigma[None, :]
    return s


@triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})
@triton.jit
def _ensemble_head_forward_kernel(
    # pointers
    hidden_ptr, last_ptr, weight_ptr, bias_ptr, mu_ptr, sigma_ptr, scores_ptr, combined_ptr, mean_ptr, var_ptr,
    # shapes
    B, H, K,
    # strides
    stride_hidden_b, stride_hidden_t, stride_weight_k,
    # scalars
    lam, inv_dof,
    # meta
    METHOD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    last = tl.load(last_ptr + rows, mask=row_mask, other=0)
    x_ptrs = hidden_ptr + (rows.to(tl.int64) * stride_hidden_b + last.to(tl.int64) * stride_hidden_t)[:, None]
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    w_ptrs = weight_ptr + (ks.to(tl.int64) * stride_weight_k)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        if EVEN_H:
            x = tl.load(x_ptrs + hs[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs + hs[None, :], mask=kmask[:, None], other=0.0)
        else:
            hmask = hs < H
            x = tl.load(x_ptrs + hs[None, :], mask=row_mask[:, None] & hmask[None, :], other=0.0)
            w = tl.load(w_ptrs + hs[None, :], mask=kmask[:, None] & hmask[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            # bf16/fp16 products are exact in fp32, accumulation is fp32: tensor cores lose nothing here
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ks, mask=kmask, other=0.0)[None, :]
    out_mask = row_mask[:, None] & kmask[None, :]
    tl.store(scores_ptr + ks.to(tl.int64)[None, :] * B + rows[:, None], acc, mask=out_mask)
    s = _normalize(acc, ks, kmask, mu_ptr, sigma_ptr, HAS_NORM)
    combined, mean, var = _combine(s, kmask[None, :], K, lam, inv_dof, METHOD)
    tl.store(combined_ptr + rows, combined, mask=row_mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(var_ptr + rows, var, mask=row_mask)


@triton.jit
def _ensemble_reduce_kernel(
    # pointers
    scores_ptr, mu_ptr, sigma_ptr, combined_ptr, mean_ptr, var_ptr,
    # shapes
    N, K,
    # strides
    stride_scores_k,
    # scalars
    lam, inv_dof,
    # meta
    METHOD: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    ptrs = scores_ptr + ks.to(tl.int64)[None, :] * stride_scores_k + cols[:, None]
    s = tl.load(ptrs, mask=col_mask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    s = _normalize(s, ks, kmask, mu_ptr, sigma_ptr, HAS_NORM)
    combined, mean, var = _combine(s, kmask[None, :], K, lam, inv_dof, METHOD)
    tl.store(combined_ptr + cols, combined, mask=col_mask)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, var, mask=col_mask)


def _outputs(n: int, device: torch.device):
    return tuple(torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))


def ensemble_head_forward(
    hidden: torch.Tensor, last: torch.Tensor, weight: torch.Tensor, bias, mu, sigma,
    method: int, lam: float, ddof: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw scores [K, B] and (combined, mean, var) [B], fp32. ``hidden`` [B, T, H] and ``weight`` [K, H]
    share a dtype and have unit last-dimension stride; ``last`` [B] int64; bias/mu/sigma [K] fp32 or None."""
    b, _, h = hidden.shape
    k = weight.shape[0]
    if k > MAX_MEMBERS:
        raise ValueError(f"the Triton ensemble kernels take at most {MAX_MEMBERS} members, got {k}")
    scores = torch.empty((k, b), dtype=torch.float32, device=hidden.device)
    combined, mean, var = _outputs(b, hidden.device)
    if b == 0:
        return scores, combined, mean, var
    block_k = max(16, triton.next_power_of_2(k))
    block_h = max(16, min(128 if block_k <= 32 else 32, triton.next_power_of_2(h)))
    dummy = scores
    _ensemble_head_forward_kernel[(triton.cdiv(b, 16),)](
        hidden, last, weight, dummy if bias is None else bias, dummy if mu is None else mu,
        dummy if sigma is None else sigma, scores, combined, mean, var,
        b, h, k, hidden.stride(0), hidden.stride(1), weight.stride(0), lam, 1.0 / (k - ddof),
        METHOD=method, HAS_BIAS=bias is not None, HAS_NORM=mu is not None,
        DOT_IN_FP32=hidden.dtype == torch.float32 or triton_interpreting(),
        BLOCK_N=16, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=4, enable_fp_fusion=True,
    )
    return scores, combined, mean, var


def ensemble_reduce(
    scores: torch.Tensor, mu, sigma, method: int, lam: float, ddof: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(combined, mean, var) [N] fp32 of ``scores`` [K, N] (unit column stride); mu/sigma [K] fp32 or None."""
    k, n = scores.shape
    if k > MAX_MEMBERS:
        raise ValueError(f"the Triton ensemble kernels take at most {MAX_MEMBERS} members, got {k}")
    combined, mean, var = _outputs(n, scores.device)
    if n == 0:
        return combined, mean, var
    block_k = max(2, triton.next_power_of_2(k))  # a size-1 axis does not reduce to a vector in Triton
    block_n = max(16, min(256, 4096 // block_k))
    _ensemble_reduce_kernel[(triton.cdiv(n, block_n),)](
        scores, combined if mu is None else mu, combined if sigma is None else sigma, combined, mean, var,
        n, k, scores.stride(0), lam, 1.0 / (k - ddof),
        METHOD=method, HAS_NORM=mu is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        enable_fp_fusion=True,
    )
    return combined, mean, var


_HEAD_SIG = {
    "hidden_ptr": "*bf16", "last_ptr": "*i64", "weight_ptr": "*bf16", "bias_ptr": "*fp32", "mu_ptr": "*fp32",
    "sigma_ptr": "*fp32", "scores_ptr": "*fp32", "combined_ptr": "*fp32", "mean_ptr": "*fp32", "var_ptr": "*fp32",
    "B": "i32", "H": "i32", "K": "i32", "stride_hidden_b": "i64", "stride_hidden_t": "i64",
    "stride_weight_k": "i64", "lam": "fp32", "inv_dof": "fp32",
    "METHOD": "constexpr", "HAS_BIAS": "constexpr", "HAS_NORM": "constexpr", "DOT_IN_FP32": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_H": "constexpr", "EVEN_H": "constexpr",
}
_HEAD_META = {"HAS_BIAS": True, "HAS_NORM": True, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_H": 128, "EVEN_H": False}

TRITON_KERNELS = {
    "ensemble_head_forward_bf16_tensorcore": (
        _ensemble_head_forward_kernel.fn, _HEAD_SIG, {**_HEAD_META, "METHOD": 2, "DOT_IN_FP32": False},
    ),
    "ensemble_head_forward_fp32": (
        _ensemble_head_forward_kernel.fn,
        {**_HEAD_SIG, "hidden_ptr": "*fp32", "weight_ptr": "*fp32"},
        {**_HEAD_META, "METHOD": 1, "DOT_IN_FP32": True},
    ),
    "ensemble_reduce": (
        _ensemble_reduce_kernel,  # a plain JITFunction: no heuristics wrapper to unwrap
        {"scores_ptr": "*fp32", "mu_ptr": "*fp32", "sigma_ptr": "*fp32", "combined_ptr": "*fp32",
         "mean_ptr": "*fp32", "var_ptr": "*fp32", "N": "i32", "K": "i32", "stride_scores_k": "i64",
         "lam": "fp32", "inv_dof": "fp32", "METHOD": "constexpr", "HAS_NORM": "constexpr",
         "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
        {"METHOD": 2, "HAS_NORM": True, "BLOCK_N": 256, "BLOCK_K": 8},
    ),
}
