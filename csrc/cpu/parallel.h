#pragma once
#include <cstdint>
#ifdef PREFKERN_HAS_OPENMP
#include <omp.h>
#endif

namespace prefkern {

inline int omp_max_threads() {
#ifdef PREFKERN_HAS_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Runs body(begin, end) over [0, n) split into contiguous ranges, one per thread.
template <class Body>
void parallel_for_rows(int64_t n, int64_t work_per_row, Body body) {
#ifdef PREFKERN_HAS_OPENMP
  // Below ~32k elements of work the fork/join costs more than it saves.
  bool parallel = n > 1 && n * work_per_row >= (int64_t(1) << 15);
#pragma omp parallel if (parallel)
  {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t chunk = (n + nt - 1) / nt;
    int64_t b = t * chunk, e = b + chunk < n ? b + chunk : n;
    if (b < e) body(b, e);
  }
#else
  body(0, n);
#endif
}

}  // namespace prefkern
