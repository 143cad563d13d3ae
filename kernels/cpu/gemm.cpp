// CPU GEMM: remat's own AVX-512 SGEMM, CBLAS when a BLAS was configured (REMAT_HAVE_CBLAS), or
// Eigen's GEMM on mapped, strided matrices; the fastest of those measured for this CPU and kernels.
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

#include "kernels/cpu/sgemm_avx512.h"
#include "runtime/error.h"

namespace remat::cpu {

namespace {

// The libraries that can run the GEMMs.
enum class Library { eigen, openblas, avx512 };

#ifdef REMAT_HAVE_CBLAS
// Whether OpenBLAS's kernel set (the one it chose at start-up, from the CPU or OPENBLAS_CORETYPE)
// uses AVX-512.
bool blas_kernels_use_avx512() {
  static const bool avx512 = [] {
    std::string core = openblas_get_corename();
    std::transform(core.begin(), core.end(), core.begin(), [](unsigned char ch) { return std::tolower(ch); });
    return core == "skylakex" || core == "cooperlake" || core == "sapphirerapids";
  }();
  return avx512;
}
#endif

// The automatic choice: remat's AVX-512 SGEMM wherever it is built, else the BLAS, else Eigen's
// GEMM. On the AVX-512 AMD EPYCs measured (docs/results/cpu.md) it ran 1.7-2.0x OpenBLAS's AVX2
// kernels (an environment with OPENBLAS_CORETYPE=Haswell, as old OpenBLAS builds misbehave on new
// CPUs), and against OpenBLAS's own AVX-512 kernels (Cooperlake) 1.03-1.10x at gpt's shapes, a gpt
// small step about 10% faster, dit and unet the same within noise. All three split only rows and
// columns of C among threads, so each is deterministic for a fixed thread count.
Library automatic() {
  if (sgemm_avx512_built()) return Library::avx512;
#ifdef REMAT_HAVE_CBLAS
  return Library::openblas;
#else
  return Library::eigen;
#endif
}

// f64 has no remat kernel: beside the AVX-512 SGEMM it runs on the BLAS where its kernels use
// AVX-512 (100 against Eigen's 72 GFLOP/s at 1024 x 256 x 768 on 2 threads), else on Eigen's
// AVX-512 GEMM (1.1-1.3x OpenBLAS's AVX2 kernels).
bool f64_on_blas(Library lib) {
#ifdef REMAT_HAVE_CBLAS
  return lib == Library::openblas || (lib == Library::avx512 && blas_kernels_use_avx512());
#else
  (void)lib;
  return false;
#endif
}

// Which library runs the GEMMs: -1 not decided yet, else a Library.
std::atomic<int> g_library{-1};

Library choice_for(const std::string& name, const char* what) {
  REMAT_CHECK(name == "auto" || name == "openblas" || name == "eigen" || name == "avx512", what,
              ": expected auto, avx512, openblas or eigen, got '", name, "'");
  if (name == "auto") return automatic();
  if (name == "avx512") {
    REMAT_CHECK(sgemm_avx512_built(), what, ": this build of remat was not compiled for AVX-512 (meson option "
                "-Dnative on an AVX-512 CPU)");
    return Library::avx512;
  }
#ifndef REMAT_HAVE_CBLAS
  REMAT_CHECK(name != "openblas", what, ": this build of remat has no BLAS (meson option -Dblas), only Eigen's GEMM");
#endif
  return name == "openblas" ? Library::openblas : Library::eigen;
}

// Decided at the first GEMM from REMAT_CPU_GEMM (auto when unset), then fixed unless a test or
// benchmark calls set_gemm_library.
Library library() {
  int v = g_library.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("REMAT_CPU_GEMM");
    v = static_cast<int>(choice_for(env ? env : "auto", "REMAT_CPU_GEMM"));
    g_library.store(v, std::memory_order_relaxed);
  }
  return static_cast<Library>(v);
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
  const Library lib = library();
  if constexpr (std::is_same_v<T, float>)
    if (lib == Library::avx512) return sgemm_avx512(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#ifdef REMAT_HAVE_CBLAS
  if (std::is_same_v<T, float> ? lib == Library::openblas : f64_on_blas(lib)) {
    auto op = [](bool t) { return t ? CblasTrans : CblasNoTrans; };
    if constexpr (std::is_same_v<T, float>)
      cblas_sgemm(CblasRowMajor, op(ta), op(tb), blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"), alpha, a,
                  blas_int(lda, "lda"), b, blas_int(ldb, "ldb"), beta, c, blas_int(ldc, "ldc"));
    else
      cblas_dgemm(CblasRowMajor, op(ta), op(tb), blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"), alpha, a,
                  blas_int(lda, "lda"), b, blas_int(ldb, "ldb"), beta, c, blas_int(ldc, "ldc"));
    return;
  }
#endif
  eigen_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

template <typename T>
void gemm_bias(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
               const T* bias, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>)
    if (k > 0 && library() == Library::avx512)
      return sgemm_avx512(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc, 0, bias);
  constexpr int64_t kCopyGrain = 1 << 14;  // elements below which one thread copies (as kParallelGrain)
#pragma omp parallel for if (m * n > kCopyGrain)
  for (int64_t i = 0; i < m; ++i) std::copy(bias, bias + n, c + i * ldc);
  gemm<T>(ta, tb, m, n, k, T(1), a, lda, b, ldb, T(1), c, ldc);
}

template void gemm_bias<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                               const float*, float*, int64_t);
template void gemm_bias<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*, int64_t,
                                const double*, double*, int64_t);

void set_gemm_library(const std::string& name) {
  g_library.store(static_cast<int>(choice_for(name, "set_gemm_library")));
}

bool gemm_is_eigen() { return library() == Library::eigen; }

std::vector<std::string> gemm_libraries() {
  const char* names[] = {"eigen", "openblas", "avx512"};
  std::vector<std::string> out = {names[static_cast<int>(library())]};
  if (sgemm_avx512_built() && library() != Library::avx512) out.push_back("avx512");
#ifdef REMAT_HAVE_CBLAS
  if (library() != Library::openblas) out.push_back("openblas");
#endif
  if (library() != Library::eigen) out.push_back("eigen");
  return out;
}

std::string gemm_library() {
  const Library lib = library();
  std::string chosen = lib == Library::eigen ? "eigen" : "openblas";
  if (lib == Library::avx512) chosen = std::string("avx512 (f64: ") + (f64_on_blas(lib) ? "openblas)" : "eigen)");
#ifdef REMAT_HAVE_CBLAS
  std::string blas = std::string("openblas (") + openblas_get_corename() + " kernels)";
  return lib == Library::openblas ? blas : chosen + " beside " + blas;
#else
  return chosen;
#endif
}

}  // namespace remat::cpu
