#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace prefkern::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// e^x for the terms of a sum whose largest term is 1 (x <= 0): ex2.approx.ftz, one FMUL and one MUFU.EX2
// (__expf adds three instructions for a subnormal result, which is below half an ulp of such a sum anyway).
__device__ __forceinline__ float exp_term(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
}

// Running (max, sum of exp(x - max)) pair of an online log-sum-exp, merged across threads.
struct MaxSum {
  float m, s;
};
// A NaN logit never becomes the max (fmaxf drops it) but makes s NaN; the -inf case keeps that NaN.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, a.s + b.s};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// z[j] = x[j] * scale rounded once (__fmul_rn: never contracted into an FMA, so that every later use of z, such
// as z_y - m, sees the same value); returns the pack's max (fmaxf drops NaN).
template <int N>
__device__ __forceinline__ float scale_pack(const float (&x)[N], float scale, float (&z)[N]) {
  float pm = -INFINITY;
#pragma unroll
  for (int j = 0; j < N; ++j) z[j] = __fmul_rn(x[j], scale), pm = fmaxf(pm, z[j]);
  return pm;
}

// Adds a pack of scaled logits z (max pm) to an online log-sum-exp: one rescale of the running sum, then the
// exps, no branch per element. False while every value so far is -inf (exp(-inf - -inf) would be NaN): the sum
// then only keeps a NaN. A NaN z reaches the sum through its exp.
template <int N>
__device__ __forceinline__ bool add_pack(MaxSum& acc, const float (&z)[N], float pm) {
  const float m = fmaxf(acc.m, pm);
  if (m == -INFINITY) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc.s = z[j] != z[j] ? z[j] : acc.s;
    return false;
  }
  float s = acc.s * exp_term(acc.m - m);  // 0 while acc.m is -inf; NaN stays NaN
#pragma unroll
  for (int j = 0; j < N; ++j) s += exp_term(z[j] - m);
  acc = MaxSum{m, s};
  return true;
}

}  // namespace prefkern::cuda

// Used in host functions that return an error string; the bindings reject unknown codes before this.
#define PREFKERN_DISPATCH_DTYPE(dtype, T, ...)                  \
  switch (dtype) {                                              \
    case 0: { using T = float; __VA_ARGS__; break; }            \
    case 1: { using T = __nv_bfloat16; __VA_ARGS__; break; }    \
    case 2: { using T = __half; __VA_ARGS__; break; }           \
    default: return "unknown dtype code (0 = f32, 1 = bf16, 2 = f16)"; \
  }
