#pragma once
#include <cstdint>

#include "cuda/dtype.cuh"

namespace prefkern::cuda {

// Hands f this thread's elements of a row read by a block of THREADS threads, a 16-byte pack at a time:
// f(v0, x) with x a float[16 / sizeof(T)] array of the values at v0, v0 + 1, ...; kUnroll loads in flight per
// thread when the row is 16-byte aligned; the scalar tail (and a row that is not aligned) comes as float[1].
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
        f((i0 + int64_t(u) * THREADS) * kVec, x);
      }
    }
    start = nvec * kVec;
  }
  for (int64_t v = start + threadIdx.x; v < vocab; v += THREADS) {
    float x[1] = {to_float(row[v])};
    f(v, x);
  }
}

// Calls f(v, x) for this thread's elements of a row, one element at a time (for_row_packs underneath).
template <int THREADS, class T, class F>
__device__ __forceinline__ void for_row(const T* __restrict__ row, int64_t vocab, F&& f) {
  for_row_packs<THREADS>(row, vocab, [&](int64_t v0, const auto& x) {
    constexpr int kCount = sizeof(x) / sizeof(float);
#pragma unroll
    for (int j = 0; j < kCount; ++j) f(v0 + j, x[j]);
  });
}

}  // namespace prefkern::cuda
