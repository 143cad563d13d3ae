// Elementwise functions and their derivatives, written once for the CPU and CUDA kernels.
// GELU is the tanh approximation used by GPT-2.
#pragma once

#include <cmath>

#include "../../runtime/half.h"  // REMAT_HD

namespace remat::math {

template <typename T> REMAT_HD T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T> struct GeluConstants {
  static constexpr T kSqrt2OverPi = T(0.7978845608028654);
  static constexpr T kCubic = T(0.044715);
};

template <typename T> REMAT_HD T gelu(T x) {
  using C = GeluConstants<T>;
  T inner = C::kSqrt2OverPi * (x + C::kCubic * x * x * x);
  return T(0.5) * x * (T(1) + std::tanh(inner));
}

template <typename T> REMAT_HD T gelu_grad(T x) {
  using C = GeluConstants<T>;
  T inner = C::kSqrt2OverPi * (x + C::kCubic * x * x * x);
  T th = std::tanh(inner);
  T d_inner = C::kSqrt2OverPi * (T(1) + T(3) * C::kCubic * x * x);
  // d/dx [0.5 x (1 + tanh u)] = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u'
  return T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * d_inner;
}

template <typename T> REMAT_HD T silu(T x) { return x * sigmoid(x); }
template <typename T> REMAT_HD T silu_grad(T x) {
  T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

}  // namespace remat::math
