// The counter-based random stream of prefkern.sample, shared by the C++ and CUDA kernels and written
// again, operation for operation, in kernels/sampling.py and prefkern.reference.sampling_row_key:
// a 32-bit integer hash (C. Wellons' lowbias32) of (seed, offset, output row), then of the column.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PREFKERN_HD __host__ __device__ __forceinline__
#else
#define PREFKERN_HD inline
#endif

namespace prefkern {

PREFKERN_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

PREFKERN_HD uint32_t sampling_row_key(int64_t seed, int64_t offset, int64_t row) {
  uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  uint32_t k = mix32(static_cast<uint32_t>(s) ^ 0x9e3779b9u);
  k = mix32(k ^ static_cast<uint32_t>(s >> 32));
  k = mix32(k ^ static_cast<uint32_t>(o));
  k = mix32(k ^ static_cast<uint32_t>(o >> 32));
  return mix32(k ^ static_cast<uint32_t>(static_cast<uint64_t>(row)));
}

// Uniform in (0, 1): (2 * (h >> 9) + 1) * 2^-24, exact in float32 on every backend.
PREFKERN_HD float sampling_uniform(uint32_t key, uint32_t column) {
  uint32_t h = mix32(mix32(key ^ column) + 0x6a09e667u);
  return static_cast<float>(static_cast<int32_t>(((h >> 9) << 1) | 1u)) * 5.9604644775390625e-8f;
}

}  // namespace prefkern
