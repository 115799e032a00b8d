#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/sampling_rng.h"
#include "cpu/simd_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFKERN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PREFKERN_CLONES
#endif

namespace prefkern::cpu {
namespace {

constexpr int64_t kBlock = 2048;
constexpr int kLanes = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct RowResult {
  int64_t token;
  float logprob;
};

// Temperature-only: one read of the row. Per block: z into L1 scratch (with max and a NaN/+inf
// check), Gumbel-perturbed scores beside it, their argmax, and the online log-sum-exp.
template <class D>
PREFKERN_CLONES RowResult sample_plain(const typename D::storage* row, int64_t vocab, float inv_t,
                                       uint32_t key, float* zbuf, float* gbuf) {
  float m = -kInf, s = 0.0f, best = -kInf, best_z = 0.0f;
  int64_t best_v = -1;
  int bad = 0;
  for (int64_t v0 = 0; v0 < vocab; v0 += kBlock) {
    int64_t count = std::min(kBlock, vocab - v0);
    // lane-wise max / flags: a plain float max reduction does not vectorise without -ffast-math
    float zl[kLanes], gl[kLanes];
    int badl[kLanes] = {};
    for (int j = 0; j < kLanes; ++j) zl[j] = -kInf, gl[j] = -kInf;
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        float z = D::load(row[v0 + i + j]) * inv_t;
        float g = z + sampling_gumbel(key, static_cast<uint32_t>(v0 + i + j));
        zbuf[i + j] = z;
        gbuf[i + j] = g;
        badl[j] |= !(z < kInf);
        zl[j] = zl[j] > z ? zl[j] : z;
        gl[j] = gl[j] > g ? gl[j] : g;
      }
    float bm = -kInf, gm = -kInf;
    for (; i < count; ++i) {
      float z = D::load(row[v0 + i]) * inv_t;
      zbuf[i] = z;
      gbuf[i] = z + sampling_gumbel(key, static_cast<uint32_t>(v0 + i));
      bad |= !(z < kInf);
      bm = std::max(bm, z);
      gm = std::max(gm, gbuf[i]);
    }
    for (int j = 0; j < kLanes; ++j) bad |= badl[j], bm = std::max(bm, zl[j]), gm = std::max(gm, gl[j]);
    if (gm > best) {
      int64_t i = 0;
      while (gbuf[i] != gm) ++i;
      best = gm, best_v = v0 + i, best_z = zbuf[i];
    }
    if (bm == -kInf) continue;
    float nm = std::max(m, bm);
    float lanes[kLanes] = {};
    i = 0;
    for (; i + kLanes <= count; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += exp_nonpos(zbuf[i + j] - nm);
    float bs = 0.0f;
    for (; i < count; ++i) bs += exp_nonpos(zbuf[i] - nm);
    for (int j = 0; j < kLanes; ++j) bs += lanes[j];
    s = s * exp_nonpos(m - nm) + bs;
    m = nm;
  }
  if (bad || m == -kInf || best_v < 0) return {-1, 0.0f};
  return {best_v, best_z - m - std::log(s)};
}

template <class D>
RowResult sample_greedy(const typename D::storage* row, int64_t vocab) {
  float best = -kInf;
  int64_t best_v = -1;
  bool bad = false;
  for (int64_t v = 0; v < vocab; ++v) {
    float x = D::load(row[v]);
    bad |= !(x < kInf);
    if (x > best) best = x, best_v = v;
  }
  if (bad || best_v < 0) return {-1, 0.0f};
  return {best_v, 0.0f};
}

// sup{t : sum over a[i] >= t of exp(a[i] - m) >= target}: a quickselect on the weighted values (the
// array is permuted, never sorted beyond 16 elements). Expected O(n).
PREFKERN_CLONES float weighted_threshold(float* a, int64_t n, float m, float target) {
  float acc = 0.0f;
  int64_t lo = 0, hi = n;
  float last = a[0];
  while (hi - lo > 16) {
    float x0 = a[lo], x1 = a[lo + (hi - lo) / 2], x2 = a[hi - 1];
    float pivot = std::max(std::min(x0, x1), std::min(std::max(x0, x1), x2));
    // three-way partition of [lo, hi): > pivot | == pivot | < pivot
    int64_t gt = lo, i = lo, lt = hi;
    while (i < lt) {
      float x = a[i];
      if (x > pivot) std::swap(a[gt++], a[i++]);
      else if (x < pivot) std::swap(a[i], a[--lt]);
      else ++i;
    }
    float mass_gt = 0.0f;
    for (int64_t j = lo; j < gt; ++j) mass_gt += exp_nonpos(a[j] - m);
    if (acc + mass_gt >= target) {
      hi = gt;
      continue;
    }
    float mass_eq = static_cast<float>(lt - gt) * exp_nonpos(pivot - m);
    last = pivot;
    if (acc + mass_gt + mass_eq >= target) return pivot;
    acc += mass_gt + mass_eq;
    lo = lt;
  }
  std::sort(a + lo, a + hi, [](float x, float y) { return x > y; });
  for (int64_t i = lo; i < hi;) {
    float x = a[i];
    float mass = 0.0f;
    while (i < hi && a[i] == x) mass += exp_nonpos(a[i++] - m);
    acc += mass;
    last = x;
    if (acc >= target) return x;
  }
  return last;  // rounding left the target just out of reach: keep everything seen
}

// z = row * inv_t into scratch with its max and a NaN/+inf flag (lane-wise so that it vectorises).
template <class D>
PREFKERN_CLONES float convert_row(const typename D::storage* row, int64_t vocab, float inv_t, float* z, int* bad) {
  float ml[kLanes];
  int bl[kLanes] = {};
  for (int j = 0; j < kLanes; ++j) ml[j] = -kInf;
  int64_t v = 0;
  for (; v + kLanes <= vocab; v += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      float x = D::load(row[v + j]) * inv_t;
      z[v + j] = x;
      bl[j] |= !(x < kInf);
      ml[j] = ml[j] > x ? ml[j] : x;
    }
  float m = -kInf;
  int b = 0;
  for (; v < vocab; ++v) {
    float x = D::load(row[v]) * inv_t;
    z[v] = x;
    b |= !(x < kInf);
    m = std::max(m, x);
  }
  for (int j = 0; j < kLanes; ++j) b |= bl[j], m = std::max(m, ml[j]);
  *bad = b;
  return m;
}

// sum of exp(a[i] - m) over a[i] >= thr.
PREFKERN_CLONES float masked_mass(const float* a, int64_t n, float m, float thr) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] >= thr ? exp_nonpos(a[i + j] - m) : 0.0f;
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] >= thr ? exp_nonpos(a[i] - m) : 0.0f;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
}

int64_t compact(const float* z, int64_t vocab, float thr, float* cand) {
  int64_t n = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    cand[n] = z[v];
    n += z[v] >= thr;
  }
  return n;
}

constexpr int64_t kSample = 1024;  // strided sample that guesses a safe lower bound of a threshold

// Filtered sampling: z into scratch (one read of the row), thresholds by selection on a compacted
// candidate list (min_p: z >= max + log(min_p); top_k: k-th largest z; top_p: weighted select), then
// Gumbel-max over the survivors. For large V a strided sample first guesses a lower bound of the
// threshold; one pass checks that the guess keeps enough (count >= k, mass >= p * total), so the
// selection then runs on the few candidates above it. The result is exact either way.
template <class D>
RowResult sample_filtered(const typename D::storage* row, int64_t vocab, float inv_t, int64_t k, float p,
                          float min_p, uint32_t key, float* z, float* cand) {
  int bad = 0;
  float m = convert_row<D>(row, vocab, inv_t, z, &bad);
  if (bad || m == -kInf) return {-1, 0.0f};
  float t = min_p > 0.0f ? m + std::log(min_p) : -kInf;
  const bool big = vocab >= 4 * kSample;
  const int64_t stride = vocab / kSample;
  float sample[kSample];
  int64_t n = -1;
  if (k > 0) {
    if (big) {
      int64_t ns = 0;
      for (int64_t i = 0; i < kSample; ++i) {
        sample[ns] = z[i * stride];
        ns += sample[ns] >= t;
      }
      int64_t rank = std::min<int64_t>(ns, 2 * ((k * ns + vocab - 1) / vocab) + 8);
      if (rank > 0) {
        std::nth_element(sample, sample + (rank - 1), sample + ns, [](float x, float y) { return x > y; });
        n = compact(z, vocab, std::max(t, sample[rank - 1]), cand);
        if (n < k) n = -1;  // the guess was too high: fall back to every candidate
      }
    }
    if (n < 0) n = compact(z, vocab, t, cand);
    if (k < n) {
      std::nth_element(cand, cand + (k - 1), cand + n, [](float x, float y) { return x > y; });
      t = std::max(t, cand[k - 1]);
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) {
        float x = cand[i];
        cand[kept] = x;
        kept += x >= t;
      }
      n = kept;
    } else if (k >= n) {
      // every candidate is kept (fewer than k of them); n is exactly the set z >= t
    }
  }
  if (p < 1.0f) {
    float total;
    if (n >= 0) {
      total = masked_mass(cand, n, m, t);
    } else {
      total = masked_mass(z, vocab, m, t);
      if (big) {
        int64_t ns = 0;
        for (int64_t i = 0; i < kSample; ++i) {
          sample[ns] = z[i * stride];
          ns += sample[ns] >= t;
        }
        if (ns > 0) {
          float sample_total = masked_mass(sample, ns, m, t);
          float guess = weighted_threshold(sample, ns, m, (0.5f + 0.5f * p) * sample_total);
          float thr = std::max(t, guess);
          if (masked_mass(z, vocab, m, thr) >= p * total) n = compact(z, vocab, thr, cand);
        }
      }
      if (n < 0) n = compact(z, vocab, t, cand);
    }
    t = std::max(t, weighted_threshold(cand, n, m, p * total));
  }
  float best = -kInf, best_z = 0.0f, s = 0.0f;
  int64_t best_v = -1;
  for (int64_t v = 0; v < vocab; ++v) {
    float x = z[v];
    if (!(x >= t)) continue;
    s += exp_nonpos(x - m);
    float g = x + sampling_gumbel(key, static_cast<uint32_t>(v));
    if (g > best) best = g, best_v = v, best_z = x;
  }
  if (best_v < 0) return {-1, 0.0f};
  return {best_v, best_z - m - std::log(s)};
}

template <class D>
void sample_impl(const typename D::storage* logits, int64_t n_out, int64_t vocab, int64_t row_stride,
                 const int64_t* row_index, const float* temperature, const int64_t* top_k,
                 const float* top_p, const float* min_p, const int64_t* seed, const int64_t* offset,
                 int64_t* tokens, float* logprobs) {
  parallel_for_rows(n_out, vocab, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf, cand;
    alignas(64) float blk_z[kBlock], blk_g[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const auto* row = logits + row_index[r] * row_stride;
      float temp = temperature[r];
      int64_t k = top_k[r];
      float p = top_p[r], mp = min_p[r];
      uint32_t key = sampling_row_key(seed[r], offset[r], r);
      RowResult res;
      bool use_k = k > 0 && k < vocab, use_p = p < 1.0f, use_mp = mp > 0.0f;
      if (!(temp > 0.0f)) {
        res = sample_greedy<D>(row, vocab);
      } else if (!use_k && !use_p && !use_mp) {
        res = sample_plain<D>(row, vocab, 1.0f / temp, key, blk_z, blk_g);
      } else {
        if (static_cast<int64_t>(zbuf.size()) < vocab) zbuf.resize(vocab), cand.resize(vocab);
        res = sample_filtered<D>(row, vocab, 1.0f / temp, use_k ? k : 0, use_p ? p : 1.0f,
                                 use_mp ? mp : 0.0f, key, zbuf.data(), cand.data());
      }
      tokens[r] = res.token;
      logprobs[r] = res.logprob;
    }
  });
}

}  // namespace

void sample(const void* logits, int dtype, int64_t n_out, int64_t vocab, int64_t row_stride,
            const int64_t* row_index, const float* temperature, const int64_t* top_k, const float* top_p,
            const float* min_p, const int64_t* seed, const int64_t* offset, int64_t* tokens,
            float* logprobs) {
  dispatch_dtype(dtype, [&](auto tag) {
    using D = decltype(tag);
    sample_impl<D>(static_cast<const typename D::storage*>(logits), n_out, vocab, row_stride, row_index,
                   temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs);
  });
}

}  // namespace prefkern::cpu
