// CPU layer_norm (fused forward/backward, saves mean and rstd) and softmax over the last axis.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/lane_sums.h"
#include "kernels/cpu/vector_math.h"

namespace remat {

// y in another dtype than x (AutocastOutput::compute) is the result cast, dy in another dtype is
// cast to x's first: the bits of the cast nodes it replaces (bf16 is a storage format only here).
std::vector<Tensor> CpuBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, DType out) {
  int64_t c = x.size(-1), rows = x.numel() / (c == 0 ? 1 : c);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Shape stat_shape(x.shape().begin(), x.shape().end() - 1);
  Tensor mean = Tensor::empty(stat_shape, x.dtype()), rstd = Tensor::empty(stat_shape, x.dtype());
  cpu::dispatch_float(x.dtype(), "layer_norm", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>(), *pb = b.data<T>();
    T *py = y.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
#pragma omp parallel for if (rows * c > cpu::kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = px + r * c;
      T mu = cpu::lane_sum(row, c) / static_cast<T>(c);
      auto centred = [&](int64_t i) { return row[i] - mu; };
      T var = cpu::lane_dot<T>(c, centred, centred);
      T rs = T(1) / std::sqrt(var / static_cast<T>(c) + static_cast<T>(eps));
      for (int64_t i = 0; i < c; ++i) py[r * c + i] = (row[i] - mu) * rs * pw[i] + pb[i];
      pm[r] = mu;
      pr[r] = rs;
    }
  });
  if (out != y.dtype()) y = y.to(out);
  return {y, mean, rstd};
}

std::vector<Tensor> CpuBackend::layer_norm_backward(const Tensor& dy_in, const Tensor& x, const Tensor& w,
                                                    const Tensor& mean, const Tensor& rstd, const Tensor& dx_into) {
  const Tensor dy = dy_in.dtype() == x.dtype() ? dy_in : dy_in.to(x.dtype());
  int64_t c = x.size(-1), rows = x.numel() / (c == 0 ? 1 : c);
  Tensor dx = Tensor::empty(x.shape(), x.dtype());
  Tensor dw = Tensor::empty(w.shape(), x.dtype()), db = Tensor::empty(w.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "layer_norm_backward", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>(), *pdy = dy.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
    T *pdx = dx.data<T>(), *pdw = dw.data<T>(), *pdb = db.data<T>();
#pragma omp parallel for if (rows * c > cpu::kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      const T *row = px + r * c, *g = pdy + r * c;
      T mu = pm[r], rs = pr[r];
      auto dxhat = [&](int64_t i) { return g[i] * pw[i]; };
      auto xhat = [&](int64_t i) { return (row[i] - mu) * rs; };
      const T mean_dxhat = cpu::lane_dot<T>(c, [&](int64_t i) { return g[i]; }, [&](int64_t i) { return pw[i]; }) /
                           static_cast<T>(c);
      const T mean_dxhat_xhat = cpu::lane_dot<T>(c, dxhat, xhat) / static_cast<T>(c);
      for (int64_t i = 0; i < c; ++i) {
        T xhat = (row[i] - mu) * rs;
        // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        pdx[r * c + i] = rs * (g[i] * pw[i] - mean_dxhat - xhat * mean_dxhat_xhat);
      }
    }
    // Parameter gradients: each channel sums over rows in row order. The threads take channels in
    // runs of kChannelRun and walk the rows once, a row's run a few vector operations (one channel
    // at a time, a chain of dependent adds down a column, took 4-6x as long).
    constexpr int64_t kChannelRun = 64;
    const int64_t runs = (c + kChannelRun - 1) / kChannelRun;
#pragma omp parallel for if (rows * c > cpu::kParallelGrain)
    for (int64_t run = 0; run < runs; ++run) {
      const int64_t i0 = run * kChannelRun, n = std::min(kChannelRun, c - i0);
      T sw[kChannelRun] = {}, sb[kChannelRun] = {};
      for (int64_t r = 0; r < rows; ++r) {
        const T *g = pdy + r * c + i0, *xr = px + r * c + i0;
        const T mu = pm[r], rs = pr[r];
        for (int64_t i = 0; i < n; ++i) {
          sw[i] = cpu::mul_add(g[i] * (xr[i] - mu), rs, sw[i]);  // d(weight) term: dy * xhat
          sb[i] += g[i];                                     // d(bias) term
        }
      }
      std::copy(sw, sw + n, pdw + i0);
      std::copy(sb, sb + n, pdb + i0);
    }
  });
  if (!dx_into.defined()) return {dx, dw, db};
  // Added in a pass of its own: the dx formula's last product and this sum must not become one
  // FMA (the engine's addition rounds dx first).
  Tensor sum = dx_into;
  cpu::dispatch_float(x.dtype(), "layer_norm_backward", [&]<typename T>() {
    T* ps = sum.data<T>();
    const T* pd = dx.data<T>();
    const int64_t n = x.numel();
#pragma omp parallel for if (n > cpu::kParallelGrain)
    for (int64_t i = 0; i < n; ++i) ps[i] = ps[i] + pd[i];
  });
  return {sum, dw, db};
}

Tensor CpuBackend::softmax(const Tensor& x) {
  int64_t c = x.size(-1), rows = x.numel() / (c == 0 ? 1 : c);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "softmax", [&]<typename T>() {
    const T* px = x.data<T>();
    T* py = y.data<T>();
#pragma omp parallel for if (rows * c > cpu::kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = px + r * c;
      T* out = py + r * c;
      const T mx = cpu::lane_max(row, c);
      cpu::exp_shifted(row, mx, out, c);
      const T sum = cpu::lane_sum(out, c);
      for (int64_t i = 0; i < c; ++i) out[i] /= sum;
    }
  });
  return y;
}

Tensor CpuBackend::softmax_backward(const Tensor& dy, const Tensor& y) {
  int64_t c = y.size(-1), rows = y.numel() / (c == 0 ? 1 : c);
  Tensor dx = Tensor::empty(y.shape(), y.dtype());
  cpu::dispatch_float(y.dtype(), "softmax_backward", [&]<typename T>() {
    const T *py = y.data<T>(), *pdy = dy.data<T>();
    T* pdx = dx.data<T>();
#pragma omp parallel for if (rows * c > cpu::kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      const T *g = pdy + r * c, *p = py + r * c;
      const T dot = cpu::lane_dot<T>(c, [g](int64_t i) { return g[i]; }, [p](int64_t i) { return p[i]; });
      for (int64_t i = 0; i < c; ++i) pdx[r * c + i] = py[r * c + i] * (pdy[r * c + i] - dot);
    }
  });
  return dx;
}

}  // namespace remat
