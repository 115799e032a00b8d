#pragma once
#include <cstdint>

namespace prefkern::cuda {

// Same contract as prefkern::cpu::sample, on device pointers, launched on `stream` (one block per output
// row). Returns a CUDA error string, or nullptr on success.
const char* sample(const void* logits, int dtype, int64_t n_out, int64_t vocab, int64_t row_stride,
                   const int64_t* row_index, const float* temperature, const int64_t* top_k,
                   const float* top_p, const float* min_p, const int64_t* seed, const int64_t* offset,
                   int64_t* tokens, float* logprobs, uintptr_t stream);

}  // namespace prefkern::cuda
