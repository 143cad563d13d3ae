// remat's AVX-512 f32 GEMM: the loops of a BLIS-style GEMM (panels of op(B) kept in L2/L3, blocks
// of op(A) in L2, a 14 x 32 tile of C in registers) over one micro-kernel of broadcast FMAs.
#include "kernels/cpu/sgemm_avx512.h"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <memory>
#include <new>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "kernels/cpu/gemm.h"
#include "runtime/error.h"

namespace remat::cpu {

#ifdef __AVX512F__

namespace {

// The register tile: 14 rows x 32 columns of C is 28 accumulators, plus two of B and one
// broadcast of A: 31 of the 32 vector registers.
constexpr int64_t kMR = 14, kNR = 32;
// Blocks: the kernel sweeps the 14-row panels of a block of A (kMC x kKC, 448 KiB, in L2) against
// one 32-column panel of B (kKC x 32 floats, 64 KiB, in L1 and L2: a k step reads 128 bytes of it
// per 28 FMAs); a block of B (kKC x kNC, 2 MiB) comes from L3, a panel at a time. Chosen on an AMD
// EPYC with AVX-512 (1 MiB L2, 48 KiB L1) among depths 192-512, 224-504 rows and 512-2048 columns:
// within a few percent at gpt small's shapes; 512 deep 3-5% ahead of 256 at 1024^3 (fewer passes
// over C); 1024 columns rather than 512 pack each block of A once where n <= 1024 (1-3% at 1024^3).
constexpr int64_t kKC = 512, kMC = 16 * kMR, kNC = 1024;

// One thread's packing buffers, kept for the thread's life and grown to the largest block asked
// for (at most kMC x kKC and kKC x kNC floats: 448 KiB and 2 MiB).
class PackBuffers {
 public:
  float* a(int64_t floats) { return get(a_, a_floats_, floats); }
  float* b(int64_t floats) { return get(b_, b_floats_, floats); }

 private:
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  using Buffer = std::unique_ptr<float[], Free>;
  static float* get(Buffer& buffer, int64_t& capacity, int64_t floats) {
    if (floats > capacity) {
      buffer.reset();  // before the new one: the old block counts no longer
      buffer.reset(static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t(64))));
      capacity = floats;
    }
    return buffer.get();
  }
  Buffer a_, b_;
  int64_t a_floats_ = 0, b_floats_ = 0;
};

PackBuffers& pack_buffers() {
  thread_local PackBuffers buffers;
  return buffers;
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

__mmask16 lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1);
}

// r[i][j] becomes r[j][i]: three rounds of shuffles, over pairs, quads and 128-bit lanes.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// Copies `rows` (at most 16) rows of `depth` floats, row i at src + i * stride, with the two indices
// swapped: out[p * out_stride + i], `width` values for each p (rows past `rows` give zeros).
// Sixteen values of each row at a time, transposed in registers.
void pack_transposed(const float* src, int64_t stride, int64_t rows, int64_t depth, float* out, int64_t out_stride,
                     int64_t width) {
  const __mmask16 row_lanes = lanes(width);
  __m512 r[16];
  for (int64_t p = 0; p < depth; p += 16) {
    const int64_t count = std::min<int64_t>(16, depth - p);
    const __mmask16 mask = lanes(count);
    for (int64_t i = 0; i < 16; ++i)
      r[i] = i < rows ? _mm512_maskz_loadu_ps(mask, src + i * stride + p) : _mm512_setzero_ps();
    transpose16x16(r);
    for (int64_t q = 0; q < count; ++q) _mm512_mask_storeu_ps(out + (p + q) * out_stride, row_lanes, r[q]);
  }
}

// Rows [i0, i0 + mc) and depth [p0, p0 + kc) of op(A), as panels of kMR rows: for each p, the
// panel's kMR values in a row; rows past mc are zeros, so edge tiles run the same kernel.
void pack_a(bool ta, const float* a, int64_t lda, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* out) {
  for (int64_t ir = 0; ir < mc; ir += kMR, out += kc * kMR) {
    const int64_t rows = std::min(kMR, mc - ir);
    if (ta) {  // op(A)(i, p) = a[p][i]: each p's values are contiguous
      const __mmask16 mask = lanes(rows);
      for (int64_t p = 0; p < kc; ++p)
        _mm512_mask_storeu_ps(out + p * kMR, lanes(kMR), _mm512_maskz_loadu_ps(mask, a + (p0 + p) * lda + i0 + ir));
    } else {  // rows of a, transposed sixteen values at a time
      pack_transposed(a + (i0 + ir) * lda + p0, lda, rows, kc, out, kMR, kMR);
    }
  }
}

// Depth [p0, p0 + kc) and columns [j0, j0 + nc) of op(B), as panels of kNR columns: for each p,
// the panel's kNR values in a row; columns past nc are zeros.
void pack_b(bool tb, const float* b, int64_t ldb, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  if (!tb) {  // row by row, so that each row of the block is read once and in order
    for (int64_t p = 0; p < kc; ++p) {
      const float* src = b + (p0 + p) * ldb + j0;
      for (int64_t jr = 0; jr < nc; jr += kNR) {
        const int64_t cols = std::min(kNR, nc - jr);
        float* dst = out + jr * kc + p * kNR;
        _mm512_store_ps(dst, _mm512_maskz_loadu_ps(lanes(cols), src + jr));
        _mm512_store_ps(dst + 16, _mm512_maskz_loadu_ps(lanes(cols - 16), src + jr + 16));
      }
    }
    return;
  }
  // op(B)(p, j) = b[j][p]: rows of b, transposed sixteen values at a time
  for (int64_t jr = 0; jr < nc; jr += kNR, out += kc * kNR) {
    const int64_t cols = std::min(kNR, nc - jr);
    for (int64_t half = 0; half < 2; ++half)
      pack_transposed(b + (j0 + jr + 16 * half) * ldb + p0, ldb, std::max<int64_t>(0, cols - 16 * half), kc,
                      out + 16 * half, kNR, 16);
  }
}

// The first mr (<= MR) rows and nr columns of the tile at c: alpha (A panel . B panel) + beta c,
// plus the tile's columns of bias in every row where bias is given; beta = 0 does not read c. The
// A panel holds kMR rows a k step; MR below kMR computes only the first MR of them (a block's last
// panel, where fewer rows are left: a GEMM of 32 rows wasted 10 of its 42 in a third full tile).
// Every element goes through the same operations whatever MR, mr and nr: the same bits.
template <int MR>
void micro_kernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c, int64_t ldc,
                  int64_t mr, int64_t nr, float alpha, float beta, const float* bias) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  auto k_step = [&](const float* a, const float* b) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc0[i] = _mm512_fmadd_ps(ai, b0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(ai, b1, acc1[i]);
    }
  };
  // The tile of C (MR rows of two cache lines) is fetched during the last 2 MR k steps, a line per
  // step: early enough to be there when the loop ends, late enough that the panels streaming
  // through L1 do not evict it first (prefetching it all at the start gained 1%, this 2-6% at
  // 1024^3). Prefetches past the matrix's rows (edge tiles) are harmless hints.
  const int64_t tail = std::min<int64_t>(kc, 2 * MR);
  int64_t p = 0;
  for (; p < kc - tail; ++p, ap += kMR, bp += kNR) k_step(ap, bp);
  for (int64_t line = 0; p < kc; ++p, ++line, ap += kMR, bp += kNR) {
    _mm_prefetch(reinterpret_cast<const char*>(c + (line >> 1) * ldc + (line & 1) * 16), _MM_HINT_T0);
    k_step(ap, bp);
  }
  const __mmask16 lo = lanes(nr), hi = lanes(nr - 16);
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    if (i >= mr) break;
    float* row = c + i * ldc;
    __m512 r0 = _mm512_mul_ps(va, acc0[i]), r1 = _mm512_mul_ps(va, acc1[i]);
    if (beta != 0.0f) {
      r0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(lo, row), r0);
      r1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(hi, row + 16), r1);
    }
    // One rounded addition: the bits of the bias copied into c and added with beta = 1 (an FMA by 1).
    if (bias) {
      r0 = _mm512_add_ps(r0, bias0);
      r1 = _mm512_add_ps(r1, bias1);
    }
    _mm512_mask_storeu_ps(row, lo, r0);
    _mm512_mask_storeu_ps(row + 16, hi, r1);
  }
}

// The kernel for a panel with mr rows left: the full tile, or the narrowest of 2, 4 and 8 rows that
// holds them.
void micro_kernel_rows(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int64_t mr, int64_t nr,
                       float alpha, float beta, const float* bias) {
  if (mr <= 2) return micro_kernel<2>(kc, ap, bp, c, ldc, mr, nr, alpha, beta, bias);
  if (mr <= 4) return micro_kernel<4>(kc, ap, bp, c, ldc, mr, nr, alpha, beta, bias);
  if (mr <= 8) return micro_kernel<8>(kc, ap, bp, c, ldc, mr, nr, alpha, beta, bias);
  return micro_kernel<kMR>(kc, ap, bp, c, ldc, mr, nr, alpha, beta, bias);
}

// The micro-kernels over one packed block of A (rows [ic, ic + mc) of C) and one of B (columns
// [jc, jc + nc)): each 32-column panel of B serves every 14-row panel of A in turn. bias (its
// columns [jc, jc + nc), or null) is added where this block of k is the first.
void multiply_blocks(const float* packed_a, const float* packed_b, int64_t mc, int64_t nc, int64_t kc, float alpha,
                     float beta, const float* bias, float* c, int64_t ldc) {
  for (int64_t jr = 0; jr < nc; jr += kNR)
    for (int64_t ir = 0; ir < mc; ir += kMR)
      micro_kernel_rows(kc, packed_a + ir * kc, packed_b + jr * kc, c + ir * ldc + jr, ldc, std::min(kMR, mc - ir),
                        std::min(kNR, nc - jr), alpha, beta, bias ? bias + jr : nullptr);
}

// One thread's GEMM over all of its C: a, b, bias and c point at its first row / column.
void sgemm_serial(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, const float* bias, float* c, int64_t ldc) {
  PackBuffers& buf = pack_buffers();
  float* packed_a = buf.a(round_up(std::min(kMC, m), kMR) * std::min(kKC, k));
  float* packed_b = buf.b(std::min(kKC, k) * round_up(std::min(kNC, n), kNR));
  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      // Later blocks add to what the first wrote (the bias with it).
      const float block_beta = pc == 0 ? beta : 1.0f;
      const float* block_bias = pc == 0 && bias ? bias + jc : nullptr;
      pack_b(tb, b, ldb, pc, kc, jc, nc, packed_b);
      for (int64_t ic = 0; ic < m; ic += kMC) {
        const int64_t mc = std::min(kMC, m - ic);
        pack_a(ta, a, lda, ic, mc, pc, kc, packed_a);
        multiply_blocks(packed_a, packed_b, mc, nc, kc, alpha, block_beta, block_bias, c + ic * ldc + jc, ldc);
      }
    }
  }
}

// The threads split the rows of C and share each packed block of B, which they pack together
// (each a share of its panels) between two barriers; each packs its own blocks of A.
void sgemm_rows(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                const float* b, int64_t ldb, float beta, const float* bias, float* c, int64_t ldc, int threads) {
  float* shared_b = pack_buffers().b(std::min(kKC, k) * round_up(std::min(kNC, n), kNR));  // the calling thread's
  const int64_t tiles = (m + kMR - 1) / kMR;
  std::exception_ptr failure;  // a thread's buffer may fail to allocate: rethrown here
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    float* packed_a = nullptr;
    try {
      packed_a = pack_buffers().a(round_up(std::min(kMC, m), kMR) * std::min(kKC, k));
    } catch (...) {
#pragma omp critical(remat_sgemm_failure)
      failure = std::current_exception();
    }
#pragma omp barrier
    // Every thread reads the flag after the barrier, so all of them take the same path (and meet
    // at the same barriers below).
    bool failed = false;
#pragma omp critical(remat_sgemm_failure)
    failed = failure != nullptr;
    const int64_t first = tiles * t / count * kMR, last = std::min(tiles * (t + 1) / count * kMR, m);
    for (int64_t jc = 0; jc < n && !failed; jc += kNC) {
      const int64_t nc = std::min(kNC, n - jc), panels = (nc + kNR - 1) / kNR;
      for (int64_t pc = 0; pc < k; pc += kKC) {
        const int64_t kc = std::min(kKC, k - pc);
#pragma omp barrier  // nobody reads the previous block of B any more
        const int64_t my_first = panels * t / count, my_last = panels * (t + 1) / count;  // this thread's panels
        if (my_last > my_first)
          pack_b(tb, b, ldb, pc, kc, jc + my_first * kNR, std::min(my_last * kNR, nc) - my_first * kNR,
                 shared_b + my_first * kNR * kc);
#pragma omp barrier  // the block of B is whole
        for (int64_t ic = first; ic < last; ic += kMC) {
          const int64_t mc = std::min(kMC, last - ic);
          pack_a(ta, a, lda, ic, mc, pc, kc, packed_a);
          multiply_blocks(packed_a, shared_b, mc, nc, kc, alpha, pc == 0 ? beta : 1.0f,
                          pc == 0 && bias ? bias + jc : nullptr, c + ic * ldc + jc, ldc);
        }
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

bool sgemm_avx512_built() { return true; }

void sgemm_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int threads, const float* bias) {
  // No products (C = beta C + bias) or nothing to write: gemm() and gemm_bias() handle those before
  // they pick a library.
  if (m == 0 || n == 0 || k == 0) {
    if (bias) return gemm_bias<float>(ta, tb, m, n, k, a, lda, b, ldb, bias, c, ldc);
    return gemm<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  // Each thread takes whole tiles of C, by rows (sharing the packed blocks of B) or by columns
  // (each packing all of A): by columns only when C is wider than tall.
  const bool split_rows = n <= m;
  const int64_t tiles = split_rows ? (m + kMR - 1) / kMR : (n + kNR - 1) / kNR;
  if (threads <= 0) threads = omp_get_max_threads();
  if (omp_in_parallel()) threads = 1;
  // Below about a million multiply-adds a thread, waking the others costs more than it saves.
  // (In double: m n k of huge operands would overflow 64 bits.)
  const double work = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) / (1 << 20);
  threads = static_cast<int>(std::clamp<double>(std::min(work, static_cast<double>(tiles)), 1, threads));
  if (threads == 1) return sgemm_serial(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, bias, c, ldc);
  if (split_rows) return sgemm_rows(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, bias, c, ldc, threads);
  std::exception_ptr failure;  // a thread's packing buffers may fail to allocate: rethrown here
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
    const int64_t first = tiles * t / count * kNR, last = std::min(tiles * (t + 1) / count * kNR, n);
    try {
      if (last > first)
        sgemm_serial(ta, tb, m, last - first, k, alpha, a, lda, tb ? b + first * ldb : b + first, ldb, beta,
                     bias ? bias + first : nullptr, c + first, ldc);
    } catch (...) {
#pragma omp critical(remat_sgemm_failure)
      failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
}

#else  // no AVX-512 in this build

bool sgemm_avx512_built() { return false; }

void sgemm_avx512(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float,
                  float*, int64_t, int, const float*) {
  REMAT_FAIL("sgemm_avx512: this build of remat was not compiled for AVX-512 (meson option -Dnative on an "
             "AVX-512 CPU)");
}

#endif

}  // namespace remat::cpu
