#pragma once
#include <cstdint>

namespace prefkern::cpu {

// One token per output row r in [0, n_out) from logits row row_index[r] ([L, V] in dtype
// f32/bf16/f16, element (l, v) at logits + l * row_stride + v). Per-row parameters are contiguous [n_out]:
// temperature (0 = greedy), top_k (<= 0 or >= V: off), top_p (>= 1: off), min_p (<= 0: off), seed and
// offset (int64). Writes tokens[r] (-1 when the row has a NaN or +inf logit or no finite logit) and
// logprobs[r], the log-prob of the token under the filtered, renormalised distribution (0 when greedy).
void sample(const void* logits, int dtype, int64_t n_out, int64_t vocab, int64_t row_stride,
            const int64_t* row_index, const float* temperature, const int64_t* top_k, const float* top_p,
            const float* min_p, const int64_t* seed, const int64_t* offset, int64_t* tokens,
            float* logprobs);

}  // namespace prefkern::cpu
