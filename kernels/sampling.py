"""Token sampling: Gumbel-max in one read for temperature-only rows; for filtered rows (top-k, top-p,
min-p) each threshold is found without sorting by a multi-pivot search on the value axis, then one
Gumbel-max pass over the survivors. The random stream is the counter-based hash of
``prefkern.reference.sampling_row_key`` / ``sampling_uniforms``, operation for operation."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PASSES = 40
MAX_CHUNKS = 8  # programs per row in pass 1
CAND_CAP = 4096  # survivors of top-k / min-p compacted per row before top-p


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
def _gumbel(key, cols):
    h = _mix32(_mix32(key ^ cols.to(tl.uint32)) + 0x6A09E667)
    u = (((h >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-8
    return -tl.log(-tl.log(u))


@triton.jit
def _search(row_ptr, V, inv_t, m, lo, top, goal,
            FRACTION: tl.constexpr, MASS: tl.constexpr, BLOCK_V: tl.constexpr, NP: tl.constexpr,
            MAXP: tl.constexpr):
    # BLOCK_V here is the search tile: [BLOCK_V, NP] comparisons per step, kept small for registers
    """sup{t : G(t) >= target}, G(t) = sum of w(z) over z >= max(t, lo); target = goal or goal * G(lo)."""
    jj = tl.arange(0, NP)
    target = goal
    result = lo
    active = 1
    it = 0
    while (active == 1) & (it < MAXP):
        frac = jj.to(tl.float32) / (NP - 1)
        piv = tl.where(jj == 0, lo, tl.where(jj == NP - 1, top, lo + (top - lo) * frac))
        g = tl.zeros([NP], dtype=tl.float32)
        a = tl.full([NP], float("inf"), tl.float32)
        b = tl.full([NP], -float("inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32) * inv_t
            inr = z >= lo
            if MASS:
                w = tl.where(inr, tl.exp(z - m), 0.0)
            else:
                w = tl.where(inr, 1.0, 0.0)
            ge = (z[:, None] >= piv[None, :]) & inr[:, None]
            g += tl.sum(tl.where(ge, w[:, None], 0.0), axis=0)
            a = tl.minimum(a, tl.min(tl.where(ge, z[:, None], float("inf")), axis=0))
            b = tl.maximum(b, tl.max(tl.where((~ge) & inr[:, None], z[:, None], -float("inf")), axis=0))
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
def _sample_partial_kernel(
    # pointers
    logits_ptr, row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
    part_f_ptr, part_i_ptr,
    # shapes
    R, V, S, CHUNK,
    # strides
    stride_logits_l,
    # meta
    BLOCK_V: tl.constexpr,
):
    """Program (r, c): pass 1 over columns [c * CHUNK, (c + 1) * CHUNK) of output row r: max, sum of
    exp(z - max), min finite z, NaN/+inf flag and the Gumbel-max (key, column, z); greedy rows use z
    itself as the key. Several programs per row keep the memory system busy for small batches."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    row_ptr = logits_ptr + tl.load(row_index_ptr + r) * stride_logits_l
    greedy, inv_t, k, p, mp, use_k, use_p, use_mp, filtered = _row_setup(
        row_index_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, r, V)
    key = _row_key(tl.load(seed_ptr + r), tl.load(offset_ptr + r), r)
    m = -float("inf")
    zmin = float("inf")
    s = 0.0
    bad = 0.0
    best = -float("inf")
    best_idx = r * 0 - 1
    best_z = 0.0
    v_end = tl.minimum((c + 1) * CHUNK, V)
    for v0 in range(c * CHUNK, v_end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        inb = offs < v_end
        z = tl.load(row_ptr + offs, mask=inb, other=-float("inf")).to(tl.float32) * inv_t
        bad = tl.maximum(bad, tl.max(tl.where(inb & ~(z < float("inf")), 1.0, 0.0), axis=0))
        zmin = tl.minimum(zmin, tl.min(tl.where(z > -float("inf"), z, float("inf")), axis=0))
        new_m = tl.maximum(m, tl.max(z, axis=0))
        s = tl.where(new_m == -float("inf"), 0.0, s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0))
        m = new_m
        if not filtered:
            gk = tl.where(greedy, z, z + _gumbel(key, offs))
            blk_best = tl.max(gk, axis=0)
            blk_idx = tl.argmax(gk, axis=0)
            blk_z = tl.max(tl.where(tl.arange(0, BLOCK_V) == blk_idx, z, -float("inf")), axis=0)
            take = blk_best > best
            best = tl.where(take, blk_best, best)
            best_idx = tl.where(take, (v0 + blk_idx).to(tl.int64), best_idx)
            best_z = tl.where(take, blk_z, best_z)
    RS = R * S
    base = part_f_ptr + r * S + c
    tl.store(base, m)
    tl.store(base + RS, s)
    tl.store(base + 2 * RS, zmin)
    tl.store(base + 3 * RS, best)
    tl.store(base + 4 * RS, best_z)
    tl.store(base + 5 * RS, bad)
    tl.store(part_i_ptr + r * S + c, best_idx)


@triton.jit
def _draw(z_ptr, col_ptr, n, inv_t, m, t, key, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
    """Gumbel-max over the values >= t of z_ptr[0:n] (columns col_ptr[0:n], or 0..n-1): (column, z, sum
    of exp(z - m) over the survivors). Ties go to the first, i.e. the lowest column."""
    best = -float("inf")
    best_idx = (n * 0).to(tl.int64) - 1
    best_z = 0.0
    s = 0.0
    for v0 in range(0, n, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        inb = offs < n
        z = tl.load(z_ptr + offs, mask=inb, other=-float("inf")).to(tl.float32) * inv_t
        if HAS_COL:
            cols = tl.load(col_ptr + offs, mask=inb, other=0)
        else:
            cols = offs
        kept = z >= t
        s += tl.sum(tl.where(kept, tl.exp(z - m), 0.0), axis=0)
        gk = tl.where(kept, z + _gumbel(key, cols), -float("inf"))
        blk_best = tl.max(gk, axis=0)
        blk_idx = tl.argmax(gk, axis=0)
        sel = tl.arange(0, BLOCK) == blk_idx
        blk_z = tl.max(tl.where(sel, z, -float("inf")), axis=0)
        blk_col = tl.max(tl.where(sel, cols, -1), axis=0).to(tl.int64)
        take = blk_best > best
        best = tl.where(take, blk_best, best)
        best_idx = tl.where(take, blk_col, best_idx)
        best_z = tl.where(take, blk_z, best_z)
    return best_idx, best_z, s


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
    S_POW2: tl.constexpr, CAP: tl.constexpr,
):
    """Program r: merges the partials of row r; temperature-only and greedy rows are done, filtered rows
    find their thresholds (multi-pivot search) and draw by Gumbel-max over the survivors."""
    r = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + tl.load(row_index_ptr + r) * stride_logits_l
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
    c_best = tl.argmax(pbest, axis=0)  # first chunk on ties: the lowest column wins
    best_idx = tl.max(tl.where(cs == c_best, pidx, -1), axis=0)
    best_idx = tl.where(best == -float("inf"), -1, best_idx)
    best_z = tl.max(tl.where(cs == c_best, pz, -float("inf")), axis=0)
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
            best_idx, best_z, s = _draw(cand_z_ptr + r * CAP, cand_col_ptr + r * CAP, n_c, 1.0, m, t, key,
                                        True, SEARCH_V)
        else:
            if use_p:
                tp = _search(row_ptr, V, inv_t, m, t, m, p, True, True, SEARCH_V, NP, MAXP)
                t = tl.maximum(t, tp)
            best_idx, best_z, s = _draw(row_ptr, cand_col_ptr, V, inv_t, m, t, key, False, BLOCK_V)
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
        _sample_partial_kernel,
        {**_COMMON_SIG, "R": "i32", "V": "i32", "S": "i32", "CHUNK": "i32", "stride_logits_l": "i64",
         "BLOCK_V": "constexpr"},
        {"BLOCK_V": 2048},
    ),
    "sample_finish": (
        _sample_finish_kernel,
        {**_COMMON_SIG, "cand_z_ptr": "*fp32", "cand_col_ptr": "*i32", "tokens_ptr": "*i64",
         "logprobs_ptr": "*fp32", "R": "i32", "V": "i32", "S": "i32", "stride_logits_l": "i64",
         "BLOCK_V": "constexpr", "SEARCH_V": "constexpr", "NP": "constexpr", "MAXP": "constexpr",
         "S_POW2": "constexpr", "CAP": "constexpr"},
        {"BLOCK_V": 2048, "SEARCH_V": 256, "NP": 16, "MAXP": MAX_PASSES, "S_POW2": 8, "CAP": CAND_CAP},
    ),
}
