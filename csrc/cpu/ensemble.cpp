#include "cpu/ensemble.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/simd_math.h"

namespace prefkern::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kTile = 256;  // columns per tile of the reduction: K x 256 fp32 stays in L1
constexpr float kInf = std::numeric_limits<float>::infinity();

// Dot products of one hidden row with G weight rows, in kLanes lane-wise partial sums per member so
// that the loop vectorises without reassociation liberties; the row is read from L1 once per group.
// `next` (or null) is the row scored after this one: rows are gathered, so the hardware prefetcher
// cannot see it coming; it is pulled into cache alongside, one line per line of this row.
template <class D, int G>
PREFKERN_CLONES void dot_group(const typename D::storage* x, const typename D::storage* w, int64_t w_stride,
                               int64_t h, float* out, const typename D::storage* next) {
  constexpr int64_t kLine = 64 / sizeof(typename D::storage);
  float acc[G][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= h; i += kLanes) {
    if (next && i % kLine == 0) __builtin_prefetch(next + i);
    float xv[kLanes];
    for (int j = 0; j < kLanes; ++j) xv[j] = D::load(x[i + j]);
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < kLanes; ++j) acc[g][j] += xv[j] * D::load(w[g * w_stride + i + j]);
  }
  for (int g = 0; g < G; ++g) {
    float tail = 0.0f;
    for (int64_t t = i; t < h; ++t) tail += D::load(x[t]) * D::load(w[g * w_stride + t]);
    float s = 0.0f;
    for (int j = 0; j < kLanes; ++j) s += acc[g][j];
    out[g] = s + tail;
  }
}

template <class D>
void dot_all(const typename D::storage* x, const typename D::storage* w, int64_t k, int64_t w_stride, int64_t h,
             float* out, const typename D::storage* next) {
  int64_t m = 0;
  // the first group prefetches the next row; later groups re-read this row from cache
  for (; m + 8 <= k; m += 8, next = nullptr) dot_group<D, 8>(x, w + m * w_stride, w_stride, h, out + m, next);
  const auto* wm = w + m * w_stride;
  switch (k - m) {  // the remaining members in one pass, so that K = 5 reads the row once, not 4 + 1
    case 7: dot_group<D, 7>(x, wm, w_stride, h, out + m, next); break;
    case 6: dot_group<D, 6>(x, wm, w_stride, h, out + m, next); break;
    case 5: dot_group<D, 5>(x, wm, w_stride, h, out + m, next); break;
    case 4: dot_group<D, 4>(x, wm, w_stride, h, out + m, next); break;
    case 3: dot_group<D, 3>(x, wm, w_stride, h, out + m, next); break;
    case 2: dot_group<D, 2>(x, wm, w_stride, h, out + m, next); break;
    case 1: dot_group<D, 1>(x, wm, w_stride, h, out + m, next); break;
    default: break;
  }
}

// The running minimum of the members that keeps a NaN once it has seen one (std::min and fminf drop
// NaN, which would let a sequence whose hidden state is NaN win best-of-n under "wco").
inline float take_min(float lo, float x) { return (x < lo || x != x) ? x : lo; }

// Statistics of the K (already normalised) members of one sample.
inline void combine(const float* s, int64_t k, int method, float lam, float inv_dof, float* combined,
                    float* mean, float* var) {
  float sum = 0.0f, lo = kInf;
  for (int64_t i = 0; i < k; ++i) {
    sum += s[i];
    lo = take_min(lo, s[i]);
  }
  float m = sum / static_cast<float>(k);
  float ss = 0.0f;
  for (int64_t i = 0; i < k; ++i) ss += (s[i] - m) * (s[i] - m);
  float v = ss * inv_dof;
  *mean = m;
  *var = v;
  *combined = method == kEnsembleMean ? m : (method == kEnsembleWco ? lo : m - lam * v);
}

template <class D>
void reduce_impl(const typename D::storage* scores, int64_t k, int64_t n, int64_t stride_k, const float* mu,
                 const float* sigma, int method, float lam, float inv_dof, float* combined, float* mean,
                 float* var) {
  int64_t tiles = (n + kTile - 1) / kTile;
  parallel_for_rows(tiles, k * kTile, [&](int64_t begin, int64_t end) {
    alignas(64) float sum[kTile], lo[kTile], ss[kTile], m[kTile];
    for (int64_t t = begin; t < end; ++t) {
      int64_t n0 = t * kTile, cnt = std::min(kTile, n - n0);
      std::fill(sum, sum + cnt, 0.0f);
      std::fill(lo, lo + cnt, kInf);
      std::fill(ss, ss + cnt, 0.0f);
      for (int64_t r = 0; r < k; ++r) {
        const auto* row = scores + r * stride_k + n0;
        float sh = mu ? mu[r] : 0.0f, sc = sigma ? sigma[r] : 1.0f;
        for (int64_t i = 0; i < cnt; ++i) {
          float x = (D::load(row[i]) - sh) / sc;
          sum[i] += x;
          lo[i] = take_min(lo[i], x);
        }
      }
      for (int64_t i = 0; i < cnt; ++i) m[i] = sum[i] / static_cast<float>(k);
      for (int64_t r = 0; r < k; ++r) {
        const auto* row = scores + r * stride_k + n0;
        float sh = mu ? mu[r] : 0.0f, sc = sigma ? sigma[r] : 1.0f;
        for (int64_t i = 0; i < cnt; ++i) {
          float d = (D::load(row[i]) - sh) / sc - m[i];
          ss[i] += d * d;
        }
      }
      for (int64_t i = 0; i < cnt; ++i) {
        float v = ss[i] * inv_dof;
        mean[n0 + i] = m[i];
        var[n0 + i] = v;
        combined[n0 + i] = method == kEnsembleMean ? m[i] : (method == kEnsembleWco ? lo[i] : m[i] - lam * v);
      }
    }
  });
}

template <class D>
void head_impl(const typename D::storage* hidden, int64_t b, int64_t h, int64_t stride_b, int64_t stride_t,
               const int64_t* last, const typename D::storage* weight, int64_t k, int64_t w_stride,
               const float* bias, const float* mu, const float* sigma, int method, float lam, float inv_dof,
               float* scores, float* combined, float* mean, float* var) {
  parallel_for_rows(b, h * k, [&](int64_t begin, int64_t end) {
    std::vector<float> raw(k), norm(k);
    for (int64_t r = begin; r < end; ++r) {
      const auto* x = hidden + r * stride_b + last[r] * stride_t;
      const auto* next = r + 1 < end ? hidden + (r + 1) * stride_b + last[r + 1] * stride_t : nullptr;
      dot_all<D>(x, weight, k, w_stride, h, raw.data(), next);
      for (int64_t i = 0; i < k; ++i) {
        float s = raw[i] + (bias ? bias[i] : 0.0f);
        scores[i * b + r] = s;
        norm[i] = mu ? (s - mu[i]) / sigma[i] : s;
      }
      combine(norm.data(), k, method, lam, inv_dof, combined + r, mean + r, var + r);
    }
  });
}

constexpr int64_t kBackwardTile = 512;  // H columns per tile: K x 512 fp32 of dW and the weight stay in L1

template <class D>
PREFKERN_CLONES void backward_tile(const float* grad, const typename D::storage* hidden, int64_t b, int64_t h, int64_t h0,
                                   int64_t cnt, int64_t stride_b, int64_t stride_t, const int64_t* last,
                                   const typename D::storage* weight, int64_t k, int64_t w_stride,
                                   typename D::storage* grad_hidden, int64_t g_stride_b, int64_t g_stride_t,
                                   float* grad_weight) {
  alignas(64) float dx[kBackwardTile];
  for (int64_t r = 0; r < b; ++r) {
    if (grad_hidden) {
      std::fill(dx, dx + cnt, 0.0f);
      for (int64_t m = 0; m < k; ++m) {
        float g = grad[m * b + r];
        const auto* w = weight + m * w_stride + h0;
        for (int64_t i = 0; i < cnt; ++i) dx[i] += g * D::load(w[i]);
      }
      auto* out = grad_hidden + r * g_stride_b + last[r] * g_stride_t + h0;
      for (int64_t i = 0; i < cnt; ++i) out[i] = D::store(dx[i]);
    }
    if (grad_weight) {
      const auto* x = hidden + r * stride_b + last[r] * stride_t + h0;
      for (int64_t i = 0; i < cnt; ++i) dx[i] = D::load(x[i]);
      for (int64_t m = 0; m < k; ++m) {
        float g = grad[m * b + r];
        float* dw = grad_weight + m * h + h0;
        for (int64_t i = 0; i < cnt; ++i) dw[i] += g * dx[i];
      }
    }
  }
}

float inverse_dof(int64_t k, int ddof) { return 1.0f / static_cast<float>(k - ddof); }

}  // namespace

void ensemble_head_backward(const float* grad, const void* hidden, int dtype, int64_t b, int64_t h,
                            int64_t stride_b, int64_t stride_t, const int64_t* last, const void* weight, int64_t k,
                            int64_t w_stride, void* grad_hidden, int64_t g_stride_b, int64_t g_stride_t,
                            float* grad_weight) {
  if (grad_weight) std::fill(grad_weight, grad_weight + k * h, 0.0f);
  if (b == 0 || h == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    using S = typename D::storage;
    int64_t tiles = (h + kBackwardTile - 1) / kBackwardTile;
    parallel_for_rows(tiles, b * k * kBackwardTile, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t h0 = t * kBackwardTile;
        backward_tile<D>(grad, static_cast<const S*>(hidden), b, h, h0, std::min(kBackwardTile, h - h0), stride_b,
                         stride_t, last, static_cast<const S*>(weight), k, w_stride, static_cast<S*>(grad_hidden),
                         g_stride_b, g_stride_t, grad_weight);
      }
    });
  });
}

void ensemble_reduce(const void* scores, int dtype, int64_t k, int64_t n, int64_t stride_k, const float* mu,
                     const float* sigma, int method, float lam, int ddof, float* combined, float* mean,
                     float* var) {
  if (n == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    reduce_impl<D>(static_cast<const typename D::storage*>(scores), k, n, stride_k, mu, sigma, method, lam,
                   inverse_dof(k, ddof), combined, mean, var);
  });
}

void ensemble_head_forward(const void* hidden, int dtype, int64_t b, int64_t h, int64_t stride_b,
                           int64_t stride_t, const int64_t* last, const void* weight, int64_t k,
                           int64_t w_stride, const float* bias, const float* mu, const float* sigma,
                           int method, float lam, int ddof, float* scores, float* combined, float* mean,
                           float* var) {
  if (b == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    head_impl<D>(static_cast<const typename D::storage*>(hidden), b, h, stride_b, stride_t, last,
                 static_cast<const typename D::storage*>(weight), k, w_stride, bias, mu, sigma, method, lam,
                 inverse_dof(k, ddof), scores, combined, mean, var);
  });
}

}  // namespace prefkern::cpu
