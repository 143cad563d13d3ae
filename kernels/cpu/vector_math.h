// f32 transcendental elementwise functions (GELU, SiLU, sigmoid, tanh, exp and their derivatives)
// through Eigen's vectorised packet math, instead of libm one element at a time.
//
// Every element goes through the same packet code, the tail of an array included (it is padded
// into a full block), so an element's result depends only on its value, never on its position or
// the buffer's alignment: a replayed forward is bitwise equal to the first one.
#pragma once

#include <Eigen/Core>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu_backend.h"
#include "lane_sums.h"
#include "../common/elementwise_math.h"

// GCC 12 reports its own AVX-512 min/max intrinsics, inlined here through Eigen's packet math, as
// reading an uninitialised value (their undefined pass-through operand; GCC bug 105593, fixed in 13).
// meson.build turns the "maybe" form off for GCC 12; this is the definite form, here only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace remat::cpu {

inline constexpr int kVectorBlock = 16;  // a multiple of every packet width (SSE 4, AVX 8, AVX-512 16)
using VectorBlock = Eigen::Array<float, kVectorBlock, 1>;

// y[i] = f(x[i]) block by block; f maps a VectorBlock to a VectorBlock expression.
template <typename F>
void map_blocks(const float* x, float* y, int64_t n, F f) {
  const int64_t blocks = (n + kVectorBlock - 1) / kVectorBlock;
#pragma omp parallel for if (n > kParallelGrain)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kVectorBlock, len = std::min<int64_t>(kVectorBlock, n - start);
    if (len == kVectorBlock) {
      Eigen::Map<VectorBlock>(y + start) = f(VectorBlock(Eigen::Map<const VectorBlock>(x + start)));
    } else {
      VectorBlock in = VectorBlock::Zero();
      std::copy(x + start, x + start + len, in.data());
      VectorBlock out = f(in);
      std::copy(out.data(), out.data() + len, y + start);
    }
  }
}

// y[i] = f(a[i], b[i]).
template <typename F>
void map_blocks(const float* a, const float* b, float* y, int64_t n, F f) {
  const int64_t blocks = (n + kVectorBlock - 1) / kVectorBlock;
#pragma omp parallel for if (n > kParallelGrain)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t start = k * kVectorBlock, len = std::min<int64_t>(kVectorBlock, n - start);
    if (len == kVectorBlock) {
      Eigen::Map<VectorBlock>(y + start) = f(VectorBlock(Eigen::Map<const VectorBlock>(a + start)),
                                             VectorBlock(Eigen::Map<const VectorBlock>(b + start)));
    } else {
      VectorBlock in_a = VectorBlock::Zero(), in_b = VectorBlock::Zero();
      std::copy(a + start, a + start + len, in_a.data());
      std::copy(b + start, b + start + len, in_b.data());
      VectorBlock out = f(in_a, in_b);
      std::copy(out.data(), out.data() + len, y + start);
    }
  }
}

inline constexpr float kExpLowerClamp = -88.3762626647949f;  // Eigen's; exp below it is taken as 0

// exp; below Eigen's lower clamp (kExpLowerClamp) Eigen returns a constant ~2.9e-39 instead of the
// decaying denormals, so those give 0: exp(-inf) is exactly 0, as masks rely on. With AVX-512 one
// masked blend (inlined into SiLU's block, the plain loop's 16 compares and blends went one
// element at a time, and SiLU took 2.5x sigmoid's time); else a plain loop, not Eigen's select,
// which evaluates a comparison element by element. Either way the same values.
inline VectorBlock exp_block(const VectorBlock& x) {
  VectorBlock e = x.exp();
#ifdef __AVX512F__
  static_assert(kVectorBlock == 16, "one AVX-512 vector a block");
  const __m512 v = _mm512_loadu_ps(x.data());
  const __mmask16 below = _mm512_cmp_ps_mask(v, _mm512_set1_ps(kExpLowerClamp), _CMP_LT_OQ);
  _mm512_storeu_ps(e.data(), _mm512_mask_blend_ps(below, _mm512_loadu_ps(e.data()), _mm512_setzero_ps()));
#else
  for (int i = 0; i < kVectorBlock; ++i) e[i] = x[i] < kExpLowerClamp ? 0.0f : e[i];
#endif
  return e;
}

// The formulas of kernels/common/elementwise_math.h on blocks.
inline VectorBlock gelu_block(const VectorBlock& x) {
  using C = math::GeluConstants<float>;
  VectorBlock th = (C::kSqrt2OverPi * (x + C::kCubic * x * x * x)).tanh();
  return 0.5f * x * (1.0f + th);
}

inline VectorBlock gelu_grad_block(const VectorBlock& x) {
  using C = math::GeluConstants<float>;
  VectorBlock th = (C::kSqrt2OverPi * (x + C::kCubic * x * x * x)).tanh();
  VectorBlock d_inner = C::kSqrt2OverPi * (1.0f + 3.0f * C::kCubic * x * x);
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * d_inner;
}

inline VectorBlock sigmoid_block(const VectorBlock& x) { return 1.0f / (1.0f + exp_block(-x)); }

inline VectorBlock silu_grad_block(const VectorBlock& x) {
  VectorBlock s = sigmoid_block(x);
  return s * (1.0f + x * (1.0f - s));
}

// y[i] = exp(x[i] - shift) along one row, on the calling thread (callers parallelise over rows).
// In place (y == x) is allowed.
template <typename T>
void exp_shifted(const T* x, T shift, T* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t start = 0; start < n; start += kVectorBlock) {
      const int64_t len = std::min<int64_t>(kVectorBlock, n - start);
      VectorBlock in = VectorBlock::Zero();
      std::copy(x + start, x + start + len, in.data());
      VectorBlock out = exp_block(in - shift);
      std::copy(out.data(), out.data() + len, y + start);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i] - shift);
  }
}

// sum_i exp(x[i] - shift) on the calling thread, in lane_sums.h's order: element i into lane
// i mod kLanes, the lanes then pairwise (a vector add a block, where adding a block's exps one at a
// time in index order made cross_entropy and softmax wait on one chain of dependent adds).
template <typename T>
T sum_exp_shifted(const T* x, T shift, int64_t n) {
  T acc[kLanes] = {};
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kVectorBlock == kLanes, "a block's exps go to the lanes one for one");
    for (int64_t start = 0; start < n; start += kVectorBlock) {
      const int64_t len = std::min<int64_t>(kVectorBlock, n - start);
      VectorBlock in = VectorBlock::Zero();
      std::copy(x + start, x + start + len, in.data());
      VectorBlock e = exp_block(in - shift);
      if (len == kVectorBlock) {
        Eigen::Map<VectorBlock>(acc) += e;
      } else {
        for (int64_t i = 0; i < len; ++i) acc[i] += e[i];
      }
    }
  } else {
    lane_sum_into(acc, n, [&](int64_t i) { return std::exp(x[i] - shift); });
  }
  return fold_lanes(acc);
}

}  // namespace remat::cpu

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic pop
#endif
