// Philox 4x32-10 counter-based RNG (Salmon et al., 2011), shared by the CPU and CUDA kernels.
// Element i of a random op with attributes (seed, offset) draws lane i % 4 of the block at
// counter offset + i / 4, so the same op replayed, or run on another device, gives the same bits.
#pragma once

#include <cstdint>
#if defined(__AVX2__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#include "half.h"  // REMAT_HD

namespace remat::philox {

// The round's multipliers and the key schedule's increments (Salmon et al.).
inline constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
inline constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

REMAT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

REMAT_HD U32x4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo(kM0, c0, &hi0);
    uint32_t lo1 = mulhilo(kM1, c2, &hi1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// The uint32 for element i of a stream starting at `offset` (offset counted in blocks of 4).
REMAT_HD uint32_t bits_at(uint64_t seed, uint64_t offset, uint64_t i) {
  return philox4x32_10(offset + i / 4, seed).v[i % 4];
}

// Uniform in [0, 1) with 24 random bits, exactly representable in f32.
REMAT_HD float uniform_from_bits(uint32_t bits) { return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f); }

#if defined(__AVX2__) && !defined(__AVX512F__) && !defined(__CUDACC__)
#define REMAT_PHILOX_AVX2 1
// The 4 x 8 words of Philox blocks block..block + 7, in order, into out[0..32), with AVX2: each
// word of the state one vector of 8 blocks, the 32x32->64 products of even and odd lanes apart
// (vpmuludq), 2 such groups at once to hide the multiplies' latency. GCC's AVX2 code for the plain
// loop below spilled the state and shuffled it to and from 64-bit lanes: 2.6 ns an element on a
// Zen 3 core against 0.7 ns here (docs/results/cpu.md, session 41).
inline void blocks_avx2(uint64_t seed, uint64_t block, uint32_t* out) {
  constexpr int kGroups = 2;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t counter = block + static_cast<uint64_t>(8 * g + l);
      lo[l] = static_cast<uint32_t>(counter), hi[l] = static_cast<uint32_t>(counter >> 32);
    }
    c0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    c1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    c2[g] = _mm256_setzero_si256(), c3[g] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // lo and hi words of m * c lane by lane.
  auto mulhilo = [](__m256i m, __m256i c, __m256i& lo, __m256i& hi) {
    const __m256i even = _mm256_mul_epu32(c, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  };
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 2
    for (int g = 0; g < kGroups; ++g) {
      __m256i lo0, hi0, lo1, hi1;
      mulhilo(m0, c0[g], lo0, hi0);
      mulhilo(m1, c2[g], lo1, hi1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), key0);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), key1);
      c1[g] = lo1, c3[g] = lo0;
    }
    k0 += kW0;
    k1 += kW1;
  }
  // Words to element order: block l's four words at out[4 l .. 4 l + 4).
  for (int g = 0; g < kGroups; ++g) {
    const __m256i a = _mm256_unpacklo_epi32(c0[g], c1[g]), b = _mm256_unpackhi_epi32(c0[g], c1[g]);
    const __m256i c = _mm256_unpacklo_epi32(c2[g], c3[g]), d = _mm256_unpackhi_epi32(c2[g], c3[g]);
    const __m256i b04 = _mm256_unpacklo_epi64(a, c), b15 = _mm256_unpackhi_epi64(a, c);
    const __m256i b26 = _mm256_unpacklo_epi64(b, d), b37 = _mm256_unpackhi_epi64(b, d);
    __m256i* o = reinterpret_cast<__m256i*>(out + 32 * g);
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(b04, b15, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(b26, b37, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(b04, b15, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(b26, b37, 0x31));
  }
}
#endif

#if defined(__AVX512F__) && !defined(__CUDACC__)
#define REMAT_PHILOX_AVX512 1
// blocks_avx2's scheme on 16 blocks a vector, 4 vectors at once: the 4 x 64 words of Philox blocks
// block..block + 63, in order, into out[0..256). 0.47 ns an element in cache where GCC's AVX-512
// code for the plain loop below took 0.77 (session 43).
inline void blocks_avx512(uint64_t seed, uint64_t block, uint32_t* out) {
  constexpr int kGroups = 4;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    alignas(64) uint32_t lo[16], hi[16];
    for (int l = 0; l < 16; ++l) {
      const uint64_t counter = block + static_cast<uint64_t>(16 * g + l);
      lo[l] = static_cast<uint32_t>(counter), hi[l] = static_cast<uint32_t>(counter >> 32);
    }
    c0[g] = _mm512_load_si512(lo), c1[g] = _mm512_load_si512(hi);
    c2[g] = _mm512_setzero_si512(), c3[g] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // lo and hi words of m * c lane by lane.
  auto mulhilo = [](__m512i m, __m512i c, __m512i& lo, __m512i& hi) {
    const __m512i even = _mm512_mul_epu32(c, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  };
  constexpr int kXor3 = 0x96;  // a ^ b ^ c as a ternary-logic table
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g) {
      __m512i lo0, hi0, lo1, hi1;
      mulhilo(m0, c0[g], lo0, hi0);
      mulhilo(m1, c2[g], lo1, hi1);
      c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], key0, kXor3);
      c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], key1, kXor3);
      c1[g] = lo1, c3[g] = lo0;
    }
    k0 += kW0;
    k1 += kW1;
  }
  // Words to element order: b_j holds block 4 k + j's four words in its 128-bit lane k; then the
  // 4 x 4 lanes of b_0..b_3 transposed, so that vector q holds blocks 4 q .. 4 q + 3.
  for (int g = 0; g < kGroups; ++g) {
    const __m512i a = _mm512_unpacklo_epi32(c0[g], c1[g]), b = _mm512_unpackhi_epi32(c0[g], c1[g]);
    const __m512i c = _mm512_unpacklo_epi32(c2[g], c3[g]), d = _mm512_unpackhi_epi32(c2[g], c3[g]);
    const __m512i b0 = _mm512_unpacklo_epi64(a, c), b1 = _mm512_unpackhi_epi64(a, c);
    const __m512i b2 = _mm512_unpacklo_epi64(b, d), b3 = _mm512_unpackhi_epi64(b, d);
    const __m512i t0 = _mm512_shuffle_i32x4(b0, b1, 0x44), t1 = _mm512_shuffle_i32x4(b2, b3, 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(b0, b1, 0xEE), t3 = _mm512_shuffle_i32x4(b2, b3, 0xEE);
    uint32_t* o = out + 64 * g;
    _mm512_storeu_si512(o, _mm512_shuffle_i32x4(t0, t1, 0x88));
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
  }
}
#endif

#ifndef __CUDA_ARCH__
// bits_at(seed, offset, i) for i in [first, first + n), into out[0..n): the same values, a Philox
// block per four elements instead of per element, and kLanes blocks side by side so that the
// compiler runs the rounds in vector registers (32x32->64 multiplies), or blocks_avx512 or
// blocks_avx2 above (the loop then takes a tail of fewer than 256 or 64 elements).
inline void fill_bits(uint64_t seed, uint64_t offset, uint64_t first, uint64_t n, uint32_t* out) {
  constexpr int kLanes = 16;
  uint64_t i = first, end = first + n;
  // A head that does not start on a block boundary, one element at a time.
  for (; i < end && i % 4 != 0; ++i) *out++ = bits_at(seed, offset, i);
#ifdef REMAT_PHILOX_AVX512
  for (; end - i >= 256; out += 256, i += 256) blocks_avx512(seed, offset + i / 4, out);
#endif
#ifdef REMAT_PHILOX_AVX2
  for (; end - i >= 4 * static_cast<uint64_t>(kLanes); out += 4 * kLanes, i += 4 * kLanes)
    blocks_avx2(seed, offset + i / 4, out);
#endif
  while (end - i >= 4 * static_cast<uint64_t>(kLanes)) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    const uint64_t block = offset + i / 4;
    for (int l = 0; l < kLanes; ++l) {
      uint64_t counter = block + static_cast<uint64_t>(l);
      c0[l] = static_cast<uint32_t>(counter), c1[l] = static_cast<uint32_t>(counter >> 32), c2[l] = 0, c3[l] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        uint64_t p0 = static_cast<uint64_t>(kM0) * c0[l], p1 = static_cast<uint64_t>(kM1) * c2[l];
        uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(p1), c3[l] = static_cast<uint32_t>(p0), c0[l] = n0, c2[l] = n2;
      }
      k0 += kW0;
      k1 += kW1;
    }
    for (int l = 0; l < kLanes; ++l) {
      out[4 * l] = c0[l], out[4 * l + 1] = c1[l], out[4 * l + 2] = c2[l], out[4 * l + 3] = c3[l];
    }
    out += 4 * kLanes;
    i += 4 * kLanes;
  }
  for (; i < end; ++i) *out++ = bits_at(seed, offset, i);
}
#endif

}  // namespace remat::philox
