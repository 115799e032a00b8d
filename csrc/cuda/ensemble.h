#pragma once
#include <cstdint>

namespace prefkern::cuda {

// Same contracts as prefkern::cpu::ensemble_reduce / ensemble_head_forward, on device pointers, launched
// on `stream`. Return a CUDA error string, or nullptr on success.
const char* ensemble_reduce(const void* scores, int dtype, int64_t k, int64_t n, int64_t stride_k,
                            const float* mu, const float* sigma, int method, float lam, int ddof,
                            float* combined, float* mean, float* var, uintptr_t stream);

const char* ensemble_head_forward(const void* hidden, int dtype, int64_t b, int64_t h, int64_t stride_b,
                                  int64_t stride_t, const int64_t* last, const void* weight, int64_t k,
                                  int64_t w_stride, const float* bias, const float* mu, const float* sigma,
                                  int method, float lam, int ddof, float* scores, float* combined, float* mean,
                                  float* var, uintptr_t stream);

}  // namespace prefkern::cuda
