#pragma once
#include <cstdint>

namespace prefkern::cpu {

// logits: [N, V] in dtype (f32/bf16/f16), element (n, v) at logits + n * row_stride + v.
// labels: [N] int64, contiguous. Writes logp[N] (fp32) of z = logits * inv_temperature and the row's
// log-sum-exp in two parts, lse_parts[2n] = m = max_v z[n, v] and lse_parts[2n + 1] = log sum_v exp(z - m)
// ([N, 2] fp32, row-major): their fp32 sum would carry an error of one ulp of |lse| into the backward.
// Rows whose label is ignore_index get logp = 0 (their parts are still computed).
void logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                      const int64_t* labels, int64_t ignore_index, float inv_temperature,
                      float* logp, float* lse_parts);

// grad_logits[n, v] = grad[n] * inv_temperature * (1[v == label_n] - exp((z[n, v] - m[n]) - log_s[n]))
// with (m, log_s) the forward's lse_parts,
// zero on ignored rows; grad_logits has the dtype of logits and its own row stride. grad_logits may
// be logits itself (in place, same row stride).
void logprobs_backward(const float* grad, const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                       int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                       float inv_temperature, const float* lse_parts, void* grad_logits,
                       int64_t grad_row_stride);

// Per-row statistics of softmax(z * inv_temperature) from the forward's lse_parts, in one read of each row:
// out[4n .. 4n+3] = entropy, log sum_v p_v^2, sum_v z * inv_temperature, 1 if the label is the first argmax
// else 0 (fp32, [N, 4] row-major); all 0 on rows labelled ignore_index. -inf logits add nothing.
void row_stats(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
               const int64_t* labels, int64_t ignore_index, float inv_temperature, const float* lse_parts,
               float* out);

}  // namespace prefkern::cpu
