// CPU GEMM: CBLAS when a BLAS was configured (REMAT_HAVE_CBLAS), else Eigen's GEMM on mapped,
// strided matrices; with both, the faster of the two for this process's CPU and kernels.
#include "kernels/cpu/gemm.h"

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#ifdef REMAT_HAVE_CBLAS
#include <cblas.h>
#endif

#include "runtime/error.h"

namespace remat::cpu {

namespace {

#ifdef REMAT_HAVE_CBLAS
// OpenBLAS's kernel sets that use AVX-512 (its corename, lower case).
bool blas_kernels_use_avx512() {
  std::string core = openblas_get_corename();
  std::transform(core.begin(), core.end(), core.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return core == "skylakex" || core == "cooperlake" || core == "sapphirerapids";
}

// The automatic choice: the BLAS, except where Eigen was compiled for AVX-512 and OpenBLAS runs
// AVX2 kernels; there Eigen's GEMM is 1.1-1.3x faster at 1024^3 and at gpt small's shapes
// (measured on an AVX-512 AMD EPYC whose environment sets OPENBLAS_CORETYPE=Haswell, since old
// OpenBLAS builds misbehave on new CPUs; docs/results/cpu.md). Both split only rows and columns of
// C among threads, so either is deterministic for a fixed thread count.
bool blas_is_faster() {
#ifdef EIGEN_VECTORIZE_AVX512
  return blas_kernels_use_avx512();
#else
  return true;
#endif
}
#endif

// Which library runs the GEMMs: -1 not decided yet, 0 Eigen, 1 the BLAS.
std::atomic<int> g_use_blas{-1};

int choice_for(const std::string& name, const char* what) {
  REMAT_CHECK(name == "auto" || name == "openblas" || name == "eigen", what,
              ": expected auto, openblas or eigen, got '", name, "'");
#ifdef REMAT_HAVE_CBLAS
  return name == "auto" ? blas_is_faster() : name == "openblas";
#else
  REMAT_CHECK(name != "openblas", what, ": this build of remat has no BLAS (meson option -Dblas), only Eigen's GEMM");
  return 0;
#endif
}

// Decided at the first GEMM from REMAT_CPU_GEMM (auto when unset), then fixed unless a test or
// benchmark calls set_gemm_library.
bool use_blas() {
  int v = g_use_blas.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("REMAT_CPU_GEMM");
    v = choice_for(env ? env : "auto", "REMAT_CPU_GEMM");
    g_use_blas.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

#ifdef REMAT_HAVE_CBLAS
int blas_int(int64_t v, const char* what) {
  REMAT_CHECK(v >= 0 && v <= INT32_MAX, "gemm: ", what, " = ", v, " exceeds the 32-bit range of the BLAS");
  return static_cast<int>(v);
}
#endif

template <typename T>
void eigen_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                int64_t ldb, T beta, T* c, int64_t ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<const Mat, 0, Stride> A(a, ta ? k : m, ta ? m : k, Stride(lda)), B(b, tb ? n : k, tb ? k : n, Stride(ldb));
  Eigen::Map<Mat, 0, Stride> C(c, m, n, Stride(ldc));
  if (beta == T(0)) C.setZero();
  else if (beta != T(1)) C *= beta;
  if (!ta && !tb) C.noalias() += alpha * A * B;
  else if (ta && !tb) C.noalias() += alpha * A.transpose() * B;
  else if (!ta && tb) C.noalias() += alpha * A * B.transpose();
  else C.noalias() += alpha * A.transpose() * B.transpose();
}

}  // namespace

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C (a BLAS would refuse the leading dimensions of empty operands)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
#ifdef REMAT_HAVE_CBLAS
  if (use_blas()) {
    auto op = [](bool t) { return t ? CblasTrans : CblasNoTrans; };
    if constexpr (std::is_same_v<T, float>)
      cblas_sgemm(CblasRowMajor, op(ta), op(tb), blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"), alpha, a,
                  blas_int(lda, "lda"), b, blas_int(ldb, "ldb"), beta, c, blas_int(ldc, "ldc"));
    else
      cblas_dgemm(CblasRowMajor, op(ta), op(tb), blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"), alpha, a,
                  blas_int(lda, "lda"), b, blas_int(ldb, "ldb"), beta, c, blas_int(ldc, "ldc"));
    return;
  }
#else
  use_blas();  // checks REMAT_CPU_GEMM: asking for a BLAS this build lacks is an error
#endif
  eigen_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

void set_gemm_library(const std::string& name) { g_use_blas.store(choice_for(name, "set_gemm_library")); }

std::string gemm_library() {
#ifdef REMAT_HAVE_CBLAS
  std::string blas = std::string("openblas (") + openblas_get_corename() + " kernels)";
  return use_blas() ? blas : "eigen (beside " + blas + ")";
#else
  return "eigen";
#endif
}

}  // namespace remat::cpu
