// The one binding file: every kernel crosses as raw pointers (uintptr_t) plus shapes, strides, a
// dtype code and, for CUDA, the stream. The Python side (prefkern.ops.*) validates every argument.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>

#include "cpu/logprobs.h"
#include "cpu/ensemble.h"
#include "cpu/parallel.h"
#include "cpu/sampling.h"
#include "cpu/simd_math.h"
#ifdef PREFKERN_HAS_CUDA
#include "cuda/ensemble.h"
#include "cuda/logprobs.h"
#include "cuda/sampling.h"
#endif

namespace nb = nanobind;
using u64 = uintptr_t;

template <class T> static T* ptr(u64 p) { return reinterpret_cast<T*>(p); }

#ifdef PREFKERN_HAS_CUDA
static void check_cuda(const char* err, const char* what) {
  if (err) throw std::runtime_error(std::string(what) + ": " + err);
}
#endif

NB_MODULE(_native, m) {
  m.doc() = "prefkern native kernels (C++ on the CPU, CUDA C++ when compiled in)";
  m.def("omp_threads", &prefkern::omp_max_threads);
  m.def("has_cuda", []() {
#ifdef PREFKERN_HAS_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() { return std::string(PREFKERN_CUDA_ARCHS); });

  // ---- logprobs ------------------------------------------------------------------------------
  // lse_parts: [N, 2] fp32, (row max, log of the sum of exp(z - max)) per row (cpu/logprobs.h).
  m.def("logprobs_forward_cpu",
        [](u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 labels, int64_t ignore,
           float inv_t, u64 logp, u64 lse_parts) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::logprobs_forward(ptr<const void>(logits), dtype, n, v, stride,
                                          ptr<const int64_t>(labels), ignore, inv_t, ptr<float>(logp),
                                          ptr<float>(lse_parts));
        },
        nb::call_guard<nb::gil_scoped_release>());
  m.def("logprobs_backward_cpu",
        [](u64 grad, u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 labels,
           int64_t ignore, float inv_t, u64 lse_parts, u64 out, int64_t out_stride) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::logprobs_backward(ptr<const float>(grad), ptr<const void>(logits), dtype, n, v,
                                           stride, ptr<const int64_t>(labels), ignore, inv_t,
                                           ptr<const float>(lse_parts), ptr<void>(out), out_stride);
        },
        nb::call_guard<nb::gil_scoped_release>());
  m.def("row_stats_cpu",
        [](u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 labels, int64_t ignore,
           float inv_t, u64 lse_parts, u64 out) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::row_stats(ptr<const void>(logits), dtype, n, v, stride, ptr<const int64_t>(labels), ignore,
                                   inv_t, ptr<const float>(lse_parts), ptr<float>(out));
        },
        nb::call_guard<nb::gil_scoped_release>());
#ifdef PREFKERN_HAS_CUDA
  m.def("logprobs_forward_cuda",
        [](u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 labels, int64_t ignore,
           float inv_t, u64 logp, u64 lse_parts, u64 stream) {
          prefkern::check_dtype_code(dtype);
          check_cuda(prefkern::cuda::logprobs_forward(ptr<const void>(logits), dtype, n, v, stride,
                                                      ptr<const int64_t>(labels), ignore, inv_t,
                                                      ptr<float>(logp), ptr<float>(lse_parts), stream),
                     "logprobs_forward_cuda");
        });
  m.def("logprobs_backward_cuda",
        [](u64 grad, u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 labels,
           int64_t ignore, float inv_t, u64 lse_parts, u64 out, int64_t out_stride, u64 stream) {
          prefkern::check_dtype_code(dtype);
          check_cuda(prefkern::cuda::logprobs_backward(ptr<const float>(grad), ptr<const void>(logits),
                                                       dtype, n, v, stride, ptr<const int64_t>(labels),
                                                       ignore, inv_t, ptr<const float>(lse_parts),
                                                       ptr<void>(out), out_stride, stream),
                     "logprobs_backward_cuda");
        });
#endif

  // ---- ensemble ------------------------------------------------------------------------------
  m.def("ensemble_reduce_cpu",
        [](u64 scores, int dtype, int64_t k, int64_t n, int64_t stride_k, u64 mu, u64 sigma, int method,
           float lam, int ddof, u64 combined, u64 mean, u64 var) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::ensemble_reduce(ptr<const void>(scores), dtype, k, n, stride_k, ptr<const float>(mu),
                                         ptr<const float>(sigma), method, lam, ddof, ptr<float>(combined),
                                         ptr<float>(mean), ptr<float>(var));
        },
        nb::call_guard<nb::gil_scoped_release>());
  m.def("ensemble_head_forward_cpu",
        [](u64 hidden, int dtype, int64_t b, int64_t h, int64_t stride_b, int64_t stride_t, u64 last,
           u64 weight, int64_t k, int64_t w_stride, u64 bias, u64 mu, u64 sigma, int method, float lam,
           int ddof, u64 scores, u64 combined, u64 mean, u64 var) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::ensemble_head_forward(
              ptr<const void>(hidden), dtype, b, h, stride_b, stride_t, ptr<const int64_t>(last),
              ptr<const void>(weight), k, w_stride, ptr<const float>(bias), ptr<const float>(mu),
              ptr<const float>(sigma), method, lam, ddof, ptr<float>(scores), ptr<float>(combined),
              ptr<float>(mean), ptr<float>(var));
        },
        nb::call_guard<nb::gil_scoped_release>());
  m.def("ensemble_head_backward_cpu",
        [](u64 grad, u64 hidden, int dtype, int64_t b, int64_t h, int64_t stride_b, int64_t stride_t, u64 last,
           u64 weight, int64_t k, int64_t w_stride, u64 grad_hidden, int64_t g_stride_b, int64_t g_stride_t,
           u64 grad_weight) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::ensemble_head_backward(
              ptr<const float>(grad), ptr<const void>(hidden), dtype, b, h, stride_b, stride_t,
              ptr<const int64_t>(last), ptr<const void>(weight), k, w_stride, ptr<void>(grad_hidden), g_stride_b,
              g_stride_t, ptr<float>(grad_weight));
        },
        nb::call_guard<nb::gil_scoped_release>());
#ifdef PREFKERN_HAS_CUDA
  m.def("ensemble_reduce_cuda",
        [](u64 scores, int dtype, int64_t k, int64_t n, int64_t stride_k, u64 mu, u64 sigma, int method,
           float lam, int ddof, u64 combined, u64 mean, u64 var, u64 stream) {
          prefkern::check_dtype_code(dtype);
          check_cuda(prefkern::cuda::ensemble_reduce(ptr<const void>(scores), dtype, k, n, stride_k,
                                                     ptr<const float>(mu), ptr<const float>(sigma), method, lam,
                                                     ddof, ptr<float>(combined), ptr<float>(mean), ptr<float>(var),
                                                     stream),
                     "ensemble_reduce_cuda");
        });
  m.def("ensemble_head_forward_cuda",
        [](u64 hidden, int dtype, int64_t b, int64_t h, int64_t stride_b, int64_t stride_t, u64 last,
           u64 weight, int64_t k, int64_t w_stride, u64 bias, u64 mu, u64 sigma, int method, float lam,
           int ddof, u64 scores, u64 combined, u64 mean, u64 var, u64 stream) {
          prefkern::check_dtype_code(dtype);
          check_cuda(prefkern::cuda::ensemble_head_forward(
                         ptr<const void>(hidden), dtype, b, h, stride_b, stride_t, ptr<const int64_t>(last),
                         ptr<const void>(weight), k, w_stride, ptr<const float>(bias), ptr<const float>(mu),
                         ptr<const float>(sigma), method, lam, ddof, ptr<float>(scores), ptr<float>(combined),
                         ptr<float>(mean), ptr<float>(var), stream),
                     "ensemble_head_forward_cuda");
        });
#endif
  // ---- sampling ------------------------------------------------------------------------------
  // sample_{cpu,cuda}(logits, dtype, n_out, V, row_stride, row_index, temperature, top_k, top_p, min_p,
  //                   seed, offset, tokens, logprobs[, stream]); per-row parameters contiguous [n_out].
  m.def("sample_cpu",
        [](u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 row_index, u64 temperature,
           u64 top_k, u64 top_p, u64 min_p, u64 seed, u64 offset, u64 tokens, u64 logprobs) {
          prefkern::check_dtype_code(dtype);
          prefkern::cpu::sample(ptr<const void>(logits), dtype, n, v, stride, ptr<const int64_t>(row_index),
                                ptr<const float>(temperature), ptr<const int64_t>(top_k),
                                ptr<const float>(top_p), ptr<const float>(min_p), ptr<const int64_t>(seed),
                                ptr<const int64_t>(offset), ptr<int64_t>(tokens), ptr<float>(logprobs));
        },
        nb::call_guard<nb::gil_scoped_release>());
#ifdef PREFKERN_HAS_CUDA
  m.def("sample_cuda",
        [](u64 logits, int dtype, int64_t n, int64_t v, int64_t stride, u64 row_index, u64 temperature,
           u64 top_k, u64 top_p, u64 min_p, u64 seed, u64 offset, u64 tokens, u64 logprobs, u64 stream) {
          prefkern::check_dtype_code(dtype);
          check_cuda(prefkern::cuda::sample(ptr<const void>(logits), dtype, n, v, stride,
                                            ptr<const int64_t>(row_index), ptr<const float>(temperature),
                                            ptr<const int64_t>(top_k), ptr<const float>(top_p),
                                            ptr<const float>(min_p), ptr<const int64_t>(seed),
                                            ptr<const int64_t>(offset), ptr<int64_t>(tokens),
                                            ptr<float>(logprobs), stream),
                     "sample_cuda");
        });
#endif
  // ---- end sampling ----------------------------------------------------------------------------
}
