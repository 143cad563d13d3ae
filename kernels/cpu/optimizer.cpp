// CPU optimizer kernels: the AdamW update and a sum of squares for gradient clipping.
#include <cmath>

#include "kernels/cpu/cpu_backend.h"

namespace remat {

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

std::vector<double> CpuBackend::sum_squares(const std::vector<Tensor>& xs) {
  std::vector<double> sums;
  sums.reserve(xs.size());
  for (const Tensor& x : xs)
    sums.push_back(cpu::dispatch_float(x.dtype(), "sum_squares", [&]<typename T>() {
      const T* p = x.data<T>();
      double total = 0;
      for (int64_t i = 0; i < x.numel(); ++i) total += static_cast<double>(p[i]) * static_cast<double>(p[i]);
      return total;
    }));
  return sums;
}

}  // namespace remat
