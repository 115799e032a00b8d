"""Token log-probs straight from hidden states and the lm-head: ``z = x W^T (+ b)`` is formed tile by
tile and never written. Forward: an online log-sum-exp per token over vocabulary tiles, the vocabulary
split across programs and the partial (max, sum) pairs merged on the host side. Backward (opt-in,
``deterministic=False``): each (token block, vocabulary block) program recomputes its tile, forms
``dz = g (onehot - softmax)`` and adds ``dz W`` into dX and ``dz^T X`` into dW with fp32 atomics --
about N H V / 128 + V H N / 64 atomic adds, which likely bound it on a real GPU (unmeasured)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _logit_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H,
                stride_xn, stride_xh, stride_wv, stride_wh,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        xt = tl.load(x_ptr + offs_n[:, None].to(tl.int64) * stride_xn + offs_h[None, :] * stride_xh,
                     mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_h[None, :] * stride_wh,
                     mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_lse_forward_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, labels_ptr, part_m_ptr, part_s_ptr, part_zy_ptr,
    # shapes
    N, V, H, V_PER_SPLIT,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh,
    # scalars
    ignore_index,
    # meta
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    m = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(V, v_start + V_PER_SPLIT)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logit_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_xn, stride_xh,
                        stride_wv, stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
        z = tl.where(mask_v[None, :], z, -float("inf"))
        new_m = tl.maximum(m, tl.max(z, axis=1))
        tile_s = tl.sum(tl.exp(z - new_m[:, None]), axis=1)
        s = tl.where(new_m == -float("inf"), 0.0, s * tl.exp(m - new_m) + tile_s)
        m = new_m
        zy += tl.sum(tl.where(offs_v[None, :].to(tl.int64) == y[:, None], z, 0.0), axis=1)
    out = split.to(tl.int64) * N + offs_n
    tl.store(part_m_ptr + out, m, mask=mask_n)
    tl.store(part_s_ptr + out, s, mask=mask_n)
    tl.store(part_zy_ptr + out, zy, mask=mask_n)


@triton.jit
def _linear_lse_backward_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr,
    # shapes
    N, V, H,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dxn, stride_dwv,
    # scalars
    ignore_index,
    # meta
    HAS_BIAS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    live = mask_n & (y != ignore_index)
    g = tl.where(live, g, 0.0)
    # Token blocks with no gradient (prompt or padding positions) cost nothing; NaN counts as work.
    g_max = tl.max(tl.where(g == g, tl.abs(g), float("inf")), axis=0)
    if g_max > 0:
        m = tl.load(lse_ptr + 2 * offs_n, mask=mask_n, other=0.0)
        log_s = tl.load(lse_ptr + 2 * offs_n + 1, mask=mask_n, other=0.0)
        z = _logit_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_xn, stride_xh,
                        stride_wv, stride_wh, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
        p = tl.exp((z - m[:, None]) - log_s[:, None])
        onehot = tl.where(offs_v[None, :].to(tl.int64) == y[:, None], 1.0, 0.0)
        # ignored rows carry m = log s = 0, so their p may be inf and g * p NaN: select 0, never multiply by 0
        dz = tl.where(live[:, None] & mask_v[None, :], g[:, None] * (onehot - p), 0.0)
        if COMPUTE_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
        # Half-precision dot operands: divide dz by a power of two near max|g| first, so that fp16 keeps
        # the small entries (|g p| can sit below fp16's range); multiply the products back. Exact scaling.
        g_scale = tl.exp2(tl.ceil(tl.log2(tl.minimum(g_max, 1.0e38))))
        if UPCAST:
            dz_op = dz
            g_scale = 1.0
        else:
            dz_op = (dz / g_scale).to(x_ptr.dtype.element_ty)
        # dX and dW in two sweeps over H, not one: one accumulator tile live at a time (a single sweep held
        # both and sat at 254 of sm_80's 255 registers)
        if COMPUTE_DX:
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                wt = tl.load(w_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_h[None, :] * stride_wh,
                             mask=mask_v[:, None] & mask_h[None, :], other=0.0)
                if UPCAST:
                    wt = wt.to(tl.float32)
                dx = tl.dot(dz_op, wt, input_precision=DOT_PRECISION) * g_scale
                tl.atomic_add(dx_ptr + offs_n[:, None].to(tl.int64) * stride_dxn + offs_h[None, :], dx,
                              mask=mask_n[:, None] & mask_h[None, :], sem="relaxed")
        if COMPUTE_DW:
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                xt = tl.load(x_ptr + offs_n[:, None].to(tl.int64) * stride_xn + offs_h[None, :] * stride_xh,
                             mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), xt, input_precision=DOT_PRECISION) * g_scale
                tl.atomic_add(dw_ptr + offs_v[:, None].to(tl.int64) * stride_dwv + offs_h[None, :], dw,
                              mask=mask_v[:, None] & mask_h[None, :], sem="relaxed")


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def launch_config(dtype: torch.dtype, on_gpu: bool) -> dict:
    """Meta-parameters of both tile kernels (the compile tests use this too). Under the CPU interpreter:
    small tiles in fp32 (it gets half-precision dot products wrong). On a GPU: MMA-sized tiles; fp32
    inputs keep full fp32 products (TF32 would change the numbers), half inputs use tensor cores."""
    if not on_gpu:
        return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16, "DOT_PRECISION": "ieee", "UPCAST": True,
                "num_warps": 4, "num_stages": 1, "enable_fp_fusion": True}
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32", "UPCAST": False,
            "num_warps": 8, "num_stages": 3, "enable_fp_fusion": True}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_lse_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], lse [N, 2])`` in fp32 for ``hidden`` [N, H], ``weight`` [V, H], ``bias`` [V] or None; ``lse``
    holds each row's log-sum-exp in two parts, the max m and log sum exp(z - m), for the backward."""
    n, h = hidden.shape
    v = weight.shape[0]
    config = launch_config(hidden.dtype, _on_gpu(hidden))
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    n_blocks = triton.cdiv(n, bn)
    splits = max(1, min(triton.cdiv(v, bv), triton.cdiv(2 * _sm_count(hidden.device), max(n_blocks, 1))))
    v_per_split = triton.cdiv(triton.cdiv(v, splits), bv) * bv
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty((3, splits, n), dtype=torch.float32, device=hidden.device)
    if n > 0:
        _linear_lse_forward_kernel[(n_blocks, splits)](
            hidden, weight, bias.contiguous() if bias is not None else hidden, labels, part[0], part[1], part[2],
            n, v, h, v_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ignore_index,
            HAS_BIAS=bias is not None, **config,
        )
    m, s, zy = part[0], part[1], part[2]
    top = m.max(dim=0).values
    safe_top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    log_s = torch.log((s * torch.exp(m - safe_top)).sum(dim=0))
    # (z_y - max) - log s, never z_y - lse: the rounding of lse is one ulp of |lse|
    logp = torch.where(labels == ignore_index, torch.zeros_like(log_s), (zy.sum(dim=0) - safe_top) - log_s)
    # an out-of-range label (unchecked under graph capture) matched no column: NaN, not -lse
    logp = torch.where((labels != ignore_index) & ((labels < 0) | (labels >= v)), torch.full_like(log_s, float("nan")),
                       logp)
    return logp, torch.stack([safe_top, log_s], dim=-1)


def linear_lse_backward(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, need_dx: bool, need_dw: bool, need_db: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """fp32 ``(dX [N, H], dW [V, H], db [V])`` for upstream ``grad`` [N] and the forward's ``lse`` [N, 2]; None
    where not needed."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dx = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_dx else None
    dw = torch.zeros((v, h), dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need_db else None
    if n == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    config = launch_config(hidden.dtype, _on_gpu(hidden))
    dummy = lse
    _linear_lse_backward_kernel[(triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(v, config["BLOCK_V"]))](
        hidden, weight, bias.contiguous() if bias is not None else hidden, labels, lse, grad,
        dx if need_dx else dummy, dw if need_dw else dummy, db if need_db else dummy,
        n, v, h,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        dx.stride(0) if need_dx else 0, dw.stride(0) if need_dw else 0,
        ignore_index,
        HAS_BIAS=bias is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db, **config,
    )
    return dx, dw, db


_COMMON = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "labels_ptr": "*i64", "N": "i32", "V": "i32",
           "H": "i32", "stride_xn": "i64", "stride_xh": "i64", "stride_wv": "i64", "stride_wh": "i64",
           "ignore_index": "i64"}
TRITON_KERNELS = {
    "linear_lse_forward": (
        _linear_lse_forward_kernel,
        {**_COMMON, "part_m_ptr": "*fp32", "part_s_ptr": "*fp32", "part_zy_ptr": "*fp32", "V_PER_SPLIT": "i32",
         "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr",
         "DOT_PRECISION": "constexpr", "UPCAST": "constexpr"},
        {"HAS_BIAS": True, "BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "DOT_PRECISION": "tf32", "UPCAST": False},
    ),
    "linear_lse_backward": (
        _linear_lse_backward_kernel,
        {**_COMMON, "lse_ptr": "*fp32", "g_ptr": "*fp32", "dx_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
         "stride_dxn": "i64", "stride_dwv": "i64", "HAS_BIAS": "constexpr", "COMPUTE_DX": "constexpr",
         "COMPUTE_DW": "constexpr", "COMPUTE_DB": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
         "BLOCK_H": "constexpr", "DOT_PRECISION": "constexpr", "UPCAST": "constexpr"},
        {"HAS_BIAS": True, "COMPUTE_DX": True, "COMPUTE_DW": True, "COMPUTE_DB": True, "BLOCK_N": 64,
         "BLOCK_V": 128, "BLOCK_H": 64, "DOT_PRECISION": "tf32", "UPCAST": False},
    ),
}
