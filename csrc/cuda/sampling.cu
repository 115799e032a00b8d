// Token sampling, one block per output row. Temperature-only rows: Gumbel-max and the online
// log-sum-exp in one read of the row. Filtered rows: no sort; each threshold (top-k: count, top-p: mass)
// is found by a multi-pivot search on the value axis, kPivots + 1 pivots per pass over the row, each
// pass also snapping the interval to the nearest data values, until one distinct value is left.
#include "cuda/sampling.h"

#include <cuda_runtime.h>

#include <cfloat>

#include "cpu/sampling_rng.h"
#include "cuda/dtype.cuh"
#include "cuda/row_loads.cuh"

namespace prefkern::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPivots = 8;      // pivots j = 0 .. kPivots per pass
constexpr int kMaxPasses = 40;  // each pass strictly shrinks the interval; this only bounds pathologies

struct Sum { __device__ float operator()(float a, float b) const { return a + b; } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct Min { __device__ float operator()(float a, float b) const { return fminf(a, b); } };

// Block-wide reduction of n values per thread at once; every thread gets the results.
template <int N, class Op>
__device__ void block_reduce(float (&v)[N], Op op, float* smem /* kWarps * N */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i)
    for (int off = 16; off > 0; off >>= 1) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], off));
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) smem[warp * N + i] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float acc = smem[i];
    for (int w = 1; w < kWarps; ++w) acc = op(acc, smem[w * N + i]);
    v[i] = acc;
  }
}

struct Best {
  float key;
  int64_t idx;
  float z;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.key > a.key || (b.key == a.key && b.idx >= 0 && (a.idx < 0 || b.idx < a.idx))) return b;
  return a;
}

// The noise of the CUDA kernels (gumbel_fast_from_uniform) is within kGumbelError = 2^-19 of g(u) = -log(-log u),
// and g over u = (2k + 1) 2^-24 spans [-log(24 ln 2), -log(-log(1 - 2^-24))]; widened by the error and rounded
// outwards to float, that gives [kGumbelMin, kGumbelMax] (tests/test_cuda_build.py checks all of it against
// float64). An element with z + kGumbelMax < the best key so far cannot win: its key z + g, rounded once (FMA)
// or twice, is at most z + kGumbelMax rounded, as g <= kGumbelMax before any rounding.
constexpr double kGumbelExactMin = -2.8115409097662813, kGumbelExactMax = 16.635532303636364;
constexpr float kGumbelError = 1.9073486328125e-6f;  // 2^-19
constexpr float kGumbelMin = -2.81154299f, kGumbelMax = 16.6355343f;
static_assert(kGumbelMin <= kGumbelExactMin - kGumbelError && kGumbelMax >= kGumbelExactMax + kGumbelError,
              "the noise bounds must hold the whole range");

// Float keys as ints in the same order (not NaN), so that one REDUX gives a warp's best key.
__device__ __forceinline__ int ordered(float x) {
  int i = __float_as_int(x);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
__device__ __forceinline__ float from_ordered(int i) { return __int_as_float(i >= 0 ? i : i ^ 0x7fffffff); }

// The best key among the calling lanes of this warp: a lower bound of the row's best, the same in every lane;
// at least -FLT_MAX, so that a -inf z (never a winner) fails z + kGumbelMax >= bar from the start.
__device__ __forceinline__ float warp_best_key(float key) {
  return fmaxf(from_ordered(__reduce_max_sync(__activemask(), ordered(key))), -FLT_MAX);
}

// Gumbel-max over one pack, computing the noise only where it can matter. (1) An element with
// z + kGumbelMax < bar (the warp's best key) cannot win: the pack, then the element, is skipped before hashing.
// (2) Else its uniform u is hashed, and the two logs are skipped when even its noise cannot lift the pack's
// max pm to bar: g(u) < y = bar - pm - margin holds when 1 - u > e^-y, as -log u >= 1 - u. The margin (2^-6
// plus the rounding of bar - pm and of the key) covers the noise's error (kGumbelError) and the fast e^-y
// (a few ulp; w_c is widened by 2^-10, and a w_c flushed to 0 stands for e^-y < 2^-126 < 1 - u). With
// z <= pm a skipped key z + g stays below bar by more than its rounding: the draw is that of every element,
// ties to the lowest column included.
template <int N>
__device__ __forceinline__ void draw_pack(Best& best, const float (&z)[N], float pm, int64_t v0, uint32_t key,
                                          float bar) {
  if (!(pm + kGumbelMax >= bar)) return;
  const float y = (bar - pm) - (0x1p-6f + 0x1p-20f * (fabsf(bar) + fabsf(pm)));
  const float w_c = exp_term(-y) * (1.f + 0x1p-10f);  // >= e^-y; +inf (never skip) when y < -88
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (z[j] + kGumbelMax >= bar) {
      const float u = sampling_uniform(key, static_cast<uint32_t>(v0 + j));
      if (!(1.f - u > w_c)) {
        const float gk = z[j] + gumbel_fast_from_uniform(u);
        if (gk > best.key) best = Best{gk, v0 + j, z[j]};
      }
    }
  }
}

// One block reduction of a draw: the (max, sum) of the log-sum-exp (or a plain sum when ONLINE is false)
// and the best key (ties to the lowest column). The result is valid in thread 0 only.
template <bool ONLINE>
__device__ void block_draw(MaxSum& acc, Best& best, MaxSum* acc_smem, Best* best_smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const float s = __shfl_xor_sync(0xffffffffu, acc.s, off);
    if constexpr (ONLINE) acc = merge(acc, MaxSum{__shfl_xor_sync(0xffffffffu, acc.m, off), s});
    else acc.s += s;
    Best b{__shfl_xor_sync(0xffffffffu, best.key, off), __shfl_xor_sync(0xffffffffu, best.idx, off),
           __shfl_xor_sync(0xffffffffu, best.z, off)};
    best = better(best, b);
  }
  if (lane == 0) acc_smem[warp] = acc, best_smem[warp] = best;  // written once per block: no barrier before
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if constexpr (ONLINE) acc = merge(acc, acc_smem[w]);
      else acc.s += acc_smem[w].s;
      best = better(best, best_smem[w]);
    }
  }
}

// sup{t : G(t) >= target} with G(t) = sum of w(z) over z >= max(t, base); `target` is `goal` itself
// (absolute) or goal * G(lo) (fraction of the mass above `lo`, found in the first pass).
template <class T, bool MASS>
__device__ float search(const T* row, int64_t vocab, float inv_t, float m, float lo, float top, float goal,
                        bool fraction, float* smem) {
  float target = goal;
  for (int pass = 0; pass < kMaxPasses; ++pass) {
    float piv[kPivots + 1];
#pragma unroll
    for (int j = 0; j <= kPivots; ++j)
      piv[j] = j == 0 ? lo : (j == kPivots ? top : lo + (top - lo) * (float(j) / kPivots));
    float g[kPivots + 1], a[kPivots + 1], b[kPivots + 1];
#pragma unroll
    for (int j = 0; j <= kPivots; ++j) g[j] = 0.f, a[j] = INFINITY, b[j] = -INFINITY;
    for_row<kThreads>(row, vocab, [&](int64_t, float x) {
      float z = __fmul_rn(x, inv_t);
      if (!(z >= lo)) return;
      float w = MASS ? exp_term(z - m) : 1.f;  // every G(pivot) holds the max, exp(0) = 1
#pragma unroll
      for (int j = 0; j <= kPivots; ++j) {
        bool ge = z >= piv[j];
        g[j] += ge ? w : 0.f;
        a[j] = ge ? fminf(a[j], z) : a[j];
        b[j] = ge ? b[j] : fmaxf(b[j], z);
      }
    });
    block_reduce(g, Sum{}, smem);
    block_reduce(a, Min{}, smem);
    block_reduce(b, Max{}, smem);
    if (pass == 0 && fraction) target = goal * g[0];
    if (g[0] < target) return lo;  // fewer than the target above lo: keep everything from lo
    int J = 0;
#pragma unroll
    for (int j = 1; j <= kPivots; ++j) J = g[j] >= target ? j : J;
    if (J == kPivots) return top;
    float new_lo = J == 0 ? lo : a[J];
    float new_top = b[J + 1];
    if (!(new_top > new_lo)) return new_lo;
    lo = new_lo, top = new_top;
  }
  return lo;
}

// FILTERED = false handles greedy and temperature-only rows (one read, few registers, two blocks per
// SM); FILTERED = true the rows with top-k / top-p / min-p. Both are launched; each skips the others' rows.
template <class T, bool FILTERED>
__global__ void __launch_bounds__(kThreads, FILTERED ? 1 : 2) sample_kernel(
    const T* __restrict__ logits, int64_t vocab, int64_t row_stride, const int64_t* __restrict__ row_index,
    const float* __restrict__ temperature, const int64_t* __restrict__ top_k, const float* __restrict__ top_p,
    const float* __restrict__ min_p, const int64_t* __restrict__ seed, const int64_t* __restrict__ offset,
    int64_t* __restrict__ tokens, float* __restrict__ logprobs) {
  __shared__ float smem[kWarps * (kPivots + 1)];
  __shared__ MaxSum acc_smem[kWarps];
  __shared__ Best best_smem[kWarps];
  const int64_t r = blockIdx.x;
  const T* row = logits + row_index[r] * row_stride;
  const float temp = temperature[r], p = top_p[r], mp = min_p[r];
  const int64_t k = top_k[r];
  const uint32_t key = sampling_row_key(seed[r], offset[r], r);
  const bool greedy = !(temp > 0.f);
  const float inv_t = greedy ? 1.f : 1.f / temp;
  const bool use_k = k > 0 && k < vocab, use_p = p < 1.f, use_mp = mp > 0.f;
  const bool filtered = !greedy && (use_k || use_p || use_mp);
  if (filtered != FILTERED) return;

  Best best{-INFINITY, -1, 0.f};
  if constexpr (!FILTERED) {
    // One read. A NaN or +inf z makes the sum NaN (exp(NaN), or inf - inf once the max is +inf), which marks
    // the row bad; a greedy row keeps that flag in the sum's place and draws nothing.
    MaxSum acc{-INFINITY, 0.f};
    if (greedy) {  // block-uniform: no noise, no exp
      float bad = 0.f;
      for_row_packs<kThreads>(row, vocab, [&](int64_t v0, const auto& x) {
        constexpr int kN = sizeof(x) / sizeof(float);
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          bad = x[j] < INFINITY ? bad : NAN;
          if (x[j] > best.key) best = Best{x[j], v0 + j, x[j]};
        }
      });
      acc.s = bad;
    } else {
      // Per 16-byte pack: its max, one rescale of the running sum, the exps, then the draw (warp's best shared)
      for_row_packs<kThreads>(row, vocab, [&](int64_t v0, const auto& x) {
        float z[sizeof(x) / sizeof(float)];
        const float pm = scale_pack(x, inv_t, z);
        if (!add_pack(acc, z, pm)) return;  // every logit -inf so far: nothing to draw
        draw_pack(best, z, pm, v0, key, warp_best_key(best.key));
      });
    }
    block_draw<true>(acc, best, acc_smem, best_smem);
    if (threadIdx.x == 0) {
      const bool bad = acc.s != acc.s || best.idx < 0;  // NaN / +inf, or every logit -inf
      tokens[r] = bad ? -1 : best.idx;
      logprobs[r] = bad || greedy ? 0.f : best.z - acc.m - logf(acc.s);
    }
  } else {
    // pass 1: max, -(min finite value), NaN/+inf flag in one reduction
    float st[3] = {-INFINITY, -INFINITY, 0.f};
    for_row_packs<kThreads>(row, vocab, [&](int64_t, const auto& x) {
      constexpr int kN = sizeof(x) / sizeof(float);
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float z = __fmul_rn(x[j], inv_t);
        st[2] = z < INFINITY ? st[2] : 1.f;
        st[0] = fmaxf(st[0], z);
        st[1] = z > -INFINITY ? fmaxf(st[1], -z) : st[1];
      }
    });
    block_reduce(st, Max{}, smem);
    const float m = st[0];
    if (st[2] != 0.f || m == -INFINITY) {
      if (threadIdx.x == 0) tokens[r] = -1, logprobs[r] = 0.f;
      return;
    }
    float t = use_mp ? m + logf(mp) : -st[1];
    if (use_k) t = fmaxf(t, search<T, false>(row, vocab, inv_t, m, t, m, float(k), false, smem));
    if (use_p) t = fmaxf(t, search<T, true>(row, vocab, inv_t, m, t, m, p, true, smem));
    // the draw over z >= t: a pack with no survivor costs its converts and one compare
    MaxSum acc{m, 0.f};
    for_row_packs<kThreads>(row, vocab, [&](int64_t v0, const auto& x) {
      constexpr int kN = sizeof(x) / sizeof(float);
      float z[kN];
      const float pm = scale_pack(x, inv_t, z);
      if (!(pm >= t)) return;
      float zk[kN];
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const bool kept = z[j] >= t;
        acc.s += kept ? exp_term(z[j] - m) : 0.f;
        zk[j] = kept ? z[j] : -INFINITY;
      }
      draw_pack(best, zk, pm, v0, key, warp_best_key(best.key));
    });
    block_draw<false>(acc, best, acc_smem, best_smem);
    if (threadIdx.x == 0) {
      tokens[r] = best.idx;
      logprobs[r] = best.idx < 0 ? 0.f : best.z - m - logf(acc.s);
    }
  }
}

const char* status(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

const char* sample(const void* logits, int dtype, int64_t n_out, int64_t vocab, int64_t row_stride,
                   const int64_t* row_index, const float* temperature, const int64_t* top_k,
                   const float* top_p, const float* min_p, const int64_t* seed, const int64_t* offset,
                   int64_t* tokens, float* logprobs, uintptr_t stream) {
  if (n_out == 0) return nullptr;
  if (n_out > 0x7fffffffLL) return "sample: too many rows for one launch";
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PREFKERN_DISPATCH_DTYPE(dtype, T,
      sample_kernel<T, false><<<static_cast<unsigned>(n_out), kThreads, 0, s>>>(
          static_cast<const T*>(logits), vocab, row_stride, row_index, temperature, top_k, top_p, min_p,
          seed, offset, tokens, logprobs);
      sample_kernel<T, true><<<static_cast<unsigned>(n_out), kThreads, 0, s>>>(
          static_cast<const T*>(logits), vocab, row_stride, row_index, temperature, top_k, top_p, min_p,
          seed, offset, tokens, logprobs));
  return status(cudaGetLastError());
}

}  // namespace prefkern::cuda
