// One head's f32 attention on AVX-512: register tiles of broadcast FMAs for the block products,
// vectors for the softmax (kernels/cpu/attention_avx512.h says what and why).
#include "kernels/cpu/attention_avx512.h"

#include <algorithm>
#include <cmath>

#ifdef __AVX512F__
#include <immintrin.h>

#include <Eigen/Core>

#include "kernels/cpu/vector_math.h"
#endif

#include "runtime/error.h"

namespace remat::cpu {

namespace {

constexpr int64_t kBlockRows = 16;  // query rows per block, as attention.cpp's Eigen path
constexpr int64_t kLanes = 16;

// Rows of the transposed keys and values, and of the score blocks, are padded to whole vectors.
int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

}  // namespace

#ifdef __AVX512F__

namespace {

constexpr int kTileRows = 8;  // a tile of C: 8 rows x 32 columns, 16 accumulators

__mmask16 lanes_below(int64_t cols) {
  return cols >= kLanes ? __mmask16(0xFFFF) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1);
}

// An MR x (16 NV) tile of C, its first `cols` columns: C = alpha A B, or C += A B (Add), summed
// over k in order with one FMA per term. A(i, p) = a[i ars + p acs]; B's row p at b + p ldb.
template <int MR, int NV, bool Add>
void tile(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c, int64_t ldc,
          int64_t cols, float alpha) {
  // Loops over the tile's rows and vectors fully unrolled: GCC otherwise keeps the accumulators in
  // memory and stores every one of them at every step over k.
  __mmask16 mask[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) mask[v] = lanes_below(cols - kLanes * v);
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Add ? _mm512_maskz_loadu_ps(mask[v], c + r * ldc + kLanes * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + p * ldb + kLanes * v);
    const float* ap = a + p * acs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ap[r * ars]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(c + r * ldc + kLanes * v, mask[v], Add ? acc[r][v] : _mm512_mul_ps(acc[r][v], scale));
}

template <int MR, bool Add>
void row_group(int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
               int64_t ldc, float alpha) {
  for (int64_t j = 0; j < n; j += 2 * kLanes) {
    const int64_t cols = std::min(2 * kLanes, n - j);
    if (cols > kLanes)
      tile<MR, 2, Add>(k, a, ars, acs, b + j, ldb, c + j, ldc, cols, alpha);
    else
      tile<MR, 1, Add>(k, a, ars, acs, b + j, ldb, c + j, ldc, cols, alpha);
  }
}

// C[m, n] = alpha A[m, k] B[k, n], or C += A B (Add; alpha then 1), A addressed as in tile().
template <bool Add>
void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                float* c, int64_t ldc, float alpha = 1) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    row_group<kTileRows, Add>(n, k, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, alpha);
  const float* ai = a + i * ars;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 0: break;
    case 1: row_group<1, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
    case 2: row_group<2, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
    case 3: row_group<3, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
    case 4: row_group<4, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
    case 5: row_group<5, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
    case 6: row_group<6, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
    default: row_group<7, Add>(n, k, ai, ars, acs, b, ldb, ci, ldc, alpha); break;
  }
}

// Transposes 16 rows of 16 lanes in registers: round k swaps bit k of the row index with bit k of
// the lane index, so four rounds swap them all (two-source permutes, no undefined operands).
void transpose16(__m512 (&r)[16]) {
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const int s = 1 << k;
    alignas(64) int lo[16], hi[16];
    for (int lane = 0; lane < 16; ++lane) {
      const bool set = lane & s;
      lo[lane] = set ? 16 + lane - s : lane;  // row i (bit k clear): its own low half, then the partner's
      hi[lane] = set ? 16 + lane : lane + s;  // row i | s: the high halves
    }
    const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      if (!(i & s)) {
        const __m512 a = r[i], b = r[i | s];
        r[i] = _mm512_permutex2var_ps(a, ilo, b);
        r[i | s] = _mm512_permutex2var_ps(a, ihi, b);
      }
  }
}

// out[c * ld + j] = rows' row j, column c (d a multiple of 16): a head's keys (or values) with the
// keys contiguous, in 16 x 16 blocks through registers.
void transpose_rows(HeadRowsF32 rows, int64_t t, int64_t d, float* out, int64_t ld) {
  int64_t j0 = 0;
  for (; j0 + kLanes <= t; j0 += kLanes)
    for (int64_t c0 = 0; c0 < d; c0 += kLanes) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows.base + (j0 + i) * rows.ld + c0);
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (c0 + i) * ld + j0, r[i]);
    }
  for (int64_t j = j0; j < t; ++j)
    for (int64_t c = 0; c < d; ++c) out[c * ld + j] = rows.base[j * rows.ld + c];
}

// exp(x) as kernels/cpu/vector_math.h's exp_block computes it (Eigen's packet exp; 0 below its
// lower clamp, so exp(-inf) is 0), on 16 lanes.
__m512 exp_lanes(__m512 x) {
  const __m512 e = Eigen::internal::pexp(x);
  const __mmask16 below = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLowerClamp), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(below, e, _mm512_setzero_ps());
}

// Lane reductions in a fixed tree (halves, quarters, pairs, neighbours), written out with zero-
// masked shuffles: GCC 12's _mm512_reduce_add_ps and unmasked shuffles pass an undefined operand
// and warn (GCC bug 105593).
template <__m512 (*Op)(__m512, __m512)>
float reduce_lanes(__m512 x) {
  constexpr __mmask16 all = 0xFFFF;
  x = Op(x, _mm512_maskz_shuffle_f32x4(all, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = Op(x, _mm512_maskz_shuffle_f32x4(all, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  x = Op(x, _mm512_maskz_permute_ps(all, x, _MM_SHUFFLE(1, 0, 3, 2)));
  x = Op(x, _mm512_maskz_permute_ps(all, x, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(x);
}
__m512 add_lanes(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
__m512 max_lanes(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }

float row_max(const float* row, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes_below(n - j), row + j));
  return reduce_lanes<max_lanes>(m);
}

// row[j] = exp(row[j] - shift) for j < n; returns their sum (lane-wise in order, then the lanes
// in reduce_lanes' fixed tree).
float exp_shifted_sum(float* row, float shift, int64_t n) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 mask = lanes_below(n - j);
    const __m512 e = _mm512_maskz_mov_ps(mask, exp_lanes(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + j), s)));
    _mm512_mask_storeu_ps(row + j, mask, e);
    sum = _mm512_add_ps(sum, e);
  }
  return reduce_lanes<add_lanes>(sum);
}

void scale_row(float* row, float by, int64_t n) {
  const __m512 f = _mm512_set1_ps(by);
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 mask = lanes_below(n - j);
    _mm512_mask_storeu_ps(row + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + j), f));
  }
}

float dot(const float* x, const float* y, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 mask = lanes_below(n - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + j), _mm512_maskz_loadu_ps(mask, y + j), acc);
  }
  return reduce_lanes<add_lanes>(acc);
}

// Keys a query row sees in a block whose rows see `keys`: causally, those up to the row itself.
int64_t keys_of_row(int64_t row, int64_t keys, bool causal) { return causal ? row + 1 : keys; }

}  // namespace

bool attention_avx512_built() { return true; }

void attention_head_forward_avx512(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, float* o, int64_t o_ld, float* lse,
                                   int64_t t, int64_t d, bool causal, float scale, float* scratch) {
  const int64_t tp = padded(t);
  float* kt = scratch;     // [d, tp]: the keys contiguous
  float* s = kt + d * tp;  // [kBlockRows, tp]: a block's scores, then its probabilities
  transpose_rows(k, t, d, kt, tp);
  for (int64_t r0 = 0; r0 < t; r0 += kBlockRows) {
    const int64_t r1 = std::min(t, r0 + kBlockRows), rows = r1 - r0, keys = causal ? r1 : t;
    small_gemm<false>(rows, keys, d, q.base + r0 * q.ld, q.ld, 1, kt, tp, s, tp, scale);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = s + i * tp;
      const int64_t seen = keys_of_row(r0 + i, keys, causal);
      const float mx = row_max(row, seen);
      const float sum = exp_shifted_sum(row, mx, seen);
      scale_row(row, 1.0f / sum, seen);
      std::fill(row + seen, row + keys, 0.0f);  // masked keys: probability 0
      lse[r0 + i] = mx + std::log(sum);
    }
    small_gemm<false>(rows, d, keys, s, tp, 1, v.base, v.ld, o + r0 * o_ld, o_ld);
  }
}

void attention_head_backward_avx512(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, HeadRowsF32 o, HeadRowsF32 d_o,
                                    const float* lse, float* dq, float* dk, float* dv, int64_t grad_ld, int64_t t,
                                    int64_t d, bool causal, float scale, float* scratch) {
  const int64_t tp = padded(t);
  float* kt = scratch;              // [d, tp]: the keys contiguous
  float* vt = kt + d * tp;          // [d, tp]: the values contiguous
  float* p = vt + d * tp;           // [kBlockRows, tp]: probabilities
  float* ds = p + kBlockRows * tp;  // [kBlockRows, tp]: dP, then dS
  transpose_rows(k, t, d, kt, tp);
  transpose_rows(v, t, d, vt, tp);
  // Query blocks in order: dK and dV sum their contributions in a fixed order.
  for (int64_t r0 = 0; r0 < t; r0 += kBlockRows) {
    const int64_t r1 = std::min(t, r0 + kBlockRows), rows = r1 - r0, keys = causal ? r1 : t;
    const float* q_block = q.base + r0 * q.ld;
    const float* do_block = d_o.base + r0 * d_o.ld;
    small_gemm<false>(rows, keys, d, q_block, q.ld, 1, kt, tp, p, tp, scale);
    for (int64_t i = 0; i < rows; ++i) {  // P = exp(S - lse)
      float* row = p + i * tp;
      const int64_t seen = keys_of_row(r0 + i, keys, causal);
      exp_shifted_sum(row, lse[r0 + i], seen);
      std::fill(row + seen, row + keys, 0.0f);
    }
    small_gemm<true>(keys, d, rows, p, 1, tp, do_block, d_o.ld, dv, grad_ld);          // dV += P^T dO
    small_gemm<false>(rows, keys, d, do_block, d_o.ld, 1, vt, tp, ds, tp);       // dP = dO V^T
    for (int64_t i = 0; i < rows; ++i) {  // dS = P (dP - D_i) scale, D_i = dO_i . O_i
      const __m512 di = _mm512_set1_ps(dot(do_block + i * d_o.ld, o.base + (r0 + i) * o.ld, d));
      const __m512 sc = _mm512_set1_ps(scale);
      float* dsr = ds + i * tp;
      const float* pr = p + i * tp;
      for (int64_t j = 0; j < keys; j += kLanes) {
        const __mmask16 mask = lanes_below(keys - j);
        const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dsr + j), di);
        _mm512_mask_storeu_ps(dsr + j, mask, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, pr + j), g), sc));
      }
    }
    small_gemm<false>(rows, d, keys, ds, tp, 1, k.base, k.ld, dq + r0 * grad_ld, grad_ld);  // dQ = dS K
    small_gemm<true>(keys, d, rows, ds, 1, tp, q_block, q.ld, dk, grad_ld);           // dK += dS^T Q
  }
}

#else

bool attention_avx512_built() { return false; }

void attention_head_forward_avx512(HeadRowsF32, HeadRowsF32, HeadRowsF32, float*, int64_t, float*, int64_t, int64_t,
                                   bool, float, float*) {
  REMAT_FAIL("attention (avx512): this build of remat was not compiled for AVX-512");
}

void attention_head_backward_avx512(HeadRowsF32, HeadRowsF32, HeadRowsF32, HeadRowsF32, HeadRowsF32, const float*,
                                    float*, float*, float*, int64_t, int64_t, int64_t, bool, float, float*) {
  REMAT_FAIL("attention (avx512): this build of remat was not compiled for AVX-512");
}

#endif

bool attention_avx512_fits(int64_t d) { return attention_avx512_built() && d > 0 && d % 16 == 0 && d <= 256; }

int64_t attention_avx512_forward_scratch(int64_t t, int64_t d) { return (d + kBlockRows) * padded(t); }

int64_t attention_avx512_backward_scratch(int64_t t, int64_t d) { return 2 * (d + kBlockRows) * padded(t); }

}  // namespace remat::cpu
