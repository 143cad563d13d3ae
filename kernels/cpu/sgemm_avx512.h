// remat's own f32 GEMM for AVX-512 CPUs, for the machines where no BLAS at hand runs AVX-512
// kernels (an OpenBLAS pinned to older kernels, Debian's BLIS built generic): packed panels and a
// 14 x 32 register tile, 1.5-2x Eigen's GEMM there (docs/results/cpu.md).
// Every element of C is computed by the same sequence of operations whatever the thread count and
// wherever its tile lies (edge tiles are padded, not handled by other code), so results are
// deterministic and independent of the number of threads.
#pragma once

#include <cstdint>

namespace remat::cpu {

// Whether this build has the kernel (compiled for a CPU with AVX-512F).
bool sgemm_avx512_built();

// Row-major C = alpha op(A) op(B) + beta C, as gemm() (kernels/cpu/gemm.h); beta = 0 does not read
// C. With a bias (n values), (alpha op(A) op(B) + beta C) + bias in every row, added as C's tiles
// are stored: gemm_bias()'s bits in one pass over C. Splits the rows (or columns) of C among at
// most `threads` OpenMP threads (0: OpenMP's count; one inside a parallel region). Throws when the
// build lacks the kernel.
void sgemm_avx512(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int threads = 0,
                  const float* bias = nullptr);

}  // namespace remat::cpu
