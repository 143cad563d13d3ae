// The CPU GEMM every kernel uses: row-major C = alpha op(A) op(B) + beta C with leading dimensions,
// through remat's own AVX-512 SGEMM (kernels/cpu/sgemm_avx512.h) where it is built, the tuned BLAS
// remat was built with (meson option -Dblas: OpenBLAS by default), or Eigen's GEMM.
// Deterministic for a fixed thread count and kernel set (each library splits rows and columns of C
// among threads, never the sum over k); inside an OpenMP parallel region it runs on the calling
// thread alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace remat::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

// C = op(A) op(B) + bias, the n values of bias added to every row of C (a linear layer): the bits of
// copying bias into every row and gemm() with alpha 1 and beta 1. remat's AVX-512 SGEMM adds it as
// it stores C, the other libraries take the copy first (one more pass over C).
template <typename T>
void gemm_bias(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
               int64_t ldb, const T* bias, T* c, int64_t ldc);

// Which GEMM that is, its library's name first: "openblas (<kernel set> kernels)" with the set
// OpenBLAS chose at start-up (from the CPU, or the environment's OPENBLAS_CORETYPE), or "avx512
// (f64: openblas|eigen) beside openblas (...)", or "eigen ...".
std::string gemm_library();
// The libraries this build can run GEMMs with, the chosen one first: of "avx512", "openblas", "eigen".
std::vector<std::string> gemm_libraries();

// Whether GEMMs run on Eigen's now: the reference path, where convolutions go through im2col
// columns too, not the direct kernels of kernels/cpu/conv_same.h.
bool gemm_is_eigen();

// Which library runs the GEMMs from now on: "auto" (remat's AVX-512 SGEMM where it is built, else
// the BLAS: gemm.cpp), "avx512" (f32; f64 through the BLAS where its kernels use AVX-512, else
// Eigen), "openblas" or "eigen". The environment variable REMAT_CPU_GEMM sets the first choice; tests and
// benchmarks that compare them call this between GEMMs.
void set_gemm_library(const std::string& name);

}  // namespace remat::cpu
