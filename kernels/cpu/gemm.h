// The CPU GEMM every kernel uses: row-major C = alpha op(A) op(B) + beta C with leading dimensions,
// through the tuned BLAS remat was built with (meson option -Dblas: OpenBLAS by default), or Eigen's
// own GEMM without one. Deterministic for a fixed thread count (the BLAS splits rows and columns of C
// among threads, never the sum over k); inside an OpenMP parallel region it runs on the calling
// thread alone.
#pragma once

#include <cstdint>

namespace remat::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

// Which GEMM that is: "openblas" or "eigen".
const char* gemm_library();

}  // namespace remat::cpu
