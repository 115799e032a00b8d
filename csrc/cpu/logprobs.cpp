#include "cpu/logprobs.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/parallel.h"
#include "cpu/simd_math.h"

namespace prefkern::cpu {
namespace {

constexpr int64_t kBlock = 2048;  // fp32 scratch of 8 KiB stays in L1 between the two passes
constexpr int kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct MaxSum {
  float m, s;  // row max and sum of exp(z - m); both NaN when the row holds a NaN
};

// Online log-sum-exp over one row: each block is converted into L1 scratch once (with its max),
// then summed from there, so memory sees a single read of the row.
template <class D>
PREFKERN_CLONES MaxSum row_max_sum(const typename D::storage* row, int64_t vocab, float scale, float* scratch) {
  float m = kNegInf, s = 0.0f;
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    int64_t count = std::min(kBlock, vocab - v0);
    float bm = kNegInf;
    int nan = 0;  // std::max drops a NaN, and an otherwise all -inf block is skipped below
    for (int64_t i = 0; i < count; ++i) {
      scratch[i] = D::load(row[v0 + i]) * scale;
      bm = std::max(bm, scratch[i]);
      nan |= scratch[i] != scratch[i];
    }
    if (nan) return {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()};
    if (bm == kNegInf) continue;
    float nm = std::max(m, bm);
    // Lane-wise partial sums: a plain float reduction would not vectorise without -ffast-math.
    float lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += exp_nonpos(scratch[i + j] - nm);
    float bs = 0.0f;
    for (; i < count; ++i) bs += exp_nonpos(scratch[i] - nm);
    for (int j = 0; j < kLanes; ++j) bs += lanes[j];
    s = s * exp_nonpos(m - nm) + bs;
    m = nm;
  }
  return {m, s};
}

// out[v] = -g * scale * softmax_v, rounded once to the storage dtype (the label entry is fixed up after).
template <class D>
PREFKERN_CLONES void row_grad(const typename D::storage* row, int64_t vocab, float scale, float m,
                              float log_s, float g, typename D::storage* out) {
  float gs = g * scale;
  for (int64_t v = 0; v < vocab; ++v)
    out[v] = D::store(-gs * exp_nonpos((D::load(row[v]) * scale - m) - log_s));
}

// z_y rounded like the entries of the sum: not inlined, so that -ffp-contract=fast (GCC's default
// for gnu++ dialects) cannot fuse it into an FMA with the "- m" that follows.
template <class D>
[[gnu::noinline]] float scaled_logit(typename D::storage x, float scale) { return D::load(x) * scale; }

template <class D>
void forward_impl(const typename D::storage* logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                  const int64_t* labels, int64_t ignore_index, float scale, float* logp, float* lse_parts) {
  parallel_for_rows(n_rows, vocab, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const auto* row = logits + n * row_stride;
      MaxSum ms = row_max_sum<D>(row, vocab, scale, scratch);
      float log_s = std::log(ms.s);
      lse_parts[2 * n] = ms.m;
      lse_parts[2 * n + 1] = log_s;
      int64_t y = labels[n];
      // (z_y - m) - log s: z_y - lse would carry the rounding of lse, one ulp of |lse|
      logp[n] = y == ignore_index ? 0.0f
                : (y < 0 || y >= vocab ? std::numeric_limits<float>::quiet_NaN()
                                       : (scaled_logit<D>(row[y], scale) - ms.m) - log_s);
    }
  });
}

template <class D>
void backward_impl(const float* grad, const typename D::storage* logits, int64_t n_rows, int64_t vocab,
                   int64_t row_stride, const int64_t* labels, int64_t ignore_index, float scale,
                   const float* lse_parts, typename D::storage* out, int64_t out_stride) {
  using S = typename D::storage;
  parallel_for_rows(n_rows, vocab, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const S* row = logits + n * row_stride;
      S* orow = out + n * out_stride;
      int64_t y = labels[n];
      float g = grad[n];
      if (y == ignore_index || g == 0.0f) {
        std::fill(orow, orow + vocab, S(0));
        continue;
      }
      float m = lse_parts[2 * n], log_s = lse_parts[2 * n + 1];
      // Read the label logit first: out may alias logits (the fused linear op works in place).
      float gy = g * scale * (1.0f - exp_nonpos((D::load(row[y]) * scale - m) - log_s));
      row_grad<D>(row, vocab, scale, m, log_s, g, orow);
      orow[y] = D::store(gy);
    }
  });
}

struct RowStats {
  float p_d, p2, z_sum;  // sum of p * d, sum of exp(2 d), sum of z (d = z - m <= 0)
  int64_t arg;           // first argmax (NaN counts as the maximum, as in torch.argmax)
};

template <class D>
PREFKERN_CLONES RowStats row_stats_of(const typename D::storage* row, int64_t vocab, float scale, float m,
                                      float log_s, float* scratch) {
  float p_d = 0.0f, p2 = 0.0f, z_sum = 0.0f, best = kNegInf;
  int64_t arg = vocab > 0 ? 0 : -1;
  bool nan = false;
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    int64_t count = std::min(kBlock, vocab - v0);
    float lanes_pd[kLanes] = {}, lanes_p2[kLanes] = {}, lanes_z[kLanes] = {};
    for (int64_t i = 0; i < count; ++i) scratch[i] = D::load(row[v0 + i]) * scale;
    auto add = [&](float z, float& pd, float& q2, float& zs) {
      float d = z - m;
      bool live = z > kNegInf;  // 0 * -inf would be NaN
      pd += live ? exp_nonpos(d - log_s) * d : 0.0f;
      q2 += live ? exp_nonpos(d + d) : 0.0f;
      zs += z;
    };
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes)
      for (int j = 0; j < kLanes; ++j) add(scratch[i + j], lanes_pd[j], lanes_p2[j], lanes_z[j]);
    for (; i < count; ++i) add(scratch[i], p_d, p2, z_sum);
    for (int j = 0; j < kLanes; ++j) p_d += lanes_pd[j], p2 += lanes_p2[j], z_sum += lanes_z[j];
    for (int64_t k = 0; k < count && !nan; ++k) {
      float z = scratch[k];
      if (z != z) {
        nan = true, arg = v0 + k;
      } else if (z > best) {
        best = z, arg = v0 + k;
      }
    }
  }
  return {p_d, p2, z_sum, arg};
}

template <class D>
void row_stats_impl(const typename D::storage* logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                    const int64_t* labels, int64_t ignore_index, float scale, const float* lse_parts, float* out) {
  parallel_for_rows(n_rows, vocab, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      float* o = out + 4 * n;
      int64_t y = labels[n];
      if (y == ignore_index) {
        std::fill(o, o + 4, 0.0f);
        continue;
      }
      float m = lse_parts[2 * n], log_s = lse_parts[2 * n + 1];
      RowStats st = row_stats_of<D>(logits + n * row_stride, vocab, scale, m, log_s, scratch);
      o[0] = log_s - st.p_d;
      o[1] = std::log(st.p2) - 2.0f * log_s;
      o[2] = st.z_sum;
      o[3] = st.arg == y ? 1.0f : 0.0f;
    }
  });
}

}  // namespace

void row_stats(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
               const int64_t* labels, int64_t ignore_index, float inv_temperature, const float* lse_parts,
               float* out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    row_stats_impl<D>(static_cast<const typename D::storage*>(logits), n_rows, vocab, row_stride, labels,
                      ignore_index, inv_temperature, lse_parts, out);
  });
}

void logprobs_forward(const void* logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                      const int64_t* labels, int64_t ignore_index, float inv_temperature,
                      float* logp, float* lse_parts) {
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    forward_impl<D>(static_cast<const typename D::storage*>(logits), n_rows, vocab, row_stride, labels,
                    ignore_index, inv_temperature, logp, lse_parts);
  });
}

void logprobs_backward(const float* grad, const void* logits, int dtype, int64_t n_rows, int64_t vocab,
                       int64_t row_stride, const int64_t* labels, int64_t ignore_index,
                       float inv_temperature, const float* lse_parts, void* grad_logits,
                       int64_t grad_row_stride) {
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    backward_impl<D>(grad, static_cast<const typename D::storage*>(logits), n_rows, vocab, row_stride,
                     labels, ignore_index, inv_temperature, lse_parts,
                     static_cast<typename D::storage*>(grad_logits), grad_row_stride);
  });
}

}  // namespace prefkern::cpu
