// Scalar building blocks written so that GCC/Clang vectorise the loops that call them:
// storage-dtype conversion and an exp with ~1 ulp error and no branches.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// Hot loops are compiled twice, for AVX2+FMA (x86-64-v3) and for the baseline, and the loader picks
// the one the CPU runs: one portable wheel, vector code where the machine has it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFKERN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PREFKERN_CLONES
#endif

namespace prefkern {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline float f16_to_float(uint16_t h16) {
  // IEEE half: shift the exponent/mantissa into place, rescale by 2^112 (handles subnormals too).
  uint32_t h = h16;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float mag = bits_to_float(em << 13) * 0x1p112f;
  uint32_t inf_nan = 0x7f800000u | (em << 13);
  uint32_t bits = em >= 0x7c00u ? inf_nan : float_to_bits(mag);
  return bits_to_float(bits | sign);
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(std::isnan(f) ? 0x7fc0u : rounded);
}

// Round-to-nearest-even float -> IEEE half, branch-free so that loops calling it vectorise
// (after F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_f16(float f) {
  const uint32_t f32_inf = 255u << 23, f16_overflow = (127u + 16u) << 23;
  const float denorm_magic = bits_to_float(((127u - 15u) + (23u - 10u) + 1u) << 23);
  uint32_t u = float_to_bits(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t inf_nan = u > f32_inf ? 0x7e00u : 0x7c00u;
  uint32_t denorm = float_to_bits(bits_to_float(u) + denorm_magic) - float_to_bits(denorm_magic);
  uint32_t normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  uint32_t out = u >= f16_overflow ? inf_nan : (u < (113u << 23) ? denorm : normal);
  return static_cast<uint16_t>(out | (sign >> 16));
}

// Storage types as template parameters, so every loop is compiled (and vectorised) per dtype.
struct F32 {
  using storage = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float x) { return float_to_bf16(x); }
};
struct F16 {
  using storage = uint16_t;
  static float load(uint16_t x) { return f16_to_float(x); }
  static uint16_t store(float x) { return float_to_f16(x); }
};

// Throws std::invalid_argument (a Python ValueError through nanobind) for a code that is no dtype.
inline void check_dtype_code(int dtype) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("unknown dtype code " + std::to_string(dtype) + " (0 = f32, 1 = bf16, 2 = f16)");
}

// Calls fn(Tag{}) with the storage tag of a dtype code (0 = f32, 1 = bf16, 2 = f16).
template <class Fn>
void dispatch_dtype(int dtype, Fn fn) {
  switch (dtype) {
    case static_cast<int>(DType::f32): fn(F32{}); break;
    case static_cast<int>(DType::bf16): fn(BF16{}); break;
    case static_cast<int>(DType::f16): fn(F16{}); break;
    default: check_dtype_code(dtype);
  }
}

// exp(x) for x <= 0 in practice (arguments are z - max); exact 0 below the fp32 range, +inf above.
inline float exp_nonpos(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  float n = std::nearbyint(xc * log2e);
  float r = xc - n * ln2_hi - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  float y = p * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.7f ? INFINITY : y;
  return x != x ? x : y;
}

}  // namespace prefkern
