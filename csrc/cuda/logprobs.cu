#include "cuda/logprobs.h"

#include <cuda_runtime.h>

#include "cuda/dtype.cuh"
#include "cuda/row_loads.cuh"

namespace prefkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBackwardChunk = 4096;  // vocabulary entries per block in backward

__device__ __forceinline__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum warp_part[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
    v = merge(v, o);
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_part[lane] : MaxSum{-INFINITY, 0.f};
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
      v = merge(v, o);
    }
  }
  return v;
}

template <class T>
__global__ void __launch_bounds__(kThreads) logprobs_forward_kernel(
    const T* __restrict__ logits, int64_t vocab, int64_t row_stride, const int64_t* __restrict__ labels,
    int64_t ignore_index, float scale, float* __restrict__ logp, float* __restrict__ lse_parts) {
  const int64_t n = blockIdx.x;
  const T* row = logits + n * row_stride;
  MaxSum acc{-INFINITY, 0.f};
  // Per 16-byte pack: its max, one rescale of the running sum, then the exps (no branch per element).
  for_row_packs<kThreads>(row, vocab, [&](int64_t, const auto& x) {
    float z[sizeof(x) / sizeof(float)];
    add_pack(acc, z, scale_pack(x, scale, z));
  });
  acc = block_merge(acc);
  if (threadIdx.x == 0) {
    float log_s = logf(acc.s);
    lse_parts[2 * n] = acc.m;
    lse_parts[2 * n + 1] = log_s;
    int64_t y = labels[n];
    // (z_y - m) - log s: z_y - lse would carry the rounding of lse, one ulp of |lse|
    logp[n] = y == ignore_index ? 0.f
              : (y < 0 || y >= vocab ? NAN : (__fmul_rn(to_float(row[y]), scale) - acc.m) - log_s);
  }
}

// out may be logits itself (the chunked linear_logprobs backward works in place): no __restrict__ on
// either, plain loads (no __ldg), and each element is read before the same thread writes it. The chunk is read
// in 16-byte packs after a scalar head up to the first 16-byte boundary; out is written in packs too when it
// has the same alignment as the row (always when in place), else element by element.
template <class T>
__global__ void __launch_bounds__(kThreads) logprobs_backward_kernel(
    const float* __restrict__ grad, const T* logits, int64_t vocab, int64_t row_stride,
    const int64_t* __restrict__ labels, int64_t ignore_index, float scale,
    const float* __restrict__ lse_parts, T* out, int64_t out_stride, int64_t chunks_per_row) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 2;
  const int64_t n = blockIdx.x / chunks_per_row;
  const int64_t v0 = (blockIdx.x % chunks_per_row) * kBackwardChunk;
  const int64_t v1 = min(vocab, v0 + kBackwardChunk);
  const int64_t y = labels[n];
  const float gs = y == ignore_index ? 0.f : grad[n] * scale;
  const float m = lse_parts[2 * n], log_s = lse_parts[2 * n + 1];
  const T* row = logits + n * row_stride + v0;
  T* orow = out + n * out_stride + v0;
  const int64_t yc = y - v0;  // the label's column in this chunk
  // z rounded as in the forward's max and sum (no FMA), then (z - m) - log s: exact to p's own rounding
  auto dz = [&](int64_t v, float x) {
    float p = gs == 0.f ? 0.f : __expf((__fmul_rn(x, scale) - m) - log_s);
    return gs * ((v == yc ? 1.f : 0.f) - p);
  };
  const RowSplit split = row_split(reinterpret_cast<uintptr_t>(row), v1 - v0, sizeof(T));
  const bool packed_out = ((reinterpret_cast<uintptr_t>(orow) ^ reinterpret_cast<uintptr_t>(row)) & 15) == 0;
  for (int64_t v = threadIdx.x; v < split.head; v += kThreads) orow[v] = from_float<T>(dz(v, to_float(row[v])));
  const uint4* src = reinterpret_cast<const uint4*>(row + split.head);
  for (int64_t i0 = threadIdx.x; i0 < split.packs; i0 += int64_t(kThreads) * kUnroll) {
    uint4 pack[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * kThreads < split.packs) pack[u] = src[i0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kThreads;
      if (i >= split.packs) break;
      const int64_t c0 = split.head + i * kVec;
      const T* e = reinterpret_cast<const T*>(&pack[u]);
      uint4 res;
      T* r = reinterpret_cast<T*>(&res);
#pragma unroll
      for (int j = 0; j < kVec; ++j) r[j] = from_float<T>(dz(c0 + j, to_float(e[j])));
      if (packed_out) {
        *reinterpret_cast<uint4*>(orow + c0) = res;
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) orow[c0 + j] = r[j];
      }
    }
  }
  for (int64_t v = split.head + split.packs * kVec + threadIdx.x; v < v1 - v0; v += kThreads)
    orow[v] = from_float<T>(dz(v, to_float(row[v])));
}

const char* status(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

const char* logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                             int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                             float inv_temperature, float* logp, float* lse_parts, uintptr_t stream) {
  if (n_rows == 0) return nullptr;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  PREFKERN_DISPATCH_DTYPE(dtype, T,
      logprobs_forward_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, s>>>(
          static_cast<const T*>(logits), vocab, row_stride, labels, ignore_index, inv_temperature,
          logp, lse_parts));
  return status(cudaGetLastError());
}

const char* logprobs_backward(const float* grad, const void* logits, int dtype, int64_t n_rows,
                              int64_t vocab, int64_t row_stride, const int64_t* labels,
                              int64_t ignore_index, float inv_temperature, const float* lse_parts,
                              void* grad_logits, int64_t grad_row_stride, uintptr_t stream) {
  if (n_rows == 0 || vocab == 0) return nullptr;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  int64_t chunks = (vocab + kBackwardChunk - 1) / kBackwardChunk;
  int64_t blocks = n_rows * chunks;
  if (blocks > 0x7fffffffLL) return "logprobs_backward: too many rows for one launch";
  PREFKERN_DISPATCH_DTYPE(dtype, T,
      logprobs_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          grad, static_cast<const T*>(logits), vocab, row_stride, labels, ignore_index,
          inv_temperature, lse_parts, static_cast<T*>(grad_logits), grad_row_stride, chunks));
  return status(cudaGetLastError());
}

}  // namespace prefkern::cuda
