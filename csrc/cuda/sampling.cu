// Token sampling, one block per output row. Temperature-only rows: Gumbel-max and the online
// log-sum-exp in one read of the row. Filtered rows: no sort; each threshold (top-k: count, top-p: mass)
// is found by a multi-pivot search on the value axis, kPivots + 1 pivots per pass over the row, each
// pass also snapping the interval to the nearest data values, until one distinct value is left.
#include "cuda/sampling.h"

#include <cuda_runtime.h>

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

__device__ Best better(Best a, Best b) {
  if (b.key > a.key || (b.key == a.key && b.idx >= 0 && (a.idx < 0 || b.idx < a.idx))) return b;
  return a;
}

__device__ Best block_best(Best b, Best* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    Best o{__shfl_xor_sync(0xffffffffu, b.key, off), __shfl_xor_sync(0xffffffffu, b.idx, off),
           __shfl_xor_sync(0xffffffffu, b.z, off)};
    b = better(b, o);
  }
  __syncthreads();
  if (lane == 0) smem[warp] = b;
  __syncthreads();
  Best acc = smem[0];
  for (int w = 1; w < kWarps; ++w) acc = better(acc, smem[w]);
  return acc;
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
      float w = MASS ? __expf(z - m) : 1.f;
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

  // pass 1: max, NaN/+inf check, min finite value; unfiltered rows also draw here (one read)
  float st[3] = {-INFINITY, INFINITY, 0.f};  // max, min finite, bad
  float s = 0.f, m_run = -INFINITY;
  Best best{-INFINITY, -1, 0.f};
  for_row<kThreads>(row, vocab, [&](int64_t v, float x) {
    float z = __fmul_rn(x, inv_t);
    st[2] = z < INFINITY ? st[2] : 1.f;
    st[0] = fmaxf(st[0], z);
    if (z > -INFINITY) st[1] = fminf(st[1], z);
    if (!FILTERED && z > -INFINITY && z < INFINITY) {
      if (z > m_run) {
        s = s * __expf(m_run - z) + 1.f;
        m_run = z;
      } else {
        s += __expf(z - m_run);
      }
      float gk = greedy ? z : z + sampling_gumbel(key, static_cast<uint32_t>(v));
      if (gk > best.key) best = Best{gk, v, z};
    }
  });
  {
    float mx[1] = {st[0]}, mn[1] = {st[1]}, bad[1] = {st[2]};
    block_reduce(mx, Max{}, smem);
    block_reduce(mn, Min{}, smem);
    block_reduce(bad, Max{}, smem);
    st[0] = mx[0], st[1] = mn[0], st[2] = bad[0];
  }
  const float m = st[0];
  if (st[2] != 0.f || m == -INFINITY) {
    if (threadIdx.x == 0) tokens[r] = -1, logprobs[r] = 0.f;
    return;
  }
  if constexpr (!FILTERED) {
    float sum[1] = {s * __expf(m_run - m)};
    if (m_run == -INFINITY) sum[0] = 0.f;
    block_reduce(sum, Sum{}, smem);
    best = block_best(best, best_smem);
    if (threadIdx.x == 0) {
      tokens[r] = best.idx;
      logprobs[r] = greedy ? 0.f : best.z - m - logf(sum[0]);
    }
    return;
  } else {
  float t = use_mp ? m + logf(mp) : st[1];
  if (use_k) t = fmaxf(t, search<T, false>(row, vocab, inv_t, m, t, m, float(k), false, smem));
  if (use_p) t = fmaxf(t, search<T, true>(row, vocab, inv_t, m, t, m, p, true, smem));
  float sum[1] = {0.f};
  for_row<kThreads>(row, vocab, [&](int64_t v, float x) {
    float z = __fmul_rn(x, inv_t);
    if (!(z >= t)) return;
    sum[0] += __expf(z - m);
    float gk = z + sampling_gumbel(key, static_cast<uint32_t>(v));
    if (gk > best.key) best = Best{gk, v, z};
  });
  block_reduce(sum, Sum{}, smem);
  best = block_best(best, best_smem);
  if (threadIdx.x == 0) {
    tokens[r] = best.idx;
    logprobs[r] = best.idx < 0 ? 0.f : best.z - m - logf(sum[0]);
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
