// The CPU GEMM every kernel uses: row-major C = alpha op(A) op(B) + beta C with leading dimensions,
// through the tuned BLAS remat was built with (meson option -Dblas: OpenBLAS by default), or Eigen's
// own GEMM without one. Deterministic for a fixed thread count and kernel set (the BLAS splits rows
// and columns of C among threads, never the sum over k); inside an OpenMP parallel region it runs on
// the calling thread alone.
#pragma once

#include <cstdint>
#include <string>

namespace remat::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

// Which GEMM that is: "openblas (<kernel set> kernels)" with the set OpenBLAS chose at start-up
// (from the CPU, or the environment's OPENBLAS_CORETYPE), or "eigen".
std::string gemm_library();

// Which library runs the GEMMs from now on: "auto" (the BLAS, unless Eigen's AVX-512 GEMM beats the
// BLAS's kernels: gemm.cpp), "openblas" or "eigen". The environment variable REMAT_CPU_GEMM sets
// the first choice; tests and benchmarks that compare the two call this between GEMMs.
void set_gemm_library(const std::string& name);

}  // namespace remat::cpu
