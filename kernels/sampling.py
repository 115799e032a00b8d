"""Token sampling: Gumbel-max in one read for temperature-only rows; for filtered rows (top-k, top-p,
min-p) each threshold is found without sorting by a multi-pivot search on the value axis, then one
Gumbel-max pass over the survivors. The random stream is the counter-based hash of
``prefkern.reference.sampling_row_key`` / ``sampling_uniforms``, operation for operation (the outer log of
the noise is a short polynomial, within float32 rounding of the reference's).

Pass 1 and the draw read rows peeled as ``logprobs.row_split`` cuts them (16-byte loads at any V and row
stride), keep their statistics per lane and reduce them once, and skip the noise of a tile that cannot beat
a key already seen; the threshold search keeps [SEARCH_V, NP] partial sums per lane and reduces once a pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprobs import edge_cols, row_split

MAX_PASSES = 40
MAX_CHUNKS = 8  # programs per row in pass 1
CAND_CAP = 4096  # survivors of top-k / min-p compacted per row before top-p


# Exact range of the noise g = -log(-log u) over the stream's uniforms u = (2k + 1) 2^-24, k in [0, 2^23):
# g(2^-24) = -2.81154090976628 and g(1 - 2^-24) = 16.6355323036364 (float64). The bounds below are these
# rounded outwards by 1e-4, far more than the error of a float32 log on any backend (tests check both).
G_MIN = tl.constexpr(-2.8116)
G_MAX = tl.constexpr(16.6356)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _row_key(seed, offset, row):
    s = seed.to(tl.uint64, bitcast=True)
    o = offset.to(tl.uint64, bitcast=True)
    k = _mix32((s & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    k = _mix32(k ^ (s >> 32).to(tl.uint32))
    k = _mix32(k ^ (o & 0xFFFFFFFF).to(tl.uint32))
    k = _mix32(k ^ (o >> 32).to(tl.uint32))
    return _mix32(k ^ row.to(tl.uint32))


@triton.jit
def _log_noise(w):
    """log w for the outer log of the noise, w = -log u in [2^-24, 16.7]: w = 2^e (1 + f) with 1 + f in
    [sqrt(1/2), sqrt(2)), log(1 + f) = f + f^2 q(f), q of degree 6 fitted for the least largest absolute
    error (4e-8) on that range; with the float32 rounding, within 1.1e-6 of log w over the whole range, as a
    correctly rounded float32 log is (1 / 2 ulp of 16). No special cases: w is never 0, denormal, inf or NaN.
    Cheaper than tl.log (a libdevice call with range reduction and special cases, about 25 instructions):
    only the noise's absolute accuracy matters here. The inner log stays tl.log: its argument is near 1."""
    bits = w.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23  # 0x3F3504F3: sqrt(1/2) in float32
    f = (bits - (e << 23)).to(tl.float32, bitcast=True) - 1.0
    q = tl.fma(f, -0.1003459244966507, 0.16335637867450714)
    q = tl.fma(q, f, -0.17326000332832336)
    q = tl.fma(q, f, 0.19888277351856232)
    q = tl.fma(q, f, -0.2496146410703659)
    q = tl.fma(q, f, 0.33335262537002563)
    q = tl.fma(q, f, -0.500005841255188)
    return tl.fma(e.to(tl.float32), 0.6931471805599453, tl.fma(f * f, q, f))


@triton.jit
def _gumbel(key, cols):
    h = _mix32(_mix32(key ^ cols.to(tl.uint32)) + 0x6A09E667)
    u = (((h >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-8
    return -_log_noise(-tl.log(u))


@triton.jit
def _lane_take(best, best_col, best_z, key, cols, z):
    """Per-lane running Gumbel-max: a lane sees its columns in increasing order, so a strict > keeps the lowest
    column of a tie."""
    take = key > best
    return tl.where(take, key, best), tl.where(take, cols, best_col), tl.where(take, z, best_z)


@triton.jit
def _lanes_best(best, best_col, best_z):
    """(key, column, z) of the best lane; the lowest column among equal keys (column 2^31 - 1: none)."""
    top = tl.max(best, axis=0)
    col = tl.min(tl.where(best == top, best_col, 2147483647), axis=0)
    z = tl.max(tl.where((best == top) & (best_col == col), best_z, -float("inf")), axis=0)
    return top, col, z


@triton.jit
def _merge_best(key, col, z, key2, col2, z2):
    take = (key2 > key) | ((key2 == key) & (col2 < col))
    return tl.where(take, key2, key), tl.where(take, col2, col), tl.where(take, z2, z)


@triton.jit
def _search(row_ptr, V, inv_t, m, lo, top, goal,
            FRACTION: tl.constexpr, MASS: tl.constexpr, BLOCK_V: tl.constexpr, NP: tl.constexpr,
            MAXP: tl.constexpr):
    # BLOCK_V here is the search tile: [BLOCK_V, NP] comparisons per step, kept in per-lane accumulators of that
    # shape (3 x BLOCK_V * NP / threads registers per thread) and reduced across the block once per pass
    """sup{t : G(t) >= target}, G(t) = sum of w(z) over z >= max(t, lo); target = goal or goal * G(lo)."""
    jj = tl.arange(0, NP)
    target = goal
    result = lo
    active = 1
    it = 0
    while (active == 1) & (it < MAXP):
        frac = jj.to(tl.float32) / (NP - 1)
        piv = tl.where(jj == 0, lo, tl.where(jj == NP - 1, top, lo + (top - lo) * frac))
        g_l = tl.zeros([BLOCK_V, NP], dtype=tl.float32)
        a_l = tl.full([BLOCK_V, NP], float("inf"), tl.float32)
        b_l = tl.full([BLOCK_V, NP], -float("inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            # loaded as a [BLOCK_V, 1] column: it is born in the accumulators' layout (no shuffle per step)
            offs = v0 + tl.arange(0, BLOCK_V)[:, None]
            z = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
            inr = z >= lo
            ge = (z >= piv[None, :]) & inr
            if MASS:
                g_l += tl.where(ge, tl.exp(z - m), 0.0)
            else:
                g_l += tl.where(ge, 1.0, 0.0)
            a_l = tl.minimum(a_l, tl.where(ge, z, float("inf")))
            b_l = tl.maximum(b_l, tl.where((~ge) & inr, z, -float("inf")))
        g = tl.sum(g_l, axis=0)
        a = tl.min(a_l, axis=0)
        b = tl.max(b_l, axis=0)
        g0 = tl.max(tl.where(jj == 0, g, -float("inf")), axis=0)
        if FRACTION:
            target = tl.where(it == 0, goal * g0, target)
        n_ok = tl.sum((g >= target).to(tl.int32), axis=0)
        J = n_ok - 1
        a_j = tl.max(tl.where(jj == J, a, -float("inf")), axis=0)
        b_j1 = tl.max(tl.where(jj == J + 1, b, -float("inf")), axis=0)
        new_lo = tl.where(J <= 0, lo, a_j)
        few = g0 < target
        at_top = J == NP - 1
        single = ~(b_j1 > new_lo)
        result = tl.where(few, lo, tl.where(at_top, top, new_lo))
        active = tl.where(few | at_top | single, 0, 1)
        lo = tl.where(few, lo, new_lo)
        top = tl.where(few | at_top, top, b_j1)
        it += 1
    return tl.where(active == 1, lo, result)


@triton.jit
def _row_setup(row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, V):
    temp = tl.load(temperature_ptr + r)
    k = tl.load(top_k_ptr + r)
    p = tl.load(top_p_ptr + r)
    mp = tl.load(min_p_ptr + r)
    greedy = ~(temp > 0.0)
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
    use_k = (k > 0) & (k < V)
    use_p = p < 1.0
    use_mp = mp > 0.0
    filtered = (~greedy) & (use_k | use_p | use_mp)
    return greedy, inv_t, k, p, mp, use_k, use_p, use_mp, filtered


@triton.jit
def _draw(z_ptr, col_ptr, n, col0, inv_t, m, t, key, HAS_COL: tl.constexpr, BLOCK: tl.constexpr,
          VEC: tl.constexpr):
    """Gumbel-max over the values >= t of z_ptr[0:n] (columns col_ptr[0:n], or col0 + 0..n-1): (key, column,
    z, sum of exp(z - m) over the survivors), the lowest column on ties. Per-lane accumulators reduced once;
    a tile whose largest survivor plus G_MAX cannot beat a key already seen skips its noise. z_ptr is 16-byte
    aligned; without columns n is a multiple of VEC, with them the loads run to n rounded up to one (inside
    the scratch row) and the values past n are dropped."""
    lanes = tl.arange(0, BLOCK)
    s_l = tl.zeros([BLOCK], tl.float32)
    best_l = tl.full([BLOCK], -float("inf"), tl.float32)
    col_l = tl.full([BLOCK], 2147483647, tl.int32)
    z_l = tl.zeros([BLOCK], tl.float32)
    floor = -float("inf")
    n_load = (n + VEC - 1) // VEC * VEC
    for v0 in range(0, n_load, BLOCK):
        offs = v0 + lanes
        inb = offs < n_load
        z = tl.load(z_ptr + offs, mask=inb, other=-float("inf")).to(tl.float32) * inv_t
        if HAS_COL:
            cols = tl.load(col_ptr + offs, mask=inb, other=0)
            kept = (z >= t) & (offs < n)
        else:
            cols = col0 + offs
            kept = z >= t
        zk = tl.where(kept, z, -float("inf"))
        s_l += tl.where(kept, tl.exp(z - m), 0.0)
        tile_m = tl.max(zk, axis=0)
        if tile_m + G_MAX >= floor:
            best_l, col_l, z_l = _lane_take(best_l, col_l, z_l, zk + _gumbel(key, cols), cols, z)
            floor = tl.maximum(floor, tile_m + G_MIN)
    best, col, best_z = _lanes_best(best_l, col_l, z_l)
    return best, col, best_z, tl.sum(s_l, axis=0)


@triton.jit
def _draw_row(logits_ptr, start, V, inv_t, m, t, key, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """``_draw`` over the row of the logits at element ``start``: its aligned body, then its head and tail
    elements. Returns (column or -1, z, sum of exp(z - m) over the survivors)."""
    row_ptr = logits_ptr + start
    head, n_body = row_split(start, V, VEC)
    body_ptr = logits_ptr + tl.multiple_of(start + head, VEC)
    best, col, best_z, s = _draw(body_ptr, row_ptr, n_body, head, inv_t, m, t, key, False, BLOCK, VEC)
    cols, ok = edge_cols(head, n_body, V, VEC)
    z = tl.load(row_ptr + cols, mask=ok, other=-float("inf")).to(tl.float32) * inv_t
    kept = z >= t
    zk = tl.where(kept, z, -float("inf"))
    e_best, e_col, e_z = _lanes_best(zk + _gumbel(key, cols), cols, z)
    best, col, best_z = _merge_best(best, col, best_z, e_best, e_col, e_z)
    col = tl.where(best == -float("inf"), -1, col).to(tl.int64)
    return col, best_z, s + tl.sum(tl.where(kept, tl.exp(z - m), 0.0), axis=0)


@triton.jit
def _sample_edges(row_ptr, head, n_body, V, inv_t, key, greedy, gumbel, VEC: tl.constexpr):
    """Pass-1 statistics of the head and tail elements of a row (see ``row_split``), as scalars."""
    cols, ok = edge_cols(head, n_body, V, VEC)
    z = tl.load(row_ptr + cols, mask=ok, other=-float("inf")).to(tl.float32) * inv_t
    m = tl.max(z, axis=0)
    s = tl.sum(tl.exp(z - tl.where(m == -float("inf"), 0.0, m)), axis=0)
    zmin = tl.min(tl.where(z > -float("inf"), z, float("inf")), axis=0)
    bad = tl.max(tl.where(ok & ~(z < float("inf")), 1, 0), axis=0)
    if gumbel:
        gk = z + _gumbel(key, cols)
    else:
        gk = tl.where(greedy, z, -float("inf"))
    best, col, best_z = _lanes_best(gk, cols, z)
    return m, s, zmin, bad, best, col, best_z


@triton.heuristics({"VEC": lambda args: 16 // args["logits_ptr"].element_size()})
@triton.jit
def _sample_partial_kernel(
    # pointers
    logits_ptr, row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
    part_f_ptr, part_i_ptr,
    # shapes
    R, V, S, CHUNK,
    # strides
    stride_logits_l,
    # meta
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    """Program (r, c): pass 1 over body columns [c * CHUNK, (c + 1) * CHUNK) (counted from the row's aligned
    body, see ``row_split``; program c = 0 also takes the head and tail elements) of output row r: max, sum of
    exp(z - max), min finite z, NaN/+inf flag and the Gumbel-max (key, column, z); greedy rows use z itself as
    the key. Several programs per row keep the memory system busy for small batches. Every statistic is kept
    per lane and reduced once at the end, but for the tile max that the sum is rescaled by; a tile whose max
    plus G_MAX cannot beat a key already seen skips its noise."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    start = tl.load(row_index_ptr + r) * stride_logits_l
    row_ptr = logits_ptr + start
    greedy, inv_t, k, p, mp, use_k, use_p, use_mp, filtered = _row_setup(
        row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, V)
    gumbel = (~filtered) & (~greedy)
    key = _row_key(tl.load(seed_ptr + r), tl.load(offset_ptr + r), r)
    head, n_body = row_split(start, V, VEC)
    body_ptr = logits_ptr + tl.multiple_of(start + head, VEC)
    lanes = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s_l = tl.zeros([BLOCK_V], tl.float32)
    zmin_l = tl.full([BLOCK_V], float("inf"), tl.float32)
    bad_l = tl.zeros([BLOCK_V], tl.int32)
    best_l = tl.full([BLOCK_V], -float("inf"), tl.float32)
    col_l = tl.full([BLOCK_V], 2147483647, tl.int32)
    z_l = tl.zeros([BLOCK_V], tl.float32)
    # a lower bound of the best key so far: the max-z element of every tile that drew noise has key >= z + G_MIN
    floor = -float("inf")
    v_end = tl.minimum(c * CHUNK + CHUNK, n_body)
    for v0 in range(c * CHUNK, v_end, BLOCK_V):
        offs = v0 + lanes
        inb = offs < v_end
        z = tl.load(body_ptr + offs, mask=inb, other=-float("inf")).to(tl.float32) * inv_t
        bad_l |= tl.where(inb & ~(z < float("inf")), 1, 0)
        zmin_l = tl.minimum(zmin_l, tl.where(z > -float("inf"), z, float("inf")))
        tile_m = tl.max(z, axis=0)
        new_m = tl.maximum(m, tile_m)
        # all-(-inf) so far: shift by 0, so that exp(-inf - 0) = 0 and the sum stays 0 instead of NaN
        shift = tl.where(new_m == -float("inf"), 0.0, new_m)
        s_l = s_l * tl.exp(m - shift) + tl.exp(z - shift)
        m = new_m
        if gumbel:
            if tile_m + G_MAX >= floor:
                best_l, col_l, z_l = _lane_take(best_l, col_l, z_l, z + _gumbel(key, head + offs), head + offs, z)
                floor = tl.maximum(floor, tile_m + G_MIN)
        elif greedy:
            best_l, col_l, z_l = _lane_take(best_l, col_l, z_l, z, head + offs, z)
    s = tl.sum(s_l, axis=0)
    zmin = tl.min(zmin_l, axis=0)
    bad = tl.max(bad_l, axis=0)
    best, best_col, best_z = _lanes_best(best_l, col_l, z_l)
    if c == 0:
        e_m, e_s, e_zmin, e_bad, e_best, e_col, e_z = _sample_edges(
            row_ptr, head, n_body, V, inv_t, key, greedy, gumbel, VEC)
        new_m = tl.maximum(m, e_m)
        shift = tl.where(new_m == -float("inf"), 0.0, new_m)
        s = s * tl.exp(m - shift) + e_s * tl.exp(e_m - shift)
        m = new_m
        zmin = tl.minimum(zmin, e_zmin)
        bad = tl.maximum(bad, e_bad)
        best, best_col, best_z = _merge_best(best, best_col, best_z, e_best, e_col, e_z)
    best_idx = tl.where(best == -float("inf"), -1, best_col).to(tl.int64)
    RS = R * S
    base = part_f_ptr + r * S + c
    tl.store(base, m)
    tl.store(base + RS, s)
    tl.store(base + 2 * RS, zmin)
    tl.store(base + 3 * RS, best)
    tl.store(base + 4 * RS, best_z)
    tl.store(base + 5 * RS, bad.to(tl.float32))
    tl.store(part_i_ptr + r * S + c, best_idx)


@triton.heuristics({"VEC": lambda args: 16 // args["logits_ptr"].element_size()})
@triton.jit
def _sample_finish_kernel(
    # pointers
    logits_ptr, row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
    part_f_ptr, part_i_ptr, cand_z_ptr, cand_col_ptr, tokens_ptr, logprobs_ptr,
    # shapes
    R, V, S,
    # strides
    stride_logits_l,
    # meta
    BLOCK_V: tl.constexpr, SEARCH_V: tl.constexpr, NP: tl.constexpr, MAXP: tl.constexpr,
    S_POW2: tl.constexpr, CAP: tl.constexpr, VEC: tl.constexpr,
):
    """Program r: merges the partials of row r; temperature-only and greedy rows are done, filtered rows
    find their thresholds (multi-pivot search) and draw by Gumbel-max over the survivors."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(row_index_ptr + r) * stride_logits_l
    row_ptr = logits_ptr + start
    greedy, inv_t, k, p, mp, use_k, use_p, use_mp, filtered = _row_setup(
        row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, V)
    key = _row_key(tl.load(seed_ptr + r), tl.load(offset_ptr + r), r)
    RS = R * S
    cs = tl.arange(0, S_POW2)
    cm = cs < S
    base = part_f_ptr + r * S + cs
    pm = tl.load(base, mask=cm, other=-float("inf"))
    ps = tl.load(base + RS, mask=cm, other=0.0)
    pzmin = tl.load(base + 2 * RS, mask=cm, other=float("inf"))
    pbest = tl.load(base + 3 * RS, mask=cm, other=-float("inf"))
    pz = tl.load(base + 4 * RS, mask=cm, other=0.0)
    pbad = tl.load(base + 5 * RS, mask=cm, other=0.0)
    pidx = tl.load(part_i_ptr + r * S + cs, mask=cm, other=-1)
    m = tl.max(pm, axis=0)
    s = tl.sum(tl.where(pm == -float("inf"), 0.0, ps * tl.exp(pm - m)), axis=0)
    zmin = tl.min(pzmin, axis=0)
    bad = tl.max(pbad, axis=0)
    best = tl.max(pbest, axis=0)
    # the lowest column among equal keys (chunk 0 holds the row's last columns too: its tail elements)
    tie = (pbest == best) & (pidx >= 0)
    best_idx = tl.min(tl.where(tie, pidx, V), axis=0)
    best_z = tl.max(tl.where(tie & (pidx == best_idx), pz, -float("inf")), axis=0)
    best_idx = tl.where(best == -float("inf"), -1, best_idx)
    lp = tl.where(greedy, 0.0, best_z - m - tl.log(s))

    if filtered:
        t = tl.where(use_mp, m + tl.log(tl.where(use_mp, mp, 1.0)), zmin)
        if use_k:
            tk = _search(row_ptr, V, inv_t, m, t, m, k.to(tl.float32), False, False, SEARCH_V, NP, MAXP)
            t = tl.maximum(t, tk)
        # top-p after top-k / min-p: compact the survivors (in column order) into this row's scratch
        # once, so that the top-p passes and the draw read CAP values instead of the row
        n_c = (r * 0).to(tl.int32)
        compacted = r < 0
        if use_p & (use_k | use_mp):
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
                kept = (z >= t) & (offs < V)
                pos = n_c + tl.cumsum(kept.to(tl.int32), axis=0) - 1
                ok = kept & (pos < CAP)
                tl.store(cand_z_ptr + r * CAP + pos, z, mask=ok)
                tl.store(cand_col_ptr + r * CAP + pos, offs, mask=ok)
                n_c += tl.sum(kept.to(tl.int32), axis=0)
            compacted = n_c <= CAP
            # the searches below read the scratch in another thread layout than the stores above
            tl.debug_barrier()
        if compacted:
            tp = _search(cand_z_ptr + r * CAP, n_c, 1.0, m, t, m, p, True, True, SEARCH_V, NP, MAXP)
            t = tl.maximum(t, tp)
            d_best, best_idx, best_z, s = _draw(cand_z_ptr + r * CAP, cand_col_ptr + r * CAP, n_c, 0, 1.0, m, t,
                                                key, True, BLOCK_V, 4)
            best_idx = tl.where(d_best == -float("inf"), -1, best_idx).to(tl.int64)
        else:
            if use_p:
                tp = _search(row_ptr, V, inv_t, m, t, m, p, True, True, SEARCH_V, NP, MAXP)
                t = tl.maximum(t, tp)
            best_idx, best_z, s = _draw_row(logits_ptr, start, V, inv_t, m, t, key, BLOCK_V, VEC)
        lp = best_z - m - tl.log(s)

    invalid = (bad > 0) | (m == -float("inf")) | (best_idx < 0)
    tl.store(tokens_ptr + r, tl.where(invalid, -1, best_idx))
    tl.store(logprobs_ptr + r, tl.where(invalid, 0.0, lp))


def _block_v(vocab: int) -> int:
    return max(16, min(2048, triton.next_power_of_2(max(vocab, 1))))


def launch_config(vocab: int) -> dict:
    """Split of a row into pass-1 chunks and the meta-parameters of both launches for a vocabulary of
    ``vocab`` (the compile tests use this too)."""
    block = _block_v(vocab)
    chunk = block * triton.cdiv(triton.cdiv(vocab, block), MAX_CHUNKS)
    n_chunks = triton.cdiv(vocab, chunk)
    cap = min(CAND_CAP, max(16, triton.next_power_of_2(vocab)))
    # no FMA contraction: z = x / T is rounded once, so that the sums, thresholds and the logprob
    # (z - m) - log s all see the same z
    return {
        "chunk": chunk, "n_chunks": n_chunks, "cap": cap,
        "partial": {"BLOCK_V": block, "num_warps": 8, "enable_fp_fusion": False},
        # 2048-wide tiles here spilled 8 bytes on sm_80 (ptxas 12.9); 1024 compiles without spills
        "finish": {"BLOCK_V": min(block, 1024), "SEARCH_V": min(256, block), "NP": 16, "MAXP": MAX_PASSES,
                   "S_POW2": max(2, triton.next_power_of_2(n_chunks)), "CAP": cap, "num_warps": 8,
                   "enable_fp_fusion": False},
    }


def sample(
    logits: torch.Tensor, row_index: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
    top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, candidates: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [R] int64 and logprobs [R] fp32; ``logits`` [L, V] with unit column stride, every per-row
    argument a contiguous [R] tensor (see ``prefkern.ops.sampling.sample_op``). Two launches: pass 1
    split over up to MAX_CHUNKS programs per row, then one program per row to merge (and, for filtered
    rows, to search the thresholds and draw)."""
    r = row_index.shape[0]
    v = logits.shape[1]
    dev = logits.device
    tokens = torch.empty(r, dtype=torch.int64, device=dev)
    logprobs = torch.empty(r, dtype=torch.float32, device=dev)
    if r == 0:
        return tokens, logprobs
    config = launch_config(v)
    n_chunks, cap = config["n_chunks"], config["cap"]
    part_f = torch.empty((6, r, n_chunks), dtype=torch.float32, device=dev)
    part_i = torch.empty((r, n_chunks), dtype=torch.int64, device=dev)
    common = (logits, row_index, temperature, top_k, top_p, min_p, seed, offset)
    _sample_partial_kernel[(r, n_chunks)](
        *common, part_f, part_i, r, v, n_chunks, config["chunk"], logits.stride(0), **config["partial"],
    )
    # the [R, cap] scratch is touched only by rows that combine top-p with top-k or min-p; ``candidates``
    # False (the caller knows no row does) gives a one-row stand-in that is never read or written
    rows = r if candidates else 1
    cand_z = torch.empty((rows, cap), dtype=torch.float32, device=dev)
    cand_col = torch.empty((rows, cap), dtype=torch.int32, device=dev)
    _sample_finish_kernel[(r,)](
        *common, part_f, part_i, cand_z, cand_col, tokens, logprobs, r, v, n_chunks, logits.stride(0),
        **config["finish"],
    )
    return tokens, logprobs


_COMMON_SIG = {"logits_ptr": "*bf16", "row_index_ptr": "*i64", "temperature_ptr": "*fp32", "top_k_ptr": "*i64",
               "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seed_ptr": "*i64", "offset_ptr": "*i64",
               "part_f_ptr": "*fp32", "part_i_ptr": "*i64"}
TRITON_KERNELS = {
    "sample_partial": (
        _sample_partial_kernel.fn,
        {**_COMMON_SIG, "R": "i32", "V": "i32", "S": "i32", "CHUNK": "i32", "stride_logits_l": "i64",
         "BLOCK_V": "constexpr", "VEC": "constexpr"},
        {"BLOCK_V": 2048, "VEC": 8},
    ),
    "sample_finish": (
        _sample_finish_kernel.fn,
        {**_COMMON_SIG, "cand_z_ptr": "*fp32", "cand_col_ptr": "*i32", "tokens_ptr": "*i64",
         "logprobs_ptr": "*fp32", "R": "i32", "V": "i32", "S": "i32", "stride_logits_l": "i64",
         "BLOCK_V": "constexpr", "SEARCH_V": "constexpr", "NP": "constexpr", "MAXP": "constexpr",
         "S_POW2": "constexpr", "CAP": "constexpr", "VEC": "constexpr"},
        {"BLOCK_V": 2048, "SEARCH_V": 256, "NP": 16, "MAXP": MAX_PASSES, "S_POW2": 8, "CAP": CAND_CAP, "VEC": 8},
    ),
}
