// The tensor-core attention kernels of attention_mma.cu (that file's head says what they do),
// kept apart so that tests/test_simt.cpp can run them on the CPU under a SIMT emulator
// (tests/simt_emulator.h, which defines REMAT_SIMT_EMULATION and the CUDA built-ins they use):
// the same source, checked against a reference where no GPU is.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 g + c. A (16 x 16, row major):
// registers {A[g][2c..2c+1]}, {A[g+8][2c..]}, {A[g][2c+8..]}, {A[g+8][2c+8..]}. B (16 x 8, k x n):
// {B[2c..2c+1][g]}, {B[2c+8..2c+9][g]}. C (16 x 8, f32): C[g][2c], C[g][2c+1], C[g+8][2c],
// C[g+8][2c+1]. Two C tiles side by side are the A fragment of the next product (P in P V).
#pragma once

#include <cuda_bf16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#ifdef REMAT_SIMT_EMULATION
#define REMAT_MMA_DEVICE inline
#define REMAT_MMA_KERNEL(threads) inline void
#define REMAT_MMA_DYNAMIC_SHARED(name) unsigned char* name = ::remat_simt::dynamic_shared()
#else
#define REMAT_MMA_DEVICE __device__ __forceinline__
#define REMAT_MMA_KERNEL(threads) __global__ void __launch_bounds__(threads)
#define REMAT_MMA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace remat::cuda::mma_attention {

using bf16 = __nv_bfloat16;
#ifdef REMAT_SIMT_EMULATION
using std::min;
#endif

constexpr int kWarps = 4, kBlockThreads = 32 * kWarps;
constexpr int kKeyTile = 64;             // forward: keys per shared tile
constexpr int kOtherTile = 32;           // dq: keys per tile; dk/dv: queries per tile

// Shared tiles keep rows D + 8 wide: consecutive rows start 16 bytes apart in the banks.
template <int D> constexpr int kLd = D + 8;

// Two bf16 in one register, the first in the low half (the element with the lower index).
REMAT_MMA_DEVICE uint32_t pack(bf16 lo, bf16 hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) | (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
REMAT_MMA_DEVICE uint32_t pack(float lo, float hi) { return pack(__float2bfloat16(lo), __float2bfloat16(hi)); }

// d += a * b on the tensor cores.
REMAT_MMA_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(REMAT_SIMT_EMULATION)
  ::remat_simt::mma_m16n8k16_bf16(d, a, b0, b1);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host never launches these below sm_80 (mma_attention_supported)
#endif
}

// ldmatrix: `count` 8 x 8 bf16 matrices from shared memory into the warp's fragments, one
// instruction where loading them one element pair at a time takes two to four loads per register
// (and, transposed, a pack). Lanes 8 i .. 8 i + 7 give matrix i's row addresses (16-byte aligned:
// rows of a shared tile start kLd * 2 = a multiple of 16 bytes apart). Register i of lane (g, c)
// gets row g, columns 2c and 2c + 1 of matrix i; with `trans`, column g, rows 2c and 2c + 1: the
// same registers, bit for bit, as the element loads they replace (tests/test_simt.cpp checks both
// against the fragment layouts above).
template <int count, bool trans>
REMAT_MMA_DEVICE void ldmatrix(uint32_t (&r)[count], const bf16* row) {
#if defined(REMAT_SIMT_EMULATION)
  ::remat_simt::ldmatrix(r, count, row, trans);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 750
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (count == 2 && !trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
  else if constexpr (count == 2 && trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  else if constexpr (count == 4 && !trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  static_assert(count == 2 || count == 4, "ldmatrix: x2 or x4");
#else
  __trap();  // the host never launches these below sm_80 (mma_attention_supported)
#endif
}

// The A fragment of rows [r0, r0 + 16) and columns [c0, c0 + 16) of a row-major shared tile:
// matrices (rows, columns) [r0, c0], [r0 + 8, c0], [r0, c0 + 8], [r0 + 8, c0 + 8].
template <int D>
REMAT_MMA_DEVICE void load_a(uint32_t (&a)[4], const bf16* s, int r0, int c0) {
  const int lane = threadIdx.x & 31, row = r0 + (lane & 7) + 8 * ((lane >> 3) & 1), col = c0 + 8 * (lane >> 4);
  ldmatrix<4, false>(a, s + row * kLd<D> + col);
}

// The A fragments of kM row tiles, rows [r0 + 16 i, r0 + 16 i + 16), over all D columns of a
// row-major shared tile: a warp's queries (or dO) held in registers through a kernel.
template <int D, int kM>
REMAT_MMA_DEVICE void load_row_tiles(uint32_t (&a)[kM][D / 16][4], const bf16* s, int r0) {
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a<D>(a[i][kk], s, r0 + 16 * i, 16 * kk);
}

// B = M^T for a row-major shared tile M, B[k][n] = M[n0 + n][k0 + k] (rows of M are B's columns),
// for k0 and k0 + 16 in one load: b[0..1] and b[2..3], matrices [n0, k0 + 8 i], i < 4, as they lie.
template <int D>
REMAT_MMA_DEVICE void load_b_transposed_pair(uint32_t (&b)[4], const bf16* s, int n0, int k0) {
  const int lane = threadIdx.x & 31, row = n0 + (lane & 7), col = k0 + 8 * (lane >> 3);
  ldmatrix<4, false>(b, s + row * kLd<D> + col);
}

// B = M for a row-major shared tile M, B[k][n] = M[k0 + k][n0 + n], for n0 and n0 + 8 in one
// load: b[0..1] and b[2..3], matrices [k0, n0], [k0 + 8, n0], [k0, n0 + 8], [k0 + 8, n0 + 8] of M,
// transposed.
template <int D>
REMAT_MMA_DEVICE void load_b_pair(uint32_t (&b)[4], const bf16* s, int k0, int n0) {
  const int lane = threadIdx.x & 31, row = k0 + (lane & 15), col = n0 + 8 * (lane >> 4);
  ldmatrix<4, true>(b, s + row * kLd<D> + col);
}

// The A fragment of columns [16 kk, 16 kk + 16) of a row of C tiles (8 columns each), rounded to bf16.
REMAT_MMA_DEVICE void c_to_a(uint32_t (&a)[4], const float (*c)[4], int kk) {
  a[0] = pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// s[i][j] += A_i M^T for kM row tiles i (16 rows each) and the N / 8 tiles j: the warp's A
// fragments over D columns (registers) against rows [0, N) of a row-major shared tile M (S = Q K^T,
// dP = dO V^T). Each B fragment loaded feeds the kM row tiles; each sum runs over kk in order,
// whatever kM is, so the bits do not depend on it.
template <int D, int N, int kM = 1>
REMAT_MMA_DEVICE void mma_by_transposed(float (*s)[N / 8][4], const uint32_t (*a)[D / 16][4], const bf16* m) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int kk = 0; kk < D / 16; kk += 2) {
      uint32_t b[4];
      load_b_transposed_pair<D>(b, m, 8 * j, 16 * kk);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        mma(s[i][j], a[i][kk], b[0], b[1]);
        mma(s[i][j], a[i][kk + 1], b[2], b[3]);
      }
    }
}

// The same product with A's kM row tiles (rows r0 + 16 i of a row-major shared tile) loaded 32
// columns at a time as they are used, not held in registers: the dk/dv kernel's keys and values.
template <int D, int N, int kM>
REMAT_MMA_DEVICE void mma_shared_by_transposed(float (*s)[N / 8][4], const bf16* a_tile, int r0, const bf16* m) {
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
    uint32_t a[kM][2][4];
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) load_a<D>(a[i][h], a_tile, r0 + 16 * i, 16 * (kk + h));
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      uint32_t b[4];
      load_b_transposed_pair<D>(b, m, 8 * j, 16 * kk);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        mma(s[i][j], a[i][0], b[0], b[1]);
        mma(s[i][j], a[i][1], b[2], b[3]);
      }
    }
  }
}

// acc[i][n] += C_i M for kM rows of C tiles i (K columns wide, rounded to bf16 as the A operand)
// and the D / 8 tiles n, against rows [0, K) of a row-major shared tile M (O = P V, dQ = dS K,
// dV = P^T dO, ...). Each B fragment loaded feeds the kM rows; sums run over kk in order.
template <int D, int K, int kM = 1>
REMAT_MMA_DEVICE void mma_tiles_by(float (*acc)[D / 8][4], const float (*c)[K / 8][4], const bf16* m) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[kM][4];
#pragma unroll
    for (int i = 0; i < kM; ++i) c_to_a(a[i], c[i], kk);
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      load_b_pair<D>(b, m, 16 * kk, 8 * n);
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        mma(acc[i][n], a[i], b[0], b[1]);
        mma(acc[i][n + 1], a[i], b[2], b[3]);
      }
    }
  }
}

// cp.async (sm_80): a copy from global to shared memory that runs while the thread goes on. A
// thread's copies join a group at commit_copies(); wait_copies<n>() returns once all but its n
// newest groups have landed (a __syncthreads() after it makes them the block's). So the next
// tile loads while the tensor cores work on this one.
template <int bytes>
REMAT_MMA_DEVICE void copy_async(void* to, const void* from) {
#if defined(REMAT_SIMT_EMULATION)
  ::remat_simt::cp_async(to, from, bytes);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(to));
  if constexpr (bytes == 16)  // .cg: through L2 only, the tiles are read once per block
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(from) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(address), "l"(from), "n"(bytes) : "memory");
#else
  __trap();  // the host never launches these below sm_80 (mma_attention_supported)
#endif
}
REMAT_MMA_DEVICE void commit_copies() {
#if defined(REMAT_SIMT_EMULATION)
  ::remat_simt::cp_async_commit();
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int pending>
REMAT_MMA_DEVICE void wait_copies() {
#if defined(REMAT_SIMT_EMULATION)
  ::remat_simt::cp_async_wait(pending);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

// A [B, H, T, D] bf16 tensor with unit stride over D, as the kernels address it: head bh = b H + h
// begins at data + b batch + h head and its rows lie `row` elements apart (each stride a multiple
// of 8 elements and data 16-byte aligned: attention_mma.cu makes sure). So the heads of a fused
// qkv projection are read where they lie, and o and the gradients are written [B, T, H, D].
template <typename E>
struct Heads {
  E* data;
  int64_t batch, head, row;
  int heads;
  // bh < B H fits an int (a grid dimension): 32-bit division, where a 64-bit one is a called
  // routine that held 20 more registers in the forward kernel (ptxas -v).
  REMAT_MMA_DEVICE E* of(int bh) const {
    const int b = bh / heads, h = bh - b * heads;
    return data + b * batch + h * head;
  }
};

// Rows [row0, row0 + rows) of one head's [T, D] matrix (rows ld elements apart) into a shared
// tile, 16 bytes a copy, asynchronously (the caller commits and waits); rows at or past t are
// zeros, stored now.
template <int D>
REMAT_MMA_DEVICE void stage(bf16* s, const bf16* head, int64_t ld, int row0, int rows, int t) {
  constexpr int kChunks = D / 8;
#pragma unroll 1  // unrolled, the copies' addresses held 30 more registers at D 64 (ptxas -v)
  for (int i = threadIdx.x; i < rows * kChunks; i += kBlockThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    bf16* to = s + r * kLd<D> + c;
    if (row0 + r < t) copy_async<16>(to, head + static_cast<int64_t>(row0 + r) * ld + c);
    else *reinterpret_cast<uint4*>(to) = make_uint4(0, 0, 0, 0);
  }
}

// Values [i0, i0 + n) of a head's per-row f32 vector (n <= the block's threads) into shared
// memory, asynchronously; those at or past t are zeros.
REMAT_MMA_DEVICE void stage_rows(float* s, const float* head, int i0, int n, int t) {
  const int i = threadIdx.x;
  if (i >= n) return;
  if (i0 + i < t) copy_async<4>(s + i, head + i0 + i);
  else s[i] = 0.f;
}

// Row r (0: the lane's row g, 1: g + 8) of a warp's D / 8 C tiles, divided by `divisor`, as bf16
// at `out` (the row's first element).
template <int D>
REMAT_MMA_DEVICE void store_row(bf16* out, const float (*acc)[4], int r, float divisor = 1.f) {
  const int c = threadIdx.x & 3;
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
    *reinterpret_cast<uint32_t*>(out + 8 * n + 2 * c) = pack(acc[n][2 * r] / divisor, acc[n][2 * r + 1] / divisor);
}

// Max and sum over the four lanes that hold one row of a C tile.
REMAT_MMA_DEVICE float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
REMAT_MMA_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Whether query `row` sees key `key` (positions fit an int: attention_mma.cu checks T).
REMAT_MMA_DEVICE bool visible(int row, int key, int t, bool causal) { return key < t && !(causal && key > row); }

// Whether every query in [row0, row0 + rows) and every key in [key0, key0 + keys) lie before t
// and each query sees each key: such a tile needs no mask, and most tiles of a long sequence are
// such tiles (the mask's compares and selects cost more than the tile's products).
REMAT_MMA_DEVICE bool all_visible(int row0, int rows, int key0, int keys, int t, bool causal) {
  return row0 + rows <= t && key0 + keys <= t && (!causal || key0 + keys - 1 <= row0);
}

// f(i, j, e) for each element e of C tile j (8 keys or queries) of row tile i, unrolled: a warp's
// scores, where the kernels turn them into probabilities, masked or not.
template <int kM, int N, typename F>
REMAT_MMA_DEVICE void for_each_score(F&& f) {
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(i, j, e);
}

// Softmax in base 2: exp(x) = 2^(x log2 e), so a scaled score and its exponent cost one multiply
// (or fused multiply-add) and one ex2 on the special-function unit, as __expf does underneath.
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
REMAT_MMA_DEVICE float exp2_approx(float x) {  // 0 for -inf
#ifdef REMAT_SIMT_EMULATION
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The forward's and dq's key loop, before key tile `step` of `steps` (kKeys keys each, a buffer
// of keys then values at tiles + 2 b tile sizes, b = step & 1) is used: the next tile's keys and
// values start loading into the other buffer (free since the last iteration's closing barrier),
// and this one's have landed for the whole block. Returns this tile's keys; its values follow.
template <int D, int kKeys>
REMAT_MMA_DEVICE const bf16* key_tile(bf16* tiles, int step, int steps, const bf16* k, int64_t k_ld, const bf16* v,
                                      int64_t v_ld, int t) {
  constexpr int kTileElements = kKeys * kLd<D>;
  if (step + 1 < steps) {
    bf16* next = tiles + 2 * ((step + 1) & 1) * kTileElements;
    stage<D>(next, k, k_ld, (step + 1) * kKeys, kKeys, t);
    stage<D>(next + kTileElements, v, v_ld, (step + 1) * kKeys, kKeys, t);
    commit_copies();
    wait_copies<1>();
  } else {
    wait_copies<0>();
  }
  __syncthreads();
  return tiles + 2 * (step & 1) * kTileElements;
}

// Each kernel takes kM row tiles of 16 a warp (queries in forward and dq, keys in dk/dv), so a
// block takes 16 kM kWarps rows. Two where the registers allow (head dim up to 64: 255 registers
// at 64 by ptxas, where one tile took 132): each fragment loaded from shared memory then feeds two
// MMAs. kM is a template argument of each kernel, chosen per kernel at run time
// (REMAT_CUDA_MMA_TILES, attention_mma.cu) so that a GPU's measurements can compare; sums keep
// their order, so the bits do not depend on it.
template <int D> constexpr int kDefaultRowTiles = D <= 64 ? 2 : 1;
template <int kM> constexpr int kBlockRows = 16 * kM * kWarps;

// The forward kernel's shared memory: two buffers of a key tile and a value tile (the second
// buffer stages the block's queries first).
template <int D, int kM>
constexpr size_t forward_shared_bytes() {
  static_assert(kBlockRows<kM> <= 2 * kKeyTile, "the queries pass through one buffer");
  return 4 * kKeyTile * kLd<D> * sizeof(bf16);
}

// The query block (forward and dq) for grid column x of `blocks`: under a causal mask the last
// query blocks see the most keys, so they take the first columns (the grid starts in column
// order) and the light blocks fill the tail of the launch. (dk/dv's key blocks are heaviest first
// as they are numbered.)
REMAT_MMA_DEVICE int query_block(int x, int blocks, bool causal) { return causal ? blocks - 1 - x : x; }

// Forward: a block of kBlockRows<kM> query rows of one head, key tiles of 64, the next tile
// loading while this one is used. Scores are kept in base-2 units (s scale log2 e), the row
// maxima m too; lse is stored in natural units.
template <int D, int kM>
REMAT_MMA_KERNEL(kBlockThreads) mma_forward_kernel(Heads<const bf16> q_heads, Heads<const bf16> k_heads,
                                                   Heads<const bf16> v_heads, Heads<bf16> o_heads, float* lse,
                                                   int64_t t64, bool causal, float scale) {
  REMAT_MMA_DYNAMIC_SHARED(smem);
  constexpr int kRows = kBlockRows<kM>;
  constexpr int kTileElements = kKeyTile * kLd<D>;
  bf16* const tiles = reinterpret_cast<bf16*>(smem);  // buffer b: keys at 2 b, values at 2 b + 1
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int t = static_cast<int>(t64), q0 = query_block(blockIdx.x, gridDim.x, causal) * kRows;
  const int row0 = q0 + 16 * kM * warp;  // the warp's first row; its tile i starts at row0 + 16 i
  const int head = blockIdx.y;
  const bf16 *q = q_heads.of(head), *k = k_heads.of(head), *v = v_heads.of(head);
  const float scale_log2 = scale * kLog2e;
  const int key_end = causal ? min(t, q0 + kRows) : t, key_tiles = (key_end + kKeyTile - 1) / kKeyTile;
  // The first key and value tiles load while the queries pass through the second buffer into
  // registers, where the warp's rows stay as A fragments.
  stage<D>(tiles, k, k_heads.row, 0, kKeyTile, t);
  stage<D>(tiles + kTileElements, v, v_heads.row, 0, kKeyTile, t);
  stage<D>(tiles + 2 * kTileElements, q, q_heads.row, q0, kRows, t);
  commit_copies();
  wait_copies<0>();
  __syncthreads();
  uint32_t qa[kM][D / 16][4];
  load_row_tiles<D, kM>(qa, tiles + 2 * kTileElements, row0 - q0);
  __syncthreads();
  int row[kM][2];  // the lane's rows: g and g + 8 of each tile
#pragma unroll
  for (int i = 0; i < kM; ++i) row[i][0] = row0 + 16 * i + g, row[i][1] = row0 + 16 * i + g + 8;
  float acc[kM][D / 8][4] = {};
  float m[kM][2], l[kM][2] = {};
#pragma unroll
  for (int i = 0; i < kM; ++i) m[i][0] = m[i][1] = -INFINITY;
  for (int step = 0; step < key_tiles; ++step) {
    const int kb = step * kKeyTile;
    const bf16* ks = key_tile<D, kKeyTile>(tiles, step, key_tiles, k, k_heads.row, v, v_heads.row, t);
    const bf16* vs = ks + kTileElements;
    float s[kM][kKeyTile / 8][4] = {};
    mma_by_transposed<D, kKeyTile, kM>(s, qa, ks);
    // Scaled scores, masked where the tile needs it; the rows' new maxima (key 0 is in the first
    // tile and visible to every row, so a maximum is finite from the first tile on).
    float mx[kM][2];
#pragma unroll
    for (int i = 0; i < kM; ++i) mx[i][0] = m[i][0], mx[i][1] = m[i][1];
    auto scale_scores = [&]<bool kMasked>() {
      for_each_score<kM, kKeyTile>([&](int i, int j, int e) {
        const int key = kb + 8 * j + 2 * c + (e & 1);
        const bool seen = !kMasked || visible(row[i][e >> 1], key, t, causal);
        s[i][j][e] = seen ? s[i][j][e] * scale_log2 : -INFINITY;
        mx[i][e >> 1] = fmaxf(mx[i][e >> 1], s[i][j][e]);
      });
    };
    if (all_visible(row0, 16 * kM, kb, kKeyTile, t, causal)) scale_scores.template operator()<false>();
    else scale_scores.template operator()<true>();
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      float corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[i][r] = quad_max(mx[i][r]);
        corr[r] = exp2_approx(m[i][r] - mx[i][r]);  // 0 while m is -inf
        l[i][r] *= corr[r];
        m[i][r] = mx[i][r];
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[i][n][0] *= corr[0], acc[i][n][1] *= corr[0];
        acc[i][n][2] *= corr[1], acc[i][n][3] *= corr[1];
      }
#pragma unroll
      for (int j = 0; j < kKeyTile / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[i][j][e] = exp2_approx(s[i][j][e] - m[i][e >> 1]);
          l[i][e >> 1] += s[i][j][e];
        }
    }
    mma_tiles_by<D, kKeyTile, kM>(acc, s, vs);  // O += P V, P rounded to bf16
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    // Every lane shuffles before any branches off (rows past t).
    l[i][0] = quad_sum(l[i][0]);
    l[i][1] = quad_sum(l[i][1]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[i][r] >= t) continue;
      store_row<D>(o_heads.of(head) + row[i][r] * o_heads.row, acc[i], r, l[i][r]);
      if (c == 0) lse[head * t64 + row[i][r]] = m[i][r] * kLn2 + logf(l[i][r]);
    }
  }
}

// The dq kernel's shared memory: the block's rows (q, then dO) and two buffers of a key tile and a
// value tile of 32.
template <int D, int kM>
constexpr size_t dq_shared_bytes() {
  return (kBlockRows<kM> + 4 * kOtherTile) * kLd<D> * sizeof(bf16);
}

// dq: a block of kBlockRows<kM> query rows, key tiles of 32, the next loading while this one is
// used. P = 2^(s scale log2 e - lse log2 e), dS = P (dP - D) scale, dq = dS K.
template <int D, int kM>
REMAT_MMA_KERNEL(kBlockThreads) mma_dq_kernel(Heads<const bf16> q_heads, Heads<const bf16> k_heads,
                                              Heads<const bf16> v_heads, Heads<const bf16> do_heads, const float* lse,
                                              const float* row_dot, Heads<bf16> dq_heads, int64_t t64, bool causal,
                                              float scale) {
  REMAT_MMA_DYNAMIC_SHARED(smem);
  constexpr int kRows = kBlockRows<kM>;
  constexpr int kTileElements = kOtherTile * kLd<D>;
  bf16* const rows = reinterpret_cast<bf16*>(smem);  // stages q, then dO
  bf16* const tiles = rows + kRows * kLd<D>;          // buffer b: keys at 2 b, values at 2 b + 1
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int t = static_cast<int>(t64), q0 = query_block(blockIdx.x, gridDim.x, causal) * kRows;
  const int row0 = q0 + 16 * kM * warp;  // the warp's first row; its tile i starts at row0 + 16 i
  const int head = blockIdx.y;
  const bf16 *q = q_heads.of(head), *k = k_heads.of(head), *v = v_heads.of(head), *d_o = do_heads.of(head);
  const float scale_log2 = scale * kLog2e;
  const int key_end = causal ? min(t, q0 + kRows) : t, key_tiles = (key_end + kOtherTile - 1) / kOtherTile;
  // The first key and value tiles load while q and dO pass through `rows` into registers.
  stage<D>(tiles, k, k_heads.row, 0, kOtherTile, t);
  stage<D>(tiles + kTileElements, v, v_heads.row, 0, kOtherTile, t);
  stage<D>(rows, q, q_heads.row, q0, kRows, t);
  commit_copies();
  wait_copies<0>();
  __syncthreads();
  uint32_t qa[kM][D / 16][4], da[kM][D / 16][4];
  load_row_tiles<D, kM>(qa, rows, row0 - q0);
  __syncthreads();
  stage<D>(rows, d_o, do_heads.row, q0, kRows, t);
  commit_copies();
  wait_copies<0>();
  __syncthreads();
  load_row_tiles<D, kM>(da, rows, row0 - q0);
  int row[kM][2];           // the lane's rows: g and g + 8 of each tile
  float L[kM][2], Di[kM][2];  // the rows' lse in base-2 units, and dO . O
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row[i][r] = row0 + 16 * i + g + 8 * r;
      L[i][r] = row[i][r] < t ? lse[head * t64 + row[i][r]] * kLog2e : 0.f;
      Di[i][r] = row[i][r] < t ? row_dot[head * t64 + row[i][r]] : 0.f;
    }
  float acc[kM][D / 8][4] = {};
  for (int step = 0; step < key_tiles; ++step) {
    const int kb = step * kOtherTile;
    const bf16* ks = key_tile<D, kOtherTile>(tiles, step, key_tiles, k, k_heads.row, v, v_heads.row, t);
    const bf16* vs = ks + kTileElements;
    float s[kM][kOtherTile / 8][4] = {}, dp[kM][kOtherTile / 8][4] = {};
    mma_by_transposed<D, kOtherTile, kM>(s, qa, ks);
    mma_by_transposed<D, kOtherTile, kM>(dp, da, vs);
    auto scores_to_ds = [&]<bool kMasked>() {  // s becomes dS
      for_each_score<kM, kOtherTile>([&](int i, int j, int e) {
        const int r = e >> 1, key = kb + 8 * j + 2 * c + (e & 1);
        const bool seen = !kMasked || (row[i][r] < t && visible(row[i][r], key, t, causal));
        const float p = seen ? exp2_approx(fmaf(s[i][j][e], scale_log2, -L[i][r])) : 0.f;
        s[i][j][e] = p * (dp[i][j][e] - Di[i][r]) * scale;
      });
    };
    if (all_visible(row0, 16 * kM, kb, kOtherTile, t, causal)) scores_to_ds.template operator()<false>();
    else scores_to_ds.template operator()<true>();
    mma_tiles_by<D, kOtherTile, kM>(acc, s, ks);  // dQ += dS K
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row[i][r] < t) store_row<D>(dq_heads.of(head) + row[i][r] * dq_heads.row, acc[i], r);
    }
}

// The dk/dv kernel's shared memory: its keys and values, and two buffers of a tile of 32 queries,
// their dO, log-sum-exp and row dots.
template <int D, int kM>
constexpr size_t dkv_shared_bytes() {
  return (2 * kBlockRows<kM> + 4 * kOtherTile) * kLd<D> * sizeof(bf16) + 4 * kOtherTile * sizeof(float);
}

// dk and dv: a block of kBlockRows<kM> keys, query tiles of 32 (the next loading while this one is
// used), in the transposed products: P^T = 2^(K Q^T scale log2 e - lse log2 e), dV = P^T dO,
// dP^T = V dO^T, dS^T = P^T (dP^T - D) scale, dK = dS^T Q. Under a causal mask the first key
// blocks see the most queries: the grid's order is heaviest first as it stands.
template <int D, int kM>
REMAT_MMA_KERNEL(kBlockThreads) mma_dkv_kernel(Heads<const bf16> q_heads, Heads<const bf16> k_heads,
                                               Heads<const bf16> v_heads, Heads<const bf16> do_heads,
                                               const float* lse, const float* row_dot, Heads<bf16> dk_heads,
                                               Heads<bf16> dv_heads, int64_t t64, bool causal, float scale) {
  REMAT_MMA_DYNAMIC_SHARED(smem);
  constexpr int kKeys = kBlockRows<kM>;
  constexpr int kTileElements = kOtherTile * kLd<D>;
  bf16* const ks = reinterpret_cast<bf16*>(smem);
  bf16* const vs = ks + kKeys * kLd<D>;
  bf16* const tiles = vs + kKeys * kLd<D>;  // buffer b: queries at 2 b, their dO at 2 b + 1
  float* const row_values = reinterpret_cast<float*>(tiles + 4 * kTileElements);  // buffer b: lse at 2 b, dots at 2 b + 1
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int t = static_cast<int>(t64), k0 = blockIdx.x * kKeys;
  const int key0 = k0 + 16 * kM * warp;  // the warp's first key; its tile i starts at key0 + 16 i
  const int head = blockIdx.y;
  const bf16 *q = q_heads.of(head), *k = k_heads.of(head), *v = v_heads.of(head), *d_o = do_heads.of(head);
  const float scale_log2 = scale * kLog2e;
  // Queries before the block's first key see none of its keys under a causal mask.
  const int q_begin = causal ? (k0 / kOtherTile) * kOtherTile : 0;
  const int query_tiles = (t - q_begin + kOtherTile - 1) / kOtherTile;
  auto stage_queries = [&](int b, int qb) {
    bf16* qs = tiles + 2 * b * kTileElements;
    stage<D>(qs, q, q_heads.row, qb, kOtherTile, t);
    stage<D>(qs + kTileElements, d_o, do_heads.row, qb, kOtherTile, t);
    stage_rows(row_values + 2 * b * kOtherTile, lse + head * t64, qb, kOtherTile, t);
    stage_rows(row_values + (2 * b + 1) * kOtherTile, row_dot + head * t64, qb, kOtherTile, t);
  };
  stage<D>(ks, k, k_heads.row, k0, kKeys, t);
  stage<D>(vs, v, v_heads.row, k0, kKeys, t);
  stage_queries(0, q_begin);
  commit_copies();
  int key[kM][2];  // the lane's keys: g and g + 8 of each tile
#pragma unroll
  for (int i = 0; i < kM; ++i) key[i][0] = key0 + 16 * i + g, key[i][1] = key0 + 16 * i + g + 8;
  float dk_acc[kM][D / 8][4] = {}, dv_acc[kM][D / 8][4] = {};
  for (int step = 0; step < query_tiles; ++step) {
    const int qb = q_begin + step * kOtherTile;
    const bf16* qs = tiles + 2 * (step & 1) * kTileElements;
    const bf16* dos = qs + kTileElements;
    const float* lse_s = row_values + 2 * (step & 1) * kOtherTile;
    const float* dot_s = lse_s + kOtherTile;
    if (step + 1 < query_tiles) {  // the other buffer, free since the last iteration's closing barrier
      stage_queries((step + 1) & 1, qb + kOtherTile);
      commit_copies();
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncthreads();
    float s[kM][kOtherTile / 8][4] = {}, dp[kM][kOtherTile / 8][4] = {};
    mma_shared_by_transposed<D, kOtherTile, kM>(s, ks, key0 - k0, qs);   // S^T = K Q^T
    mma_shared_by_transposed<D, kOtherTile, kM>(dp, vs, key0 - k0, dos);  // dP^T = V dO^T
    // s becomes P^T, dp becomes dS^T (the tile's rows are keys, its columns queries).
    auto scores_to_p_ds = [&]<bool kMasked>() {
      for_each_score<kM, kOtherTile>([&](int i, int j, int e) {
        const int qi = 8 * j + 2 * c + (e & 1), query = qb + qi;
        const bool seen = !kMasked || (query < t && visible(query, key[i][e >> 1], t, causal));
        const float p = seen ? exp2_approx(fmaf(s[i][j][e], scale_log2, -lse_s[qi] * kLog2e)) : 0.f;
        s[i][j][e] = p;
        dp[i][j][e] = p * (dp[i][j][e] - dot_s[qi]) * scale;
      });
    };
    if (all_visible(qb, kOtherTile, key0, 16 * kM, t, causal)) scores_to_p_ds.template operator()<false>();
    else scores_to_p_ds.template operator()<true>();
    mma_tiles_by<D, kOtherTile, kM>(dv_acc, s, dos);  // dV += P^T dO
    mma_tiles_by<D, kOtherTile, kM>(dk_acc, dp, qs);   // dK += dS^T Q
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (key[i][r] >= t) continue;
      store_row<D>(dk_heads.of(head) + key[i][r] * dk_heads.row, dk_acc[i], r);
      store_row<D>(dv_heads.of(head) + key[i][r] * dv_heads.row, dv_acc[i], r);
    }
}

// dO . O for each of the B H T rows (the backward's D), summed in f32 over d in order, a thread a
// row reading 16 bytes at a time.
template <int D>
REMAT_MMA_KERNEL(kBlockThreads) mma_row_dot_kernel(Heads<const bf16> do_heads, Heads<const bf16> o_heads, float* out,
                                                   int64_t t, int64_t rows) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kBlockThreads) + threadIdx.x;
  if (r >= rows) return;
  const int head = static_cast<int>(r / t);
  const int64_t i = r % t;
  const bf16* d_o = do_heads.of(head) + i * do_heads.row;
  const bf16* o = o_heads.of(head) + i * o_heads.row;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < D; c += 8) {
    const uint4 a = *reinterpret_cast<const uint4*>(d_o + c), b = *reinterpret_cast<const uint4*>(o + c);
    const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t x = aw[e / 2], y = bw[e / 2];
      const bf16 xe = __ushort_as_bfloat16(static_cast<unsigned short>(e % 2 ? x >> 16 : x & 0xffffu));
      const bf16 ye = __ushort_as_bfloat16(static_cast<unsigned short>(e % 2 ? y >> 16 : y & 0xffffu));
      s += __bfloat162float(xe) * __bfloat162float(ye);
    }
  }
  out[r] = s;
}

}  // namespace remat::cuda::mma_attention
