#pragma once
#include <cstdint>

namespace prefkern::cuda {

// Same contracts as prefkern::cpu::logprobs_* (lse_parts: [N, 2] fp32, (m, log s) per row), on device
// pointers, launched on `stream`.
// Return a CUDA error string, or nullptr on success.
const char* logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                             int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                             float inv_temperature, float* logp, float* lse_parts, uintptr_t stream);

const char* logprobs_backward(const float* grad, const void* logits, int dtype, int64_t n_rows,
                              int64_t vocab, int64_t row_stride, const int64_t* labels,
                              int64_t ignore_index, float inv_temperature, const float* lse_parts,
                              void* grad_logits, int64_t grad_row_stride, uintptr_t stream);

}  // namespace prefkern::cuda
