// One head's f32 attention on the CPU's vectors: register tiles of broadcast FMAs for the block
// products, vectors for the softmax (kernels/cpu/attention_heads.h says what and why), written
// once over the lanes of kernels/cpu/simd_lanes.h and compiled for the build's instruction set.
#include "kernels/cpu/attention_heads.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>

#include "kernels/cpu/simd_lanes.h"
#include "runtime/error.h"

namespace remat::cpu {

namespace {

// The path chosen: -1 not decided yet, 0 auto, 1 eigen.
std::atomic<int> g_path{-1};

int path_from(const std::string& name, const char* what) {
  REMAT_CHECK(name == "auto" || name == "eigen", what, ": expected auto or eigen, got '", name, "'");
  return name == "auto" ? 0 : 1;
}

// Decided at the first call from REMAT_CPU_ATTENTION (auto when unset), then fixed unless a test or
// benchmark calls set_attention_path.
bool automatic_path() {
  int path = g_path.load(std::memory_order_relaxed);
  if (path < 0) {
    const char* env = std::getenv("REMAT_CPU_ATTENTION");
    path = path_from(env ? env : "auto", "REMAT_CPU_ATTENTION");
    g_path.store(path, std::memory_order_relaxed);
  }
  return path == 0;
}

}  // namespace

void set_attention_path(const std::string& name) { g_path.store(path_from(name, "set_attention_path")); }

bool attention_kernels_chosen(int64_t d) { return automatic_path() && attention_kernels_fit(d); }

std::string attention_path() {
  const std::string isa = attention_kernels_isa();
  return automatic_path() && !isa.empty() ? isa + " kernels" : "eigen";
}

#ifdef REMAT_CPU_LANES

namespace {

// Rows of the transposed keys and values, and of the score blocks, are padded to whole vectors.
int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

// Rows of a tile of C: with 2 vectors of columns, 2 MR accumulators, 2 vectors of B and a
// broadcast must fit the registers (AVX-512: 16 + 3 of 32; AVX2: 12 + 3 of 16).
template <class S>
constexpr int kTileRows = S::kLanes == 16 ? 8 : 6;

// Query rows per block: two row groups of tiles (AVX2: 12 ran 1.05-1.2x as fast as 16 at dit's
// and gpt's shapes, Zen 3); the bits do not depend on it (dK and dV sum over rows in order).
template <class S>
constexpr int64_t kBlockRows = S::kLanes == 16 ? 16 : 12;

// An MR x (NV vectors) tile of C, its first `cols` columns: C = alpha A B, or C += A B (Add), summed
// over k in order with one FMA per term. A(i, p) = a[i ars + p acs]; B's row p at b + p ldb.
// A tile whose columns are all there (Whole) loads and stores whole vectors, else masked ones:
// the same lanes computed the same way. (A specialisation, not std::conditional: a vector type as
// a template argument loses its attributes, and GCC warns.)
template <class S, bool Whole>
struct TileLanes {
  using type = typename S::M;
};
template <class S>
struct TileLanes<S, true> {
  using type = WholeVector;
};

template <class S, int MR, int NV, bool Add, bool Whole>
void tile(int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c, int64_t ldc,
          int64_t cols, float alpha) {
  using V = typename S::V;
  // Loops over the tile's rows and vectors fully unrolled: GCC otherwise keeps the accumulators in
  // memory and stores every one of them at every step over k.
  typename TileLanes<S, Whole>::type mask[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v)
    if constexpr (!Whole) mask[v] = S::below(cols - S::kLanes * v);
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = Add ? S::load(mask[v], c + r * ldc + S::kLanes * v) : S::zero();
  for (int64_t p = 0; p < k; ++p) {
    V bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = S::load(mask[v], b + p * ldb + S::kLanes * v);
    const float* ap = a + p * acs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V av = S::set1(ap[r * ars]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fmadd(av, bv[v], acc[r][v]);
    }
  }
  const V scale = S::set1(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      S::store(c + r * ldc + S::kLanes * v, mask[v], Add ? acc[r][v] : S::mul(acc[r][v], scale));
}

template <class S, int MR, bool Add>
void row_group(int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
               int64_t ldc, float alpha) {
  for (int64_t j = 0; j < n; j += 2 * S::kLanes) {
    const int64_t cols = std::min<int64_t>(2 * S::kLanes, n - j);
    if (cols == 2 * S::kLanes)
      tile<S, MR, 2, Add, true>(k, a, ars, acs, b + j, ldb, c + j, ldc, cols, alpha);
    else if (cols > S::kLanes)
      tile<S, MR, 2, Add, false>(k, a, ars, acs, b + j, ldb, c + j, ldc, cols, alpha);
    else
      tile<S, MR, 1, Add, false>(k, a, ars, acs, b + j, ldb, c + j, ldc, cols, alpha);
  }
}

// The last `rows` (< kTileRows) rows of C, as one row group of that many rows.
template <class S, int MR, bool Add>
void last_rows(int64_t rows, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b,
               int64_t ldb, float* c, int64_t ldc, float alpha) {
  if constexpr (MR > 0) {
    if (rows == MR) return row_group<S, MR, Add>(n, k, a, ars, acs, b, ldb, c, ldc, alpha);
    last_rows<S, MR - 1, Add>(rows, n, k, a, ars, acs, b, ldb, c, ldc, alpha);
  }
}

// C[m, n] = alpha A[m, k] B[k, n], or C += A B (Add; alpha then 1), A addressed as in tile().
template <class S, bool Add>
void small_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                float* c, int64_t ldc, float alpha = 1) {
  constexpr int kRows = kTileRows<S>;
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows)
    row_group<S, kRows, Add>(n, k, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, alpha);
  last_rows<S, kRows - 1, Add>(m - i, n, k, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, alpha);
}

// out[c * ld + j] = rows' row j, column c (d a multiple of the lanes): a head's keys (or values)
// with the keys contiguous, in square blocks through registers.
template <class S>
void transpose_rows(HeadRowsF32 rows, int64_t t, int64_t d, float* out, int64_t ld) {
  constexpr int L = S::kLanes;
  int64_t j0 = 0;
  for (; j0 + L <= t; j0 += L)
    for (int64_t c0 = 0; c0 < d; c0 += L) {
      typename S::V r[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) r[i] = S::loadu(rows.base + (j0 + i) * rows.ld + c0);
      S::transpose(r);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) S::storeu(out + (c0 + i) * ld + j0, r[i]);
    }
  for (int64_t j = j0; j < t; ++j)
    for (int64_t c = 0; c < d; ++c) out[c * ld + j] = rows.base[j * rows.ld + c];
}

// f(j, lanes) for the vectors of a run of n floats in order: whole ones, then the masked rest.
template <class S, class F>
void for_vectors(int64_t n, F f) {
  int64_t j = 0;
  for (; j + S::kLanes <= n; j += S::kLanes) f(j, WholeVector{});
  if (j < n) f(j, S::below(n - j));
}

template <class S>
float row_max(const float* row, int64_t n) {
  typename S::V m = S::set1(-INFINITY);
  for_vectors<S>(n, [&](int64_t j, auto lanes) { m = S::max(m, S::load_or(lanes, row + j, S::set1(-INFINITY))); });
  return S::reduce_max(m);
}

// row[j] = exp(row[j] - shift) for j < n; returns their sum (lane-wise in order, then the lanes
// in the fixed tree of S's reduction).
template <class S>
float exp_shifted_sum(float* row, float shift, int64_t n) {
  typename S::V sum = S::zero();
  const typename S::V s = S::set1(shift);
  for_vectors<S>(n, [&](int64_t j, auto lanes) {
    const typename S::V e = S::keep(lanes, S::exp(S::sub(S::load(lanes, row + j), s)));
    S::store(row + j, lanes, e);
    sum = S::add(sum, e);
  });
  return S::reduce_add(sum);
}

template <class S>
void scale_row(float* row, float by, int64_t n) {
  const typename S::V f = S::set1(by);
  for_vectors<S>(n, [&](int64_t j, auto lanes) { S::store(row + j, lanes, S::mul(S::load(lanes, row + j), f)); });
}

template <class S>
float dot(const float* x, const float* y, int64_t n) {
  typename S::V acc = S::zero();
  for_vectors<S>(n, [&](int64_t j, auto lanes) { acc = S::fmadd(S::load(lanes, x + j), S::load(lanes, y + j), acc); });
  return S::reduce_add(acc);
}

// ds[j] = p[j] (ds[j] - di) scale for j < n: a row of dS from its row of dP.
template <class S>
void softmax_grad_row(float* ds, const float* p, float di, float scale, int64_t n) {
  const typename S::V dv = S::set1(di), sc = S::set1(scale);
  for_vectors<S>(n, [&](int64_t j, auto lanes) {
    const typename S::V g = S::sub(S::load(lanes, ds + j), dv);
    S::store(ds + j, lanes, S::mul(S::mul(S::load(lanes, p + j), g), sc));
  });
}

// Keys a query row sees in a block whose rows see `keys`: causally, those up to the row itself.
int64_t keys_of_row(int64_t row, int64_t keys, bool causal) { return causal ? row + 1 : keys; }

template <class S>
void head_forward(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, float* o, int64_t o_ld, float* lse, int64_t t,
                  int64_t d, bool causal, float scale, float* scratch) {
  const int64_t tp = padded(t, S::kLanes);
  float* kt = scratch;     // [d, tp]: the keys contiguous
  float* s = kt + d * tp;  // [kBlockRows, tp]: a block's scores, then its probabilities
  transpose_rows<S>(k, t, d, kt, tp);
  for (int64_t r0 = 0; r0 < t; r0 += kBlockRows<S>) {
    const int64_t r1 = std::min(t, r0 + kBlockRows<S>), rows = r1 - r0, keys = causal ? r1 : t;
    small_gemm<S, false>(rows, keys, d, q.base + r0 * q.ld, q.ld, 1, kt, tp, s, tp, scale);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = s + i * tp;
      const int64_t seen = keys_of_row(r0 + i, keys, causal);
      const float mx = row_max<S>(row, seen);
      const float sum = exp_shifted_sum<S>(row, mx, seen);
      scale_row<S>(row, 1.0f / sum, seen);
      std::fill(row + seen, row + keys, 0.0f);  // masked keys: probability 0
      lse[r0 + i] = mx + std::log(sum);
    }
    small_gemm<S, false>(rows, d, keys, s, tp, 1, v.base, v.ld, o + r0 * o_ld, o_ld);
  }
}

template <class S>
void head_backward(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, HeadRowsF32 o, HeadRowsF32 d_o, const float* lse,
                   float* dq, float* dk, float* dv, int64_t grad_ld, int64_t t, int64_t d, bool causal, float scale,
                   float* scratch) {
  const int64_t tp = padded(t, S::kLanes);
  float* kt = scratch;                 // [d, tp]: the keys contiguous
  float* vt = kt + d * tp;             // [d, tp]: the values contiguous
  float* p = vt + d * tp;              // [kBlockRows, tp]: probabilities
  float* ds = p + kBlockRows<S> * tp;  // [kBlockRows, tp]: dP, then dS
  transpose_rows<S>(k, t, d, kt, tp);
  transpose_rows<S>(v, t, d, vt, tp);
  // Query blocks in order: dK and dV sum their contributions in a fixed order.
  for (int64_t r0 = 0; r0 < t; r0 += kBlockRows<S>) {
    const int64_t r1 = std::min(t, r0 + kBlockRows<S>), rows = r1 - r0, keys = causal ? r1 : t;
    const float* q_block = q.base + r0 * q.ld;
    const float* do_block = d_o.base + r0 * d_o.ld;
    small_gemm<S, false>(rows, keys, d, q_block, q.ld, 1, kt, tp, p, tp, scale);
    for (int64_t i = 0; i < rows; ++i) {  // P = exp(S - lse)
      float* row = p + i * tp;
      const int64_t seen = keys_of_row(r0 + i, keys, causal);
      exp_shifted_sum<S>(row, lse[r0 + i], seen);
      std::fill(row + seen, row + keys, 0.0f);
    }
    small_gemm<S, true>(keys, d, rows, p, 1, tp, do_block, d_o.ld, dv, grad_ld);  // dV += P^T dO
    small_gemm<S, false>(rows, keys, d, do_block, d_o.ld, 1, vt, tp, ds, tp);     // dP = dO V^T
    for (int64_t i = 0; i < rows; ++i)  // dS = P (dP - D_i) scale, D_i = dO_i . O_i
      softmax_grad_row<S>(ds + i * tp, p + i * tp, dot<S>(do_block + i * d_o.ld, o.base + (r0 + i) * o.ld, d), scale,
                          keys);
    small_gemm<S, false>(rows, d, keys, ds, tp, 1, k.base, k.ld, dq + r0 * grad_ld, grad_ld);  // dQ = dS K
    small_gemm<S, true>(keys, d, rows, ds, 1, tp, q_block, q.ld, dk, grad_ld);                 // dK += dS^T Q
  }
}

}  // namespace

const char* attention_kernels_isa() { return BuildLanes::kName; }

bool attention_kernels_fit(int64_t d) { return d > 0 && d % BuildLanes::kLanes == 0 && d <= 256; }

int64_t attention_forward_scratch(int64_t t, int64_t d) {
  return (d + kBlockRows<BuildLanes>) * padded(t, BuildLanes::kLanes);
}

int64_t attention_backward_scratch(int64_t t, int64_t d) {
  return 2 * (d + kBlockRows<BuildLanes>) * padded(t, BuildLanes::kLanes);
}

void attention_head_forward(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, float* o, int64_t o_ld, float* lse,
                            int64_t t, int64_t d, bool causal, float scale, float* scratch) {
  head_forward<BuildLanes>(q, k, v, o, o_ld, lse, t, d, causal, scale, scratch);
}

void attention_head_backward(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, HeadRowsF32 o, HeadRowsF32 d_o,
                             const float* lse, float* dq, float* dk, float* dv, int64_t grad_ld, int64_t t, int64_t d,
                             bool causal, float scale, float* scratch) {
  head_backward<BuildLanes>(q, k, v, o, d_o, lse, dq, dk, dv, grad_ld, t, d, causal, scale, scratch);
}

#else

const char* attention_kernels_isa() { return ""; }

bool attention_kernels_fit(int64_t) { return false; }

int64_t attention_forward_scratch(int64_t, int64_t) { return 0; }

int64_t attention_backward_scratch(int64_t, int64_t) { return 0; }

void attention_head_forward(HeadRowsF32, HeadRowsF32, HeadRowsF32, float*, int64_t, float*, int64_t, int64_t, bool,
                            float, float*) {
  REMAT_FAIL("attention: this build of remat has no vector attention kernels (AVX-512 or AVX2 with -Dnative)");
}

void attention_head_backward(HeadRowsF32, HeadRowsF32, HeadRowsF32, HeadRowsF32, HeadRowsF32, const float*, float*,
                             float*, float*, int64_t, int64_t, int64_t, bool, float, float*) {
  REMAT_FAIL("attention: this build of remat has no vector attention kernels (AVX-512 or AVX2 with -Dnative)");
}

#endif

}  // namespace remat::cpu
