// CPU image ops: conv2d (im2col + Eigen GEMM), group_norm, nearest upsampling, average pooling,
// adaLN modulation and the sinusoidal timestep embedding. Images are [N, C, H, W].
#include <Eigen/Core>
#include <omp.h>

#include <cmath>

#include "kernels/cpu/cpu_backend.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct ConvShape {
  int64_t n, cin, h, w, cout, kh, kw, ho, wo;
};

ConvShape conv_shape(const Tensor& x, const Tensor& w, int stride, int padding) {
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3), 0, 0};
  s.ho = (s.h + 2 * padding - s.kh) / stride + 1;
  s.wo = (s.w + 2 * padding - s.kw) / stride + 1;
  return s;
}

// cols [cin * kh * kw, ho * wo] of one image; zero outside the padded border.
template <typename T>
void im2col(const T* x, const ConvShape& s, int stride, int padding, T* cols) {
  for (int64_t c = 0; c < s.cin; ++c)
    for (int64_t i = 0; i < s.kh; ++i)
      for (int64_t j = 0; j < s.kw; ++j) {
        T* row = cols + ((c * s.kh + i) * s.kw + j) * s.ho * s.wo;
        for (int64_t oy = 0; oy < s.ho; ++oy) {
          int64_t iy = oy * stride - padding + i;
          for (int64_t ox = 0; ox < s.wo; ++ox) {
            int64_t ix = ox * stride - padding + j;
            row[oy * s.wo + ox] = (iy >= 0 && iy < s.h && ix >= 0 && ix < s.w) ? x[(c * s.h + iy) * s.w + ix] : T(0);
          }
        }
      }
}

// The adjoint of im2col: adds each column entry back to the pixel it came from.
template <typename T>
void col2im(const T* cols, const ConvShape& s, int stride, int padding, T* x) {
  for (int64_t c = 0; c < s.cin; ++c)
    for (int64_t i = 0; i < s.kh; ++i)
      for (int64_t j = 0; j < s.kw; ++j) {
        const T* row = cols + ((c * s.kh + i) * s.kw + j) * s.ho * s.wo;
        for (int64_t oy = 0; oy < s.ho; ++oy) {
          int64_t iy = oy * stride - padding + i;
          if (iy < 0 || iy >= s.h) continue;
          for (int64_t ox = 0; ox < s.wo; ++ox) {
            int64_t ix = ox * stride - padding + j;
            if (ix >= 0 && ix < s.w) x[(c * s.h + iy) * s.w + ix] += row[oy * s.wo + ox];
          }
        }
      }
}

}  // namespace

Tensor CpuBackend::conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) {
  ConvShape s = conv_shape(x, w, stride, padding);
  Tensor y = Tensor::empty({s.n, s.cout, s.ho, s.wo}, x.dtype());
  cpu::dispatch_float(x.dtype(), "conv2d", [&]<typename T>() {
    int64_t k = s.cin * s.kh * s.kw, p = s.ho * s.wo;
    Eigen::Map<const Mat<T>> W(w.data<T>(), s.cout, k);
    // Column buffers for every thread, allocated before the parallel loop: an allocation that fails
    // is then an ordinary error, never one thrown inside a parallel region (which terminates).
    Tensor scratch = empty_workspace({static_cast<int64_t>(omp_get_max_threads()), k, p}, x.dtype());
#pragma omp parallel for if (s.n * s.cout * p * k > cpu::kParallelGrain)
    for (int64_t n = 0; n < s.n; ++n) {
      T* cols = scratch.data<T>() + omp_get_thread_num() * k * p;
      im2col(x.data<T>() + n * s.cin * s.h * s.w, s, stride, padding, cols);
      Eigen::Map<Mat<T>> Y(y.data<T>() + n * s.cout * p, s.cout, p);
      Y.noalias() = W * Eigen::Map<const Mat<T>>(cols, k, p);
      if (b.defined())
        for (int64_t o = 0; o < s.cout; ++o) Y.row(o).array() += b.data<T>()[o];
    }
  });
  return y;
}

std::vector<Tensor> CpuBackend::conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                                int padding, bool has_bias) {
  ConvShape s = conv_shape(x, w, stride, padding);
  Tensor dx = Tensor::zeros(x.shape(), x.dtype()), dw = Tensor::zeros(w.shape(), x.dtype());
  Tensor db = has_bias ? Tensor::zeros({s.cout}, x.dtype()) : Tensor();
  cpu::dispatch_float(x.dtype(), "conv2d_backward", [&]<typename T>() {
    int64_t k = s.cin * s.kh * s.kw, p = s.ho * s.wo;
    Eigen::Map<const Mat<T>> W(w.data<T>(), s.cout, k);
    Eigen::Map<Mat<T>> dW(dw.data<T>(), s.cout, k);
    Tensor cols = empty_workspace({k, p}, x.dtype()), dcols = empty_workspace({k, p}, x.dtype());
    // Images in order, so dW and db sum in a fixed order; each GEMM is threaded by Eigen.
    for (int64_t n = 0; n < s.n; ++n) {
      Eigen::Map<const Mat<T>> dY(dy.data<T>() + n * s.cout * p, s.cout, p);
      im2col(x.data<T>() + n * s.cin * s.h * s.w, s, stride, padding, cols.data<T>());
      dW.noalias() += dY * Eigen::Map<const Mat<T>>(cols.data<T>(), k, p).transpose();  // d(weight) term
      Eigen::Map<Mat<T>>(dcols.data<T>(), k, p).noalias() = W.transpose() * dY;          // d(input) columns
      col2im(dcols.data<T>(), s, stride, padding, dx.data<T>() + n * s.cin * s.h * s.w);
      if (has_bias)
        for (int64_t o = 0; o < s.cout; ++o) db.data<T>()[o] += dY.row(o).sum();  // d(bias) term
    }
  });
  return {dx, dw, db};
}

std::vector<Tensor> CpuBackend::group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, double eps) {
  int64_t n = x.size(0), c = x.size(1);
  // An empty batch (or empty images): nothing to normalise, statistics 0.
  if (x.numel() == 0) return {Tensor::empty(x.shape(), x.dtype()), Tensor::zeros({n, groups}, x.dtype()),
                              Tensor::zeros({n, groups}, x.dtype())};
  int64_t hw = x.numel() / (n * c), cg = c / groups, m = cg * hw;
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Tensor mean = Tensor::empty({n, groups}, x.dtype()), rstd = Tensor::empty({n, groups}, x.dtype());
  cpu::dispatch_float(x.dtype(), "group_norm", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>(), *pb = b.data<T>();
    T *py = y.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t ng = 0; ng < n * groups; ++ng) {
      const T* g = px + ng * m;  // a group's channels are contiguous in [N, C, H, W]
      T sum = 0;
      for (int64_t i = 0; i < m; ++i) sum += g[i];
      T mu = sum / static_cast<T>(m), var = 0;
      for (int64_t i = 0; i < m; ++i) var += (g[i] - mu) * (g[i] - mu);
      T rs = T(1) / std::sqrt(var / static_cast<T>(m) + static_cast<T>(eps));
      int64_t c0 = (ng % groups) * cg;
      for (int64_t i = 0; i < m; ++i) {
        int64_t ch = c0 + i / hw;
        py[ng * m + i] = (g[i] - mu) * rs * pw[ch] + pb[ch];
      }
      pm[ng] = mu;
      pr[ng] = rs;
    }
  });
  return {y, mean, rstd};
}

std::vector<Tensor> CpuBackend::group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                    const Tensor& mean, const Tensor& rstd, int groups) {
  int64_t n = x.size(0), c = x.size(1);
  if (x.numel() == 0) return {Tensor::empty(x.shape(), x.dtype()), Tensor::zeros({c}, x.dtype()), Tensor::zeros({c}, x.dtype())};
  int64_t hw = x.numel() / (n * c), cg = c / groups, m = cg * hw;
  Tensor dx = Tensor::empty(x.shape(), x.dtype()), dw = Tensor::empty({c}, x.dtype()), db = Tensor::empty({c}, x.dtype());
  cpu::dispatch_float(x.dtype(), "group_norm_backward", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>(), *pdy = dy.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
    T *pdx = dx.data<T>(), *pdw = dw.data<T>(), *pdb = db.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t ng = 0; ng < n * groups; ++ng) {
      int64_t c0 = (ng % groups) * cg;
      T mu = pm[ng], rs = pr[ng], mean_d = 0, mean_dx = 0;
      for (int64_t i = 0; i < m; ++i) {
        T xhat = (px[ng * m + i] - mu) * rs, d = pdy[ng * m + i] * pw[c0 + i / hw];
        mean_d += d;
        mean_dx += d * xhat;
      }
      mean_d /= static_cast<T>(m);
      mean_dx /= static_cast<T>(m);
      for (int64_t i = 0; i < m; ++i) {
        T xhat = (px[ng * m + i] - mu) * rs, d = pdy[ng * m + i] * pw[c0 + i / hw];
        pdx[ng * m + i] = rs * (d - mean_d - xhat * mean_dx);  // as layer_norm, over the group
      }
    }
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t ch = 0; ch < c; ++ch) {
      int64_t g = ch / cg;
      T sw = 0, sb = 0;
      for (int64_t b = 0; b < n; ++b)
        for (int64_t i = 0; i < hw; ++i) {
          int64_t at = (b * c + ch) * hw + i;
          sw += pdy[at] * (px[at] - pm[b * groups + g]) * pr[b * groups + g];  // d(weight) term
          sb += pdy[at];                                                      // d(bias) term
        }
      pdw[ch] = sw;
      pdb[ch] = sb;
    }
  });
  return {dx, dw, db};
}

Tensor CpuBackend::upsample_nearest(const Tensor& x, int f) {
  int64_t nc = x.size(0) * x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({x.size(0), x.size(1), h * f, w * f}, x.dtype());
  cpu::dispatch_float(x.dtype(), "upsample_nearest", [&]<typename T>() {
    const T* px = x.data<T>();
    T* py = y.data<T>();
#pragma omp parallel for if (y.numel() > cpu::kParallelGrain)
    for (int64_t p = 0; p < nc; ++p)
      for (int64_t i = 0; i < h * f; ++i)
        for (int64_t j = 0; j < w * f; ++j) py[(p * h * f + i) * w * f + j] = px[(p * h + i / f) * w + j / f];
  });
  return y;
}

Tensor CpuBackend::upsample_nearest_backward(const Tensor& dy, int f) {
  int64_t nc = dy.size(0) * dy.size(1), h = dy.size(2) / f, w = dy.size(3) / f;
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), h, w}, dy.dtype());
  cpu::dispatch_float(dy.dtype(), "upsample_nearest_backward", [&]<typename T>() {
    const T* pdy = dy.data<T>();
    T* pdx = dx.data<T>();
#pragma omp parallel for if (dy.numel() > cpu::kParallelGrain)
    for (int64_t p = 0; p < nc; ++p)
      for (int64_t i = 0; i < h; ++i)
        for (int64_t j = 0; j < w; ++j) {
          T s = 0;
          for (int a = 0; a < f; ++a)
            for (int b = 0; b < f; ++b) s += pdy[(p * h * f + i * f + a) * w * f + j * f + b];
          pdx[(p * h + i) * w + j] = s;
        }
  });
  return dx;
}

Tensor CpuBackend::avg_pool(const Tensor& x, int f) {
  int64_t nc = x.size(0) * x.size(1), h = x.size(2) / f, w = x.size(3) / f;
  Tensor y = Tensor::empty({x.size(0), x.size(1), h, w}, x.dtype());
  cpu::dispatch_float(x.dtype(), "avg_pool", [&]<typename T>() {
    const T* px = x.data<T>();
    T* py = y.data<T>();
    T inv = T(1) / static_cast<T>(f * f);
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t p = 0; p < nc; ++p)
      for (int64_t i = 0; i < h; ++i)
        for (int64_t j = 0; j < w; ++j) {
          T s = 0;
          for (int a = 0; a < f; ++a)
            for (int b = 0; b < f; ++b) s += px[(p * h * f + i * f + a) * w * f + j * f + b];
          py[(p * h + i) * w + j] = s * inv;
        }
  });
  return y;
}

Tensor CpuBackend::avg_pool_backward(const Tensor& dy, int f) {
  int64_t nc = dy.size(0) * dy.size(1), h = dy.size(2), w = dy.size(3);
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), h * f, w * f}, dy.dtype());
  cpu::dispatch_float(dy.dtype(), "avg_pool_backward", [&]<typename T>() {
    const T* pdy = dy.data<T>();
    T* pdx = dx.data<T>();
    T inv = T(1) / static_cast<T>(f * f);
#pragma omp parallel for if (dx.numel() > cpu::kParallelGrain)
    for (int64_t p = 0; p < nc; ++p)
      for (int64_t i = 0; i < h * f; ++i)
        for (int64_t j = 0; j < w * f; ++j) pdx[(p * h * f + i) * w * f + j] = pdy[(p * h + i / f) * w + j / f] * inv;
  });
  return dx;
}

Tensor CpuBackend::modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  int64_t b = x.size(0), t = x.size(1), c = x.size(2);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "modulate", [&]<typename T>() {
    const T *px = x.data<T>(), *psh = shift.data<T>(), *psc = scale.data<T>();
    T* py = y.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t r = 0; r < b * t; ++r) {
      int64_t bi = r / t;
      for (int64_t k = 0; k < c; ++k) py[r * c + k] = px[r * c + k] * (T(1) + psc[bi * c + k]) + psh[bi * c + k];
    }
  });
  return y;
}

std::vector<Tensor> CpuBackend::modulate_backward(const Tensor& dy, const Tensor& x, const Tensor& scale) {
  int64_t b = x.size(0), t = x.size(1), c = x.size(2);
  Tensor dx = Tensor::empty(x.shape(), x.dtype()), dshift = Tensor::empty({b, c}, x.dtype()),
         dscale = Tensor::empty({b, c}, x.dtype());
  cpu::dispatch_float(x.dtype(), "modulate_backward", [&]<typename T>() {
    const T *pdy = dy.data<T>(), *px = x.data<T>(), *psc = scale.data<T>();
    T *pdx = dx.data<T>(), *pdsh = dshift.data<T>(), *pdsc = dscale.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t k = 0; k < c; ++k) {
        T sh = 0, sc = 0;
        for (int64_t i = 0; i < t; ++i) {
          int64_t at = (bi * t + i) * c + k;
          pdx[at] = pdy[at] * (T(1) + psc[bi * c + k]);  // d(x) term
          sh += pdy[at];                                 // d(shift) term
          sc += pdy[at] * px[at];                        // d(scale) term
        }
        pdsh[bi * c + k] = sh;
        pdsc[bi * c + k] = sc;
      }
  });
  return {dx, dshift, dscale};
}

Tensor CpuBackend::timestep_embedding(const Tensor& t, int dim, double max_period) {
  int64_t b = t.size(0), half = dim / 2;
  Tensor y = Tensor::empty({b, static_cast<int64_t>(dim)}, t.dtype());
  cpu::dispatch_float(t.dtype(), "timestep_embedding", [&]<typename T>() {
    const T* pt = t.data<T>();
    T* py = y.data<T>();
    for (int64_t i = 0; i < b; ++i)
      for (int64_t k = 0; k < half; ++k) {
        T f = static_cast<T>(std::exp(-std::log(max_period) * static_cast<double>(k) / static_cast<double>(half)));
        py[i * dim + k] = std::cos(pt[i] * f);
        py[i * dim + half + k] = std::sin(pt[i] * f);
      }
  });
  return y;
}

Tensor CpuBackend::timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) {
  int64_t b = t.size(0), half = dim / 2;
  Tensor dt = Tensor::empty({b}, t.dtype());
  cpu::dispatch_float(t.dtype(), "timestep_embedding_backward", [&]<typename T>() {
    const T *pt = t.data<T>(), *pdy = dy.data<T>();
    T* pdt = dt.data<T>();
    for (int64_t i = 0; i < b; ++i) {
      T s = 0;
      for (int64_t k = 0; k < half; ++k) {
        T f = static_cast<T>(std::exp(-std::log(max_period) * static_cast<double>(k) / static_cast<double>(half)));
        s += -pdy[i * dim + k] * std::sin(pt[i] * f) * f + pdy[i * dim + half + k] * std::cos(pt[i] * f) * f;
      }
      pdt[i] = s;
    }
  });
  return dt;
}

}  // namespace remat
