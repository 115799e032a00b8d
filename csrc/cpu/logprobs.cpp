#include "cpu/logprobs.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/parallel.h"
#include "cpu/simd_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFKERN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PREFKERN_CLONES
#endif

namespace prefkern::cpu {
namespace {

constexpr int64_t kBlock = 2048;  // fp32 scratch of 8 KiB stays in L1 between the two passes

template <class T>
inline void load_block(const T* src, int64_t count, float scale, DType dt, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i] * scale;
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = load_as_float(src + i, dt) * scale;
  }
}

// Online log-sum-exp over one row: each block is converted into L1 scratch once, then reduced twice
// (max, then sum of exp) from there, so memory sees a single read of the row.
template <class T>
PREFKERN_CLONES float row_logsumexp(const T* row, int64_t vocab, float scale, DType dt, float* scratch) {
  float m = -std::numeric_limits<float>::infinity();
  float s = 0.0f;
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    int64_t count = std::min(kBlock, vocab - v0);
    load_block(row + v0, count, scale, dt, scratch);
    float bm = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < count; ++i) bm = std::max(bm, scratch[i]);
    if (bm == -std::numeric_limits<float>::infinity()) continue;
    float nm = std::max(m, bm);
    float bs = 0.0f;
    for (int64_t i = 0; i < count; ++i) bs += exp_nonpos(scratch[i] - nm);
    s = s * exp_nonpos(m - nm) + bs;
    m = nm;
  }
  if (std::isnan(s)) return s;
  return m + std::log(s);
}

template <class T, class Store>
PREFKERN_CLONES void row_grad(const T* row, int64_t vocab, float scale, DType dt, float lse, float g,
                              Store store) {
  float gs = g * scale;
  for (int64_t v = 0; v < vocab; ++v) {
    float z;
    if constexpr (std::is_same_v<T, float>) z = row[v] * scale; else z = load_as_float(row + v, dt) * scale;
    store(v, -gs * exp_nonpos(z - lse));
  }
}

template <class T>
void forward_impl(const T* logits, DType dt, int64_t n_rows, int64_t vocab, int64_t row_stride,
                  const int64_t* labels, int64_t ignore_index, float scale, float* logp, float* lse) {
  parallel_for_rows(n_rows, vocab, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const T* row = logits + n * row_stride;
      float l = row_logsumexp(row, vocab, scale, dt, scratch);
      lse[n] = l;
      int64_t y = labels[n];
      if (y == ignore_index) {
        logp[n] = 0.0f;
      } else {
        float zy;
        if constexpr (std::is_same_v<T, float>) zy = row[y] * scale; else zy = load_as_float(row + y, dt) * scale;
        logp[n] = zy - l;
      }
    }
  });
}

template <class T>
void backward_impl(const float* grad, const T* logits, DType dt, int64_t n_rows, int64_t vocab,
                   int64_t row_stride, const int64_t* labels, int64_t ignore_index, float scale,
                   const float* lse, T* out, int64_t out_stride) {
  parallel_for_rows(n_rows, vocab, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* row = logits + n * row_stride;
      T* orow = out + n * out_stride;
      int64_t y = labels[n];
      float g = grad[n];
      if (y == ignore_index || g == 0.0f) {
        std::fill(orow, orow + vocab, T(0));
        continue;
      }
      if constexpr (std::is_same_v<T, float>) {
        row_grad(row, vocab, scale, dt, lse[n], g, [orow](int64_t v, float x) { orow[v] = x; });
        orow[y] += g * scale;
      } else {
        // Half-precision rows: compute in fp32, round once (label entry included).
        float zy = load_as_float(row + y, dt) * scale;
        float gy = g * scale * (1.0f - exp_nonpos(zy - lse[n]));
        if (dt == DType::bf16) {
          row_grad(row, vocab, scale, dt, lse[n], g, [orow](int64_t v, float x) { orow[v] = float_to_bf16(x); });
          orow[y] = float_to_bf16(gy);
        } else {
          row_grad(row, vocab, scale, dt, lse[n], g, [orow](int64_t v, float x) { orow[v] = float_to_f16(x); });
          orow[y] = float_to_f16(gy);
        }
      }
    }
  });
}

}  // namespace

void logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                      const int64_t* labels, int64_t ignore_index, float inv_temperature,
                      float* logp, float* lse) {
  DType dt = static_cast<DType>(dtype);
  if (dt == DType::f32)
    forward_impl(static_cast<const float*>(logits), dt, n_rows, vocab, row_stride, labels, ignore_index,
                 inv_temperature, logp, lse);
  else
    forward_impl(static_cast<const uint16_t*>(logits), dt, n_rows, vocab, row_stride, labels,
                 ignore_index, inv_temperature, logp, lse);
}

void logprobs_backward(const float* grad, const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                       int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                       float inv_temperature, const float* lse, void* grad_logits,
                       int64_t grad_row_stride) {
  DType dt = static_cast<DType>(dtype);
  if (dt == DType::f32)
    backward_impl(grad, static_cast<const float*>(logits), dt, n_rows, vocab, row_stride, labels,
                  ignore_index, inv_temperature, lse, static_cast<float*>(grad_logits), grad_row_stride);
  else
    backward_impl(grad, static_cast<const uint16_t*>(logits), dt, n_rows, vocab, row_stride, labels,
                  ignore_index, inv_temperature, lse, static_cast<uint16_t*>(grad_logits),
                  grad_row_stride);
}

}  // namespace prefkern::cpu
