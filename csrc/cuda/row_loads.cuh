#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include "cuda/dtype.cuh"
#define PREFKERN_ROW_HD __host__ __device__ __forceinline__
#else  // the host test compiles row_split alone with g++
#define PREFKERN_ROW_HD inline
#endif

namespace prefkern::cuda {

// How a row of `vocab` elements of `elem_size` bytes starting at `address` is read: `head` scalars up to the
// first 16-byte boundary, `packs` 16-byte packs of 16 / elem_size elements, then the scalar tail (the rest).
// A row that is not even elem_size-aligned is read all scalar (head = vocab, packs = 0).
struct RowSplit {
  int64_t head, packs;
};

PREFKERN_ROW_HD RowSplit row_split(uint64_t address, int64_t vocab, int64_t elem_size) {
  if (vocab <= 0) return {0, 0};
  if (address % uint64_t(elem_size) != 0) return {vocab, 0};
  const int64_t head = int64_t((16 - address % 16) % 16) / elem_size;
  if (head >= vocab) return {vocab, 0};
  return {head, (vocab - head) / (16 / elem_size)};
}

#if defined(__CUDACC__)

// Hands f this thread's elements of a row read by a block of THREADS threads, a 16-byte pack at a time:
// f(v0, x) with x a float[16 / sizeof(T)] array of the values at v0, v0 + 1, ...; the misaligned head (up to
// the first 16-byte boundary) and the tail come one element at a time as float[1]. kUnroll packs in flight
// per thread. Each thread sees its columns in increasing order (head, body, tail).
template <int THREADS, class T, class F>
__device__ __forceinline__ void for_row_packs(const T* __restrict__ row, int64_t vocab, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  const RowSplit split = row_split(reinterpret_cast<uintptr_t>(row), vocab, sizeof(T));
  for (int64_t v = threadIdx.x; v < split.head; v += THREADS) {
    float x[1] = {to_float(row[v])};
    f(v, x);
  }
  const int64_t nvec = split.packs;
  const uint4* rv = reinterpret_cast<const uint4*>(row + split.head);
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
      f(split.head + (i0 + int64_t(u) * THREADS) * kVec, x);
    }
  }
  for (int64_t v = split.head + nvec * kVec + threadIdx.x; v < vocab; v += THREADS) {
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

#endif  // __CUDACC__

}  // namespace prefkern::cuda
