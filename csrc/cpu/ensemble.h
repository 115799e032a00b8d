#pragma once
#include <cstdint>

namespace prefkern::cpu {

// Reduction codes shared with prefkern.ops.ensemble (METHODS there).
enum EnsembleMethod : int { kEnsembleMean = 0, kEnsembleWco = 1, kEnsembleUwo = 2 };

// scores: [K, N] in dtype (f32/bf16/f16), element (k, n) at scores + k * stride_k + n (unit column stride).
// mu, sigma: [K] fp32, both null (no normalisation) or both set: member k is read as (s - mu[k]) / sigma[k].
// Writes, per column n, mean[n] and var[n] = sum_k (s - mean)^2 / (K - ddof) of the (normalised) members
// and combined[n]: the mean (method 0), the minimum (1) or mean - lam * var (2). All fp32.
void ensemble_reduce(const void* scores, int dtype, int64_t k, int64_t n, int64_t stride_k, const float* mu,
                     const float* sigma, int method, float lam, int ddof, float* combined, float* mean,
                     float* var);

// hidden: [B, T, H] in dtype, element (b, t, h) at hidden + b * stride_b + t * stride_t + h.
// last: [B] int64 in [0, T): the position read from each sequence. weight: [K, H] in the same dtype,
// row stride w_stride, unit column stride; bias: [K] fp32 or null.
// Writes the raw member scores s[k, b] = <hidden[b, last[b]], weight[k]> + bias[k] to scores ([K, B]
// fp32, contiguous) and the reduction of the (normalised) members exactly as ensemble_reduce does.
void ensemble_head_forward(const void* hidden, int dtype, int64_t b, int64_t h, int64_t stride_b,
                           int64_t stride_t, const int64_t* last, const void* weight, int64_t k,
                           int64_t w_stride, const float* bias, const float* mu, const float* sigma,
                           int method, float lam, int ddof, float* scores, float* combined, float* mean,
                           float* var);

// Backward of the heads given grad [K, B] fp32 = d loss / d raw score s[k, b]:
// grad_hidden[b, last[b], :] = sum_k grad[k, b] * weight[k, :] (dtype of hidden; element (b, t, h) at
// grad_hidden + b * g_stride_b + t * g_stride_t + h; other positions are left untouched, so the caller
// passes a zeroed tensor) and grad_weight[k, :] = sum_b grad[k, b] * hidden[b, last[b], :] ([K, H] fp32,
// contiguous). Either output may be null. Threads split H, so the sums over b are deterministic.
void ensemble_head_backward(const float* grad, const void* hidden, int dtype, int64_t b, int64_t h,
                            int64_t stride_b, int64_t stride_t, const int64_t* last, const void* weight, int64_t k,
                            int64_t w_stride, void* grad_hidden, int64_t g_stride_b, int64_t g_stride_t,
                            float* grad_weight);

}  // namespace prefkern::cpu
