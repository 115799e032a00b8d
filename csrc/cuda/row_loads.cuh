#pragma once
#include <cstdint>

#include "cuda/dtype.cuh"

namespace prefkern::cuda {

// Calls f(v, x) for this thread's elements of a row read by a block of THREADS threads, v increasing per
// thread: 16-byte loads (8 bf16/f16 or 4 fp32), kUnroll of them in flight per thread, when the row is
// 16-byte aligned; then the scalar tail (and the whole row when it is not aligned).
template <int THREADS, class T, class F>
__device__ __forceinline__ void for_row(const T* __restrict__ row, int64_t vocab, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  int64_t start = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const int64_t nvec = vocab / kVec;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    for (int64_t i0 = threadIdx.x; i0 < nvec; i0 += int64_t(THREADS) * kUnroll) {
      uint4 pack[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        int64_t i = i0 + int64_t(u) * THREADS;
        if (i < nvec) pack[u] = __ldg(rv + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        int64_t i = i0 + int64_t(u) * THREADS;
        if (i >= nvec) break;
        const T* e = reinterpret_cast<const T*>(&pack[u]);
#pragma unroll
        for (int j = 0; j < kVec; ++j) f(i * kVec + j, to_float(e[j]));
      }
    }
    start = nvec * kVec;
  }
  for (int64_t v = start + threadIdx.x; v < vocab; v += THREADS) f(v, to_float(row[v]));
}

// Like for_row, but hands f whole 16-byte packs: f(x) with x a float[16 / sizeof(T)] array of the pack's
// values; the scalar tail (and a row that is not 16-byte aligned) comes as float[1] arrays.
template <int THREADS, class T, class F>
__device__ __forceinline__ void for_row_packs(const T* __restrict__ row, int64_t vocab, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  int64_t start = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const int64_t nvec = vocab / kVec;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    for (int64_t i0 = threadIdx.x; i0 < nvec; i0 += int64_t(THREADS) * kUnroll) {
      uint4 pack[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        int64_t i = i0 + int64_t(u) * THREADS;
        if (i < nvec) pack[u] = __ldg(rv + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i0 + int64_t(u) * THREADS >= nvec) break;
        const T* e = reinterpret_cast<const T*>(&pack[u]);
        float x[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) x[j] = to_float(e[j]);
        f(x);
      }
    }
    start = nvec * kVec;
  }
  for (int64_t v = start + threadIdx.x; v < vocab; v += THREADS) {
    float x[1] = {to_float(row[v])};
    f(x);
  }
}

}  // namespace prefkern::cuda
