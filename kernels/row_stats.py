"""Per-row statistics of a softmax in one read of the row: entropy, log sum p^2, logit sum and top-1.

The eager DPO pass and ``linear_logprobs(return_stats=True)`` call it on each fp32 logits chunk, after the row
kernels have found every row's max m and log-sum log s (so no online rescaling is needed here: with
d = z * scale - m <= 0, p = exp(d - log s)). Per-lane accumulators across the row, one reduction at the end; the
row is peeled for 16-byte loads as in :mod:`.logprobs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprobs import edge_cols, row_split


@triton.jit
def _accumulate(acc, x, cols, ok, m, log_s, scale):
    pd, p2, zsum, best, best_idx = acc
    zs = x * scale
    d = zs - m
    # p * d is 0 * -inf = NaN for a -inf logit: such entries add nothing
    live = ok & (zs > -float("inf"))
    pd += tl.where(live, tl.exp(d - log_s) * d, 0.0)
    p2 += tl.where(live, tl.exp(2.0 * d), 0.0)
    zsum += tl.where(ok, x, 0.0)
    # the lowest column among the maxima, whatever order the columns come in; NaN counts as the maximum, as in
    # torch.argmax
    nan, best_nan = zs != zs, best != best
    lower = cols < best_idx
    take = ok & tl.where(nan, ~best_nan | lower, (zs > best) | ((zs == best) & lower))
    best = tl.where(take, zs, best)
    best_idx = tl.where(take, cols, best_idx)
    return pd, p2, zsum, best, best_idx


@triton.heuristics({"VEC": lambda args: 16 // args["z_ptr"].element_size()})
@triton.jit
def _row_stats_kernel(
    # pointers
    z_ptr, lse_ptr, labels_ptr, out_ptr,
    # shapes
    V,
    # strides
    stride_z_n,
    # scalars
    ignore_index, scale,
    # meta
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(lse_ptr + 2 * row)
    log_s = tl.load(lse_ptr + 2 * row + 1)
    y = tl.load(labels_ptr + row)
    start = row * stride_z_n
    head, n_body = row_split(start, V, VEC)
    acc = (tl.zeros([BLOCK_V], dtype=tl.float32), tl.zeros([BLOCK_V], dtype=tl.float32),
           tl.zeros([BLOCK_V], dtype=tl.float32), tl.full([BLOCK_V], -float("inf"), tl.float32),
           tl.full([BLOCK_V], 2147483647, tl.int32))
    body_ptr = z_ptr + tl.multiple_of(start + head, VEC)
    for v0 in range(0, n_body, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < n_body
        acc = _accumulate(acc, tl.load(body_ptr + offs, mask=ok, other=0.0), head + offs, ok, m, log_s, scale)
    pd, p2, zsum, best, best_idx = acc
    # the head and the tail of the row (fewer than VEC elements each), folded into the lanes' totals
    cols, ok = edge_cols(head, n_body, V, VEC)
    epd, ep2, ezsum, ebest, ebest_idx = _accumulate(
        (tl.zeros([2 * VEC], dtype=tl.float32), tl.zeros([2 * VEC], dtype=tl.float32),
         tl.zeros([2 * VEC], dtype=tl.float32), tl.full([2 * VEC], -float("inf"), tl.float32),
         tl.full([2 * VEC], 2147483647, tl.int32)),
        tl.load(z_ptr + start + cols, mask=ok, other=0.0), cols.to(tl.int32), ok, m, log_s, scale)
    any_nan = (tl.sum((best != best).to(tl.int32), axis=0) + tl.sum((ebest != ebest).to(tl.int32), axis=0)) > 0
    top = tl.maximum(tl.max(best, axis=0), tl.max(ebest, axis=0))
    at_top = tl.where(any_nan, best != best, best == top)
    e_at_top = tl.where(any_nan, ebest != ebest, ebest == top)
    arg = tl.minimum(tl.min(tl.where(at_top, best_idx, 2147483647), axis=0),
                     tl.min(tl.where(e_at_top, ebest_idx, 2147483647), axis=0))
    scored = y != ignore_index
    entropy = log_s - (tl.sum(pd, axis=0) + tl.sum(epd, axis=0))
    log_sum_p2 = tl.log(tl.sum(p2, axis=0) + tl.sum(ep2, axis=0)) - 2.0 * log_s
    logit_sum = (tl.sum(zsum, axis=0) + tl.sum(ezsum, axis=0)) * scale
    top1 = tl.where(arg.to(tl.int64) == y, 1.0, 0.0)
    out = out_ptr + 4 * row
    tl.store(out, tl.where(scored, entropy, 0.0))
    tl.store(out + 1, tl.where(scored, log_sum_p2, 0.0))
    tl.store(out + 2, tl.where(scored, logit_sum, 0.0))
    tl.store(out + 3, tl.where(scored, top1, 0.0))


def launch_config(vocab: int) -> dict:
    """Meta-parameters of the launch for a vocabulary of ``vocab`` (the compile tests use this too). No FMA
    contraction: ``z * scale - m`` sees z rounded as the row kernels rounded it for m."""
    return {"BLOCK_V": max(16, min(2048, triton.next_power_of_2(max(vocab, 1)))), "num_warps": 8,
            "enable_fp_fusion": False}


def row_stats(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, scale: float, ignore_index: int,
              out: torch.Tensor) -> torch.Tensor:
    """Writes ``out`` [k, 4] fp32 (entropy, log sum p^2, sum of the scaled logits, label == argmax) for ``z``
    [k, V] fp32 with unit column stride, ``lse`` [k, 2] (each row's max and log-sum of ``z * scale``), ``labels``
    [k] int64; 0 on rows labelled ``ignore_index``."""
    k, v = z.shape
    if k > 0:
        _row_stats_kernel[(k,)](z, lse, labels, out, v, z.stride(0), ignore_index, scale, **launch_config(v))
    return out


TRITON_KERNELS = {
    "row_stats": (
        _row_stats_kernel.fn,
        {"z_ptr": "*fp32", "lse_ptr": "*fp32", "labels_ptr": "*i64", "out_ptr": "*fp32", "V": "i32",
         "stride_z_n": "i64", "ignore_index": "i64", "scale": "fp32", "BLOCK_V": "constexpr", "VEC": "constexpr"},
        {"BLOCK_V": 2048, "VEC": 4},
    ),
}
