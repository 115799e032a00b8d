// The counter-based random stream of prefkern.sample, shared by the C++ and CUDA kernels and written
// again, operation for operation, in kernels/sampling.py and prefkern.reference.sampling_row_key:
// a 32-bit integer hash (C. Wellons' lowbias32) of (seed, offset, output row), then of the column.
#pragma once
#include <cstdint>
#include <cstring>

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

PREFKERN_HD uint32_t rng_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

PREFKERN_HD float rng_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// log(x) for normal x > 0 (Cephes logf, ~1 ulp), branch-free so that the CPU Gumbel loop vectorises.
// Accurate near 1 because f = m - 1 is exact there: the inner log of the Gumbel noise needs that, as
// -log(u) for u = 1 - 2^-24 is 6e-8 (a fast log such as CUDA's __logf, ~2^-21 absolute error, returns 0
// or a positive value there, and the noise becomes +inf or NaN).
PREFKERN_HD float log_positive(float x) {
  uint32_t bits = rng_float_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126);
  float m = rng_bits_float((bits & 0x7fffffu) | 0x3f000000u);  // [0.5, 1)
  bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  float f = small ? m + m - 1.0f : m - 1.0f;
  float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return f + y + e * 0.693359375f;
}

// -log(-log(u)): finite and within a few ulp for every u that sampling_uniform makes, 1 - 2^-24 included.
PREFKERN_HD float gumbel_from_uniform(float u) { return -log_positive(-log_positive(u)); }

PREFKERN_HD float sampling_gumbel(uint32_t key, uint32_t column) {
  return gumbel_from_uniform(sampling_uniform(key, column));
}

#if defined(__CUDACC__)  // device-only: nvcc's host pass sees a __device__ declaration, g++ nothing
// The CUDA kernels' noise from sampling_uniform's u: the same stream, with the outer log on the hardware's
// lg2.approx. Its argument w = -log(u) lies in [6e-8, 16.7], where only the absolute error of the noise
// matters: lg2.approx's absolute error (at most 2^-22 in log2, PTX ISA) times ln 2, the rounding of the
// product (half an ulp of |g| < 16.7, at most 2^-20) and the inner log's few ulp of w (at most 2^-21 in log w)
// keep |noise - g(u)| below 2^-19 (kGumbelError in sampling.cu; tests/test_cuda_build.py holds the host twin
// against float64).
__device__ __forceinline__ float gumbel_fast_from_uniform(float u) {
  const float w = -log_positive(u);
  float log2_w;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(log2_w) : "f"(w));  // w is normal: ftz changes nothing
  return log2_w * -0.693147180559945309f;
}
#endif

}  // namespace prefkern
