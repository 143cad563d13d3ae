// Philox 4x32-10 counter-based RNG (Salmon et al., 2011), shared by the CPU and CUDA kernels.
// Element i of a random op with attributes (seed, offset) draws lane i % 4 of the block at
// counter offset + i / 4, so the same op replayed, or run on another device, gives the same bits.
#pragma once

#include <cstdint>

#include "half.h"  // REMAT_HD

namespace remat::philox {

struct U32x4 {
  uint32_t v[4];
};

REMAT_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

REMAT_HD U32x4 philox4x32_10(uint64_t counter, uint64_t seed) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
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

#ifndef __CUDA_ARCH__
// bits_at(seed, offset, i) for i in [first, first + n), into out[0..n): the same values, a Philox
// block per four elements instead of per element, and kLanes blocks side by side so that the
// compiler runs the rounds in vector registers (32x32->64 multiplies).
inline void fill_bits(uint64_t seed, uint64_t offset, uint64_t first, uint64_t n, uint32_t* out) {
  constexpr int kLanes = 16;
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint64_t i = first, end = first + n;
  // A head that does not start on a block boundary, one element at a time.
  for (; i < end && i % 4 != 0; ++i) *out++ = bits_at(seed, offset, i);
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
