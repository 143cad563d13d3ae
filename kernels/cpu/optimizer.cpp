// CPU optimizer kernels: the AdamW update and a sum of squares for gradient clipping.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/lane_sums.h"

namespace remat {

namespace {

template <typename T>
double squares_of(const T* x, int64_t n) {
  auto at = [x](int64_t i) { return static_cast<double>(x[i]); };
  return cpu::lane_dot<double>(n, at, at);
}

}  // namespace

void CpuBackend::adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s) {
  cpu::dispatch_float(param.dtype(), "adamw_update", [&]<typename T>() {
    T* p = param.data<T>();
    const T* g = grad.data<T>();
    T *pm = m.data<T>(), *pv = v.data<T>();
    const T b1 = static_cast<T>(s.beta1), b2 = static_cast<T>(s.beta2);
    const T bias1 = T(1) - static_cast<T>(std::pow(s.beta1, static_cast<double>(s.step)));
    const T bias2 = T(1) - static_cast<T>(std::pow(s.beta2, static_cast<double>(s.step)));
    const T lr = static_cast<T>(s.lr), eps = static_cast<T>(s.eps), decay = static_cast<T>(s.lr * s.weight_decay);
    int64_t n = param.numel();
#pragma omp parallel for simd if (n > cpu::kParallelGrain)
    for (int64_t i = 0; i < n; ++i) {
      pm[i] = b1 * pm[i] + (T(1) - b1) * g[i];
      pv[i] = b2 * pv[i] + (T(1) - b2) * g[i] * g[i];
      T m_hat = pm[i] / bias1, v_hat = pv[i] / bias2;
      // Decoupled weight decay (Loshchilov & Hutter): applied to the weight, not the gradient.
      p[i] = p[i] - decay * p[i] - lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  });
  param.storage()->bump_version();
}

// Each tensor's sum of squares in f64: pieces of kSquaresPiece elements from the tensor's start,
// each in 16 interleaved lanes of fused multiply-adds (kernels/cpu/lane_sums.h' lane_dot; an f32's
// square is exact in f64 either way), the pieces' sums then added in order. The bits of a tensor's
// sum depend on it alone, whatever else is clipped with it and on however many threads; the pieces
// of every tensor run in parallel. (One running sum a tensor, one tensor after another, one core:
// 13.5 ms for gpt small's 4.8M gradients, 7-9% of its training step.)
std::vector<double> CpuBackend::sum_squares(const std::vector<Tensor>& xs) {
  constexpr int64_t kSquaresPiece = 16384;
  struct Piece {
    size_t tensor;
    int64_t begin, size;
  };
  std::vector<Piece> pieces;
  for (size_t t = 0; t < xs.size(); ++t) {
    if (!xs[t].defined()) continue;
    REMAT_CHECK(xs[t].dtype() == DType::f32 || xs[t].dtype() == DType::f64,
                "sum_squares: the cpu backend computes in f32 or f64, got ", dtype_name(xs[t].dtype()));
    for (int64_t begin = 0; begin < xs[t].numel(); begin += kSquaresPiece)
      pieces.push_back({t, begin, std::min(kSquaresPiece, xs[t].numel() - begin)});
  }
  std::vector<double> piece_sums(pieces.size());
  const int64_t count = static_cast<int64_t>(pieces.size());
#pragma omp parallel for if (count > 1)
  for (int64_t i = 0; i < count; ++i) {
    const Piece& piece = pieces[i];
    const Tensor& x = xs[piece.tensor];
    piece_sums[i] = x.dtype() == DType::f32 ? squares_of(x.data<float>() + piece.begin, piece.size)
                                            : squares_of(x.data<double>() + piece.begin, piece.size);
  }
  std::vector<double> sums(xs.size(), 0.0);  // an undefined tensor's is 0; 0 + the first piece is it
  for (size_t i = 0; i < pieces.size(); ++i) sums[pieces[i].tensor] += piece_sums[i];
  return sums;
}

}  // namespace remat
