// f32 vector lanes of one instruction set (AVX-512 or AVX2 with FMA) behind one set of names, so a
// kernel written once over `S` compiles to either: masked loads and stores for a run's edge, FMA,
// exp as kernels/cpu/vector_math.h computes it, lane reductions in a fixed tree, register transposes.
// Masked-off lanes read as zero (or the fill given) and are never written, so an edge is handled by
// the same operations as the middle, and a lane's value never depends on its neighbours.
#pragma once

#include <cstdint>

// Whether this build has vector lanes for the kernels written over them (BuildLanes below).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define REMAT_CPU_LANES 1
#endif

#ifdef REMAT_CPU_LANES
#include <immintrin.h>

#include <Eigen/Core>

#include "kernels/cpu/vector_math.h"
#endif

namespace remat::cpu {

// In place of a mask: every lane of the vector (plain loads and stores; on AVX2 a masked store is
// several times slower than a plain one).
struct WholeVector {};

#ifdef __AVX512F__

// 16 lanes of a zmm register, 32 registers; masks in k registers.
struct Avx512Lanes {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr const char* kName = "avx512";

  // The lanes below n (all for n >= 16, none for n <= 0).
  static M below(int64_t n) { return n >= kLanes ? M(0xFFFF) : n <= 0 ? M(0) : M((1u << n) - 1); }
  static M from_bits(unsigned bits) { return static_cast<M>(bits); }  // lane l where bit l is set
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V load_or(M m, const float* p, V fill) { return _mm512_mask_loadu_ps(fill, m, p); }
  static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V load(WholeVector, const float* p) { return _mm512_loadu_ps(p); }
  static V load_or(WholeVector, const float* p, V) { return _mm512_loadu_ps(p); }
  static void store(float* p, WholeVector, V v) { _mm512_storeu_ps(p, v); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V keep(M m, V v) { return _mm512_maskz_mov_ps(m, v); }  // zero outside m
  static V keep(WholeVector, V v) { return v; }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }

  // exp as vector_math.h's exp_block: Eigen's packet exp, 0 below its lower clamp (exp(-inf) is 0).
  static V exp(V x) {
    const M below_clamp = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLowerClamp), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(below_clamp, Eigen::internal::pexp(x), _mm512_setzero_ps());
  }

  // Lane reductions in a fixed tree (halves, quarters, pairs, neighbours), written out with zero-
  // masked shuffles: GCC 12's _mm512_reduce_add_ps and unmasked shuffles pass an undefined operand
  // and warn (GCC bug 105593).
  template <V (*Op)(V, V)>
  static float reduce(V x) {
    constexpr M all = 0xFFFF;
    x = Op(x, _mm512_maskz_shuffle_f32x4(all, x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = Op(x, _mm512_maskz_shuffle_f32x4(all, x, x, _MM_SHUFFLE(2, 3, 0, 1)));
    x = Op(x, _mm512_maskz_permute_ps(all, x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = Op(x, _mm512_maskz_permute_ps(all, x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_cvtss_f32(x);
  }
  static float reduce_add(V x) { return reduce<add>(x); }
  static float reduce_max(V x) { return reduce<max>(x); }

  // Transposes 16 rows of 16 lanes in registers: round k swaps bit k of the row index with bit k of
  // the lane index, so four rounds swap them all (two-source permutes, no undefined operands).
  static void transpose(V (&r)[kLanes]) {
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
          const V a = r[i], b = r[i | s];
          r[i] = _mm512_permutex2var_ps(a, ilo, b);
          r[i | s] = _mm512_permutex2var_ps(a, ihi, b);
        }
    }
  }
};

#endif

#if defined(__AVX2__) && defined(__FMA__)

// 8 lanes of a ymm register, 16 registers; a mask is a vector whose lanes are all ones or zeros
// (vmaskmovps: masked-off lanes are neither read nor written, so they cannot fault).
struct Avx2Lanes {
  using V = __m256;
  using M = __m256i;
  static constexpr int kLanes = 8;
  static constexpr const char* kName = "avx2";

  static M below(int64_t n) {
    const int k = n >= kLanes ? kLanes : n <= 0 ? 0 : static_cast<int>(n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static M from_bits(unsigned bits) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
  }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static V load_or(M m, const float* p, V fill) {
    return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store(float* p, M m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V load(WholeVector, const float* p) { return _mm256_loadu_ps(p); }
  static V load_or(WholeVector, const float* p, V) { return _mm256_loadu_ps(p); }
  static void store(float* p, WholeVector, V v) { _mm256_storeu_ps(p, v); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V keep(M m, V v) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }
  static V keep(WholeVector, V v) { return v; }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  static V exp(V x) {
    const V below_clamp = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLowerClamp), _CMP_LT_OQ);
    return _mm256_blendv_ps(Eigen::internal::pexp(x), _mm256_setzero_ps(), below_clamp);
  }

  // Halves, pairs, neighbours: a fixed tree.
  template <V (*Op)(V, V)>
  static float reduce(V x) {
    x = Op(x, _mm256_permute2f128_ps(x, x, 1));
    x = Op(x, _mm256_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
    x = Op(x, _mm256_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm256_cvtss_f32(x);
  }
  static float reduce_add(V x) { return reduce<add>(x); }
  static float reduce_max(V x) { return reduce<max>(x); }

  // Transposes 8 rows of 8 lanes: pairs of rows interleaved, then pairs of pairs, then the halves.
  static void transpose(V (&r)[kLanes]) {
    V t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
  }
};

#endif

// The widest lanes this build was compiled for: the set the kernels over them run on.
#if defined(__AVX512F__)
using BuildLanes = Avx512Lanes;
#elif defined(REMAT_CPU_LANES)
using BuildLanes = Avx2Lanes;
#endif

}  // namespace remat::cpu
