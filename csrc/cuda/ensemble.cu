// Ensemble reward scoring. The head kernel is bound by reading the N last-token rows once. One block
// scores kRows rows against a group of kGroup members per pass, its 256 threads striding over H in
// 16-byte packs, so that every weight pack (from L1/L2: all blocks share the [K, H] weight) serves kRows
// rows and every row pack serves kGroup members; kRows * kGroup = 32 partial sums per thread are then
// reduce-scattered across the warp (31 shuffles, lane l ends with sum l) and summed over the warps.
// K > kGroup takes ceil(K / kGroup) passes, the later ones re-reading the block's rows from L2.
#include "cuda/ensemble.h"

#include <cuda_runtime.h>

#include "cuda/dtype.cuh"

namespace prefkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;   // rows per block
constexpr int kGroup = 8;  // members per pass

// The running minimum of the members that keeps a NaN once it has seen one (fminf drops NaN, which
// would let a sequence whose hidden state is NaN win best-of-n under "wco").
__device__ __forceinline__ float take_min(float lo, float x) { return (x < lo || x != x) ? x : lo; }

// Mean, minimum and variance of the K (already normalised) member scores s[0..K), stride `step`.
__device__ __forceinline__ void combine(const float* s, int64_t step, int64_t k, const float* mu,
                                        const float* sigma, int method, float lam, float inv_dof,
                                        float* combined, float* mean, float* var) {
  float sum = 0.f, lo = INFINITY;
  for (int64_t i = 0; i < k; ++i) {
    float x = mu ? (s[i * step] - mu[i]) / sigma[i] : s[i * step];
    sum += x;
    lo = take_min(lo, x);
  }
  const float m = sum / static_cast<float>(k);
  float ss = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    float d = (mu ? (s[i * step] - mu[i]) / sigma[i] : s[i * step]) - m;
    ss += d * d;
  }
  const float v = ss * inv_dof;
  *mean = m;
  *var = v;
  *combined = method == 0 ? m : (method == 1 ? lo : m - lam * v);
}

template <class T>
__global__ void __launch_bounds__(kThreads) ensemble_reduce_kernel(
    const T* __restrict__ scores, int64_t k, int64_t n, int64_t stride_k, const float* __restrict__ mu,
    const float* __restrict__ sigma, int method, float lam, float inv_dof, float* __restrict__ combined,
    float* __restrict__ mean, float* __restrict__ var) {
  const int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= n) return;
  float sum = 0.f, lo = INFINITY;
  for (int64_t i = 0; i < k; ++i) {
    float x = to_float(__ldg(scores + i * stride_k + col));
    if (mu) x = (x - mu[i]) / sigma[i];
    sum += x;
    lo = take_min(lo, x);
  }
  const float m = sum / static_cast<float>(k);
  float ss = 0.f;
  for (int64_t i = 0; i < k; ++i) {  // second read of the column: from L1/L2
    float x = to_float(__ldg(scores + i * stride_k + col));
    if (mu) x = (x - mu[i]) / sigma[i];
    ss += (x - m) * (x - m);
  }
  const float v = ss * inv_dof;
  mean[col] = m;
  var[col] = v;
  combined[col] = method == 0 ? m : (method == 1 ? lo : m - lam * v);
}

// 16 bytes of T as floats.
template <class T>
struct Pack {
  static constexpr int kVec = 16 / sizeof(T);
  float v[kVec];
  __device__ __forceinline__ void load(const T* p) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = to_float(e[j]);
  }
};

// v[0..32) per lane in; out: lane l's v[0] = sum over the warp of v[l]. Each step halves the values a
// lane holds, keeping the half its partner does not keep and adding the partner's copy of it.
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[32]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    const bool upper = lane & off;
#pragma unroll
    for (int j = 0; j < off; ++j) {
      const float send = upper ? v[j] : v[j + off];
      const float keep = upper ? v[j + off] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
}

// VEC: every row start, the weight rows and H are 16-byte aligned (host-checked), so the rows are read
// in 16-byte packs; otherwise element by element.
template <class T, bool VEC>
__global__ void __launch_bounds__(kThreads) ensemble_head_kernel(
    const T* __restrict__ hidden, int64_t b, int64_t h, int64_t stride_b, int64_t stride_t,
    const int64_t* __restrict__ last, const T* __restrict__ weight, int64_t k, int64_t w_stride,
    const float* __restrict__ bias, const float* __restrict__ mu, const float* __restrict__ sigma, int method,
    float lam, float inv_dof, float* __restrict__ scores, float* __restrict__ combined, float* __restrict__ mean,
    float* __restrict__ var) {
  static_assert(kRows * kGroup == 32, "one lane per (row, member) of a pass");
  constexpr int kVec = VEC ? 16 / sizeof(T) : 1;
  __shared__ float partial[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const T* x[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = row0 + r < b ? row0 + r : row0;  // rows past the end repeat row0, never stored
    x[r] = hidden + row * stride_b + last[row] * stride_t;
  }
  for (int64_t g0 = 0; g0 < k; g0 += kGroup) {
    float acc[kRows * kGroup];
#pragma unroll
    for (int i = 0; i < kRows * kGroup; ++i) acc[i] = 0.f;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < h; i += int64_t(kThreads) * kVec) {
      float xv[kRows][kVec];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if constexpr (VEC) {
          Pack<T> p;
          p.load(x[r] + i);
#pragma unroll
          for (int j = 0; j < kVec; ++j) xv[r][j] = p.v[j];
        } else {
          xv[r][0] = to_float(__ldg(x[r] + i));
        }
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (g0 + g >= k) break;
        float wv[kVec];
        const T* wp = weight + (g0 + g) * w_stride + i;
        if constexpr (VEC) {
          Pack<T> p;
          p.load(wp);
#pragma unroll
          for (int j = 0; j < kVec; ++j) wv[j] = p.v[j];
        } else {
          wv[0] = to_float(__ldg(wp));
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[r * kGroup + g] = fmaf(xv[r][j], wv[j], acc[r * kGroup + g]);
      }
    }
    warp_reduce_scatter(acc);
    partial[warp][lane] = acc[0];
    __syncthreads();
    if (warp == 0) {  // lane l = r * kGroup + g: member g0 + g of row row0 + r
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial[w][lane];
      const int r = lane / kGroup, g = lane % kGroup;
      if (row0 + r < b && g0 + g < k) scores[(g0 + g) * b + row0 + r] = total + (bias ? bias[g0 + g] : 0.f);
    }
    __syncthreads();  // `partial` is reused by the next pass; the scores are visible to the block
  }
  if (threadIdx.x < kRows && row0 + threadIdx.x < b) {
    const int64_t row = row0 + threadIdx.x;
    combine(scores + row, b, k, mu, sigma, method, lam, inv_dof, combined + row, mean + row, var + row);
  }
}

const char* status(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

float inverse_dof(int64_t k, int ddof) { return 1.0f / static_cast<float>(k - ddof); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

const char* ensemble_reduce(const void* scores, int dtype, int64_t k, int64_t n, int64_t stride_k,
                            const float* mu, const float* sigma, int method, float lam, int ddof,
                            float* combined, float* mean, float* var, uintptr_t stream) {
  if (n == 0) return nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffffLL) return "ensemble_reduce: too many columns for one launch";
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PREFKERN_DISPATCH_DTYPE(dtype, T,
      ensemble_reduce_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          static_cast<const T*>(scores), k, n, stride_k, mu, sigma, method, lam, inverse_dof(k, ddof), combined,
          mean, var));
  return status(cudaGetLastError());
}

const char* ensemble_head_forward(const void* hidden, int dtype, int64_t b, int64_t h, int64_t stride_b,
                                  int64_t stride_t, const int64_t* last, const void* weight, int64_t k,
                                  int64_t w_stride, const float* bias, const float* mu, const float* sigma,
                                  int method, float lam, int ddof, float* scores, float* combined, float* mean,
                                  float* var, uintptr_t stream) {
  if (b == 0) return nullptr;
  const int64_t blocks = (b + kRows - 1) / kRows;
  if (blocks > 0x7fffffffLL) return "ensemble_head_forward: too many rows for one launch";
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const float inv_dof = inverse_dof(k, ddof);
  PREFKERN_DISPATCH_DTYPE(dtype, T, {
    constexpr int64_t kVec = 16 / sizeof(T);
    const bool vec = aligned16(hidden) && aligned16(weight) && stride_b % kVec == 0 && stride_t % kVec == 0 &&
                     w_stride % kVec == 0 && h % kVec == 0;
    if (vec)
      ensemble_head_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          static_cast<const T*>(hidden), b, h, stride_b, stride_t, last, static_cast<const T*>(weight), k,
          w_stride, bias, mu, sigma, method, lam, inv_dof, scores, combined, mean, var);
    else
      ensemble_head_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          static_cast<const T*>(hidden), b, h, stride_b, stride_t, last, static_cast<const T*>(weight), k,
          w_stride, bias, mu, sigma, method, lam, inv_dof, scores, combined, mean, var);
  });
  return status(cudaGetLastError());
}

}  // namespace prefkern::cuda
