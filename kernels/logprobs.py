"""Token log-probs from logits: an online log-sum-exp forward and a one-pass gradient backward.

Row loops are peeled for 16-byte loads: a row starting at element s = row * stride begins its aligned body
h = (-s) mod VEC elements in (VEC = 16 / element size, the base pointer taken as 16-byte aligned, as Triton
specialises it); the body [h, h + n_body), n_body a multiple of VEC, is read in tiles whose pointers and masks are
provably VEC-aligned, and the head [0, h) and the tail [h + n_body, V) (each < VEC elements) in one small block.
A misaligned base pointer gives the same results, with narrower loads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _vec(args, name):
    return 16 // args[name].element_size()


@triton.jit
def row_split(row_start, V, VEC: tl.constexpr):
    """(head, n_body): the row's first 16-byte boundary lies ``head`` elements in, its aligned body is
    [head, head + n_body) with n_body a multiple of VEC; [head + n_body, V) is the tail."""
    head = ((VEC - row_start % VEC) % VEC).to(tl.int32)
    head = tl.minimum(head, V)
    n_body = (V - head) // VEC * VEC
    return head, n_body


@triton.jit
def edge_cols(head, n_body, V, VEC: tl.constexpr):
    """Columns of the head [0, head) and of the tail [head + n_body, V) as one 2 * VEC block, and its mask."""
    j = tl.arange(0, 2 * VEC)
    cols = tl.where(j < VEC, j, head + n_body + (j - VEC))
    ok = tl.where(j < VEC, j < head, cols < V)
    return cols, ok


@triton.jit
def _lse_update(m, s, nan, z):
    # max on a GPU drops NaN, and an all -inf block resets the sum below: count NaN on its own
    nan += tl.sum((z != z).to(tl.int32), axis=0)
    new_m = tl.maximum(m, tl.max(z, axis=0))
    # a block (or prefix) of -inf logits leaves the sum at 0 instead of producing inf - inf
    s = tl.where(new_m == -float("inf"), 0.0, s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0))
    return new_m, s, nan


@triton.heuristics({"VEC": lambda args: _vec(args, "logits_ptr")})
@triton.jit
def _logprobs_forward_kernel(
    # pointers
    logits_ptr, labels_ptr, logp_ptr, lse_ptr,
    # shapes
    V,
    # strides
    stride_logits_n,
    # scalars
    ignore_index, scale,
    # meta
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    start = row * stride_logits_n
    row_ptr = logits_ptr + start
    head, n_body = row_split(start, V, VEC)
    cols, ok = edge_cols(head, n_body, V, VEC)
    z = tl.load(row_ptr + cols, mask=ok, other=-float("inf")).to(tl.float32) * scale
    m, s, nan = _lse_update(-float("inf"), 0.0, 0, z)
    body_ptr = logits_ptr + tl.multiple_of(start + head, VEC)
    for v0 in range(0, n_body, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(body_ptr + offs, mask=offs < n_body, other=-float("inf"))
        m, s, nan = _lse_update(m, s, nan, x.to(tl.float32) * scale)
    m = tl.where(nan > 0, float("nan"), m)
    log_s = tl.where(nan > 0, float("nan"), tl.log(s))
    y = tl.load(labels_ptr + row).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)  # out of range (unchecked under graph capture): NaN, never a stray read
    zy = tl.load(row_ptr + tl.where(valid & in_range, y, 0)).to(tl.float32) * scale
    # m and log s kept apart: the backward's exp((z - m) - log s) must not see the rounding of m + log s
    tl.store(lse_ptr + 2 * row, m)
    tl.store(lse_ptr + 2 * row + 1, log_s)
    # (z_y - m) - log s, never z_y - lse: the rounding of lse is one ulp of |lse|
    tl.store(logp_ptr + row, tl.where(valid, tl.where(in_range, (zy - m) - log_s, float("nan")), 0.0))


@triton.jit
def _grad_block(x, cols, y, gs, m, log_s, scale, ignored):
    p = tl.exp((x.to(tl.float32) * scale - m) - log_s)
    # an ignored row's gradient is exactly 0, whatever its logits hold (0 * NaN would be NaN)
    return tl.where(ignored, 0.0, gs * (tl.where(cols == y, 1.0, 0.0) - p))


@triton.heuristics({
    "VEC": lambda args: _vec(args, "logits_ptr"),
    # out at the same element offsets as logits (in place, or the same layout): its body stores are aligned too
    "SAME_LAYOUT": lambda args: args["stride_logits_n"] == args["stride_grad_logits_n"]
    and args["grad_logits_ptr"].element_size() == args["logits_ptr"].element_size(),
})
@triton.jit
def _logprobs_backward_kernel(
    # pointers
    grad_ptr, logits_ptr, labels_ptr, lse_ptr, grad_logits_ptr,
    # shapes
    V,
    # strides
    stride_logits_n, stride_grad_logits_n,
    # scalars
    ignore_index, scale,
    # meta
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, SAME_LAYOUT: tl.constexpr,
):
    """Program (row, j): body tile j of the row; program (row, 0) also the head and tail elements."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    y = tl.load(labels_ptr + row).to(tl.int64)
    ignored = y == ignore_index
    g = tl.load(grad_ptr + row)
    gs = tl.where(ignored, 0.0, g * scale)
    m = tl.load(lse_ptr + 2 * row)
    log_s = tl.load(lse_ptr + 2 * row + 1)
    start = row * stride_logits_n
    if SAME_LAYOUT:
        out_start = start
    else:
        out_start = row * stride_grad_logits_n
    head, n_body = row_split(start, V, VEC)
    out_ty = grad_logits_ptr.dtype.element_ty
    if j == 0:
        cols, ok = edge_cols(head, n_body, V, VEC)
        x = tl.load(logits_ptr + start + cols, mask=ok, other=0.0)
        d = _grad_block(x, cols, y, gs, m, log_s, scale, ignored)
        tl.store(grad_logits_ptr + out_start + cols, d.to(out_ty), mask=ok)
    offs = j * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = offs < n_body
    x = tl.load(logits_ptr + tl.multiple_of(start + head, VEC) + offs, mask=inb, other=0.0)
    d = _grad_block(x, head + offs, y, gs, m, log_s, scale, ignored)
    if SAME_LAYOUT:
        out = grad_logits_ptr + tl.multiple_of(out_start + head, VEC) + offs
    else:
        out = grad_logits_ptr + out_start + head + offs
    tl.store(out, d.to(out_ty), mask=inb)


def _block_v(vocab: int) -> int:
    return max(16, min(4096, triton.next_power_of_2(max(vocab, 1))))


def forward_config(vocab: int) -> dict:
    """Meta-parameters of the forward launch for a vocabulary of ``vocab`` (the compile tests use it too).
    No FMA contraction: z_y - m must see z_y rounded exactly like the logits in the max and the sum."""
    return {"BLOCK_V": _block_v(vocab), "num_warps": 8, "enable_fp_fusion": False}


def backward_config(vocab: int) -> dict:
    """Meta-parameters of the backward launch (grid: rows x cdiv(vocab, BLOCK_V)). No FMA contraction: z is
    rounded as in the forward's max and sum before ``- m``."""
    return {"BLOCK_V": min(_block_v(vocab), 2048), "num_warps": 4, "enable_fp_fusion": False}


def logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp [N] and the log-sum-exp in parts [N, 2] (fp32: the row max m and log sum exp(z - m)) of
    ``logits * scale``; ``logits`` [N, V] with unit column stride."""
    n, v = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty((n, 2), dtype=torch.float32, device=logits.device)
    if n == 0:
        return logp, lse
    _logprobs_forward_kernel[(n,)](
        logits, labels, logp, lse, v, logits.stride(0), ignore_index, scale,
        **forward_config(v),
    )
    return logp, lse


def logprobs_backward(
    grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d logp / d logits contracted with ``grad`` [N] (``lse``: the forward's [N, 2] parts), written to ``out``
    (may be ``logits`` itself: each element is read before it is written) or to a new [N, V] tensor in the dtype
    of ``logits``."""
    n, v = logits.shape
    grad_logits = torch.empty((n, v), dtype=logits.dtype, device=logits.device) if out is None else out
    if n == 0 or v == 0:
        return grad_logits
    config = backward_config(v)
    _logprobs_backward_kernel[(n, triton.cdiv(v, config["BLOCK_V"]))](
        grad, logits, labels, lse, grad_logits, v, logits.stride(0), grad_logits.stride(0),
        ignore_index, scale, **config,
    )
    return grad_logits


TRITON_KERNELS = {
    "logprobs_forward": (
        _logprobs_forward_kernel.fn,
        {"logits_ptr": "*bf16", "labels_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
         "V": "i32", "stride_logits_n": "i64", "ignore_index": "i64", "scale": "fp32",
         "BLOCK_V": "constexpr", "VEC": "constexpr"},
        {"BLOCK_V": 4096, "VEC": 8},
    ),
    "logprobs_backward": (
        _logprobs_backward_kernel.fn,
        {"grad_ptr": "*fp32", "logits_ptr": "*bf16", "labels_ptr": "*i64", "lse_ptr": "*fp32",
         "grad_logits_ptr": "*bf16", "V": "i32", "stride_logits_n": "i64",
         "stride_grad_logits_n": "i64", "ignore_index": "i64", "scale": "fp32",
         "BLOCK_V": "constexpr", "VEC": "constexpr", "SAME_LAYOUT": "constexpr"},
        {"BLOCK_V": 2048, "VEC": 8, "SAME_LAYOUT": True},
    ),
}
