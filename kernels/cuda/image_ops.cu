// CUDA image and conditioning ops: nearest upsampling, average pooling, adaLN modulation and the
// sinusoidal timestep embedding. One thread per output; sums run in the CPU's order.
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace remat {

namespace {

using namespace cuda;

template <typename T>
__global__ void upsample_kernel(const T* x, T* y, int64_t total, int64_t h, int64_t w, int f) {
  REMAT_GRID_STRIDE(i, total) {
    int64_t j = i % (w * f), r = (i / (w * f)) % (h * f), p = i / (w * f * h * f);
    y[i] = x[(p * h + r / f) * w + j / f];
  }
}

// Sums each f x f window of `x` ([.., h * f, w * f]) into one output, times `scale`.
template <typename T>
__global__ void window_sum_kernel(const T* x, T* y, int64_t total, int64_t h, int64_t w, int f, Acc<T> scale) {
  REMAT_GRID_STRIDE(i, total) {
    int64_t j = i % w, r = (i / w) % h, p = i / (w * h);
    Acc<T> s = 0;
    for (int a = 0; a < f; ++a)
      for (int b = 0; b < f; ++b) s += load(x, (p * h * f + r * f + a) * w * f + j * f + b);
    y[i] = cast_to<T>(s * scale);
  }
}

template <typename T>
__global__ void spread_kernel(const T* dy, T* dx, int64_t total, int64_t h, int64_t w, int f, Acc<T> scale) {
  REMAT_GRID_STRIDE(i, total) {
    int64_t j = i % (w * f), r = (i / (w * f)) % (h * f), p = i / (w * f * h * f);
    dx[i] = cast_to<T>(load(dy, (p * h + r / f) * w + j / f) * scale);
  }
}

template <typename T>
__global__ void modulate_kernel(const T* x, const T* shift, const T* scale, T* y, int64_t total, int64_t t, int64_t c) {
  REMAT_GRID_STRIDE(i, total) {
    int64_t k = i % c, b = i / (t * c);
    y[i] = cast_to<T>(load(x, i) * (Acc<T>(1) + load(scale, b * c + k)) + load(shift, b * c + k));
  }
}

// One thread per (batch, channel): walks the tokens in order for dshift and dscale.
template <typename T>
__global__ void modulate_backward_kernel(const T* dy, const T* x, const T* scale, T* dx, T* dshift, T* dscale,
                                         int64_t b, int64_t t, int64_t c) {
  REMAT_GRID_STRIDE(bc, b * c) {
    int64_t bi = bc / c, k = bc % c;
    Acc<T> one_plus = Acc<T>(1) + load(scale, bc), sh = 0, sc = 0;
    for (int64_t i = 0; i < t; ++i) {
      int64_t at = (bi * t + i) * c + k;
      Acc<T> g = load(dy, at);
      dx[at] = cast_to<T>(g * one_plus);
      sh += g;
      sc += g * load(x, at);
    }
    dshift[bc] = cast_to<T>(sh);
    dscale[bc] = cast_to<T>(sc);
  }
}

// Frequencies f_k = max_period^(-k / half), computed in f64 as on the CPU.
__device__ __forceinline__ double frequency(int64_t k, int64_t half, double max_period) {
  return exp(-log(max_period) * static_cast<double>(k) / static_cast<double>(half));
}

template <typename T>
__global__ void timestep_kernel(const T* t, T* y, int64_t b, int64_t half, int dim, double max_period) {
  REMAT_GRID_STRIDE(i, b * half) {
    int64_t row = i / half, k = i % half;
    Acc<T> f = static_cast<Acc<T>>(frequency(k, half, max_period)), arg = load(t, row) * f;
    y[row * dim + k] = cast_to<T>(cos(arg));
    y[row * dim + half + k] = cast_to<T>(sin(arg));
  }
}

template <typename T>
__global__ void timestep_backward_kernel(const T* t, const T* dy, T* dt, int64_t b, int64_t half, int dim,
                                         double max_period) {
  REMAT_GRID_STRIDE(row, b) {
    Acc<T> s = 0;
    for (int64_t k = 0; k < half; ++k) {
      Acc<T> f = static_cast<Acc<T>>(frequency(k, half, max_period)), arg = load(t, row) * f;
      s += -load(dy, row * dim + k) * sin(arg) * f + load(dy, row * dim + half + k) * cos(arg) * f;
    }
    dt[row] = cast_to<T>(s);
  }
}

}  // namespace

Tensor CudaBackend::upsample_nearest(const Tensor& x, int f) {
  set_device_of(x);
  int64_t h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({x.size(0), x.size(1), h * f, w * f}, x.dtype(), x.device());
  int64_t total = y.numel();
  dispatch(x.dtype(), "upsample_nearest", [&]<typename T>() {
    upsample_kernel<T><<<blocks_for(total), kThreads>>>(x.data<T>(), y.data<T>(), total, h, w, f);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::upsample_nearest_backward(const Tensor& dy, int f) {
  set_device_of(dy);
  int64_t h = dy.size(2) / f, w = dy.size(3) / f;
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), h, w}, dy.dtype(), dy.device());
  int64_t total = dx.numel();
  dispatch(dy.dtype(), "upsample_nearest_backward", [&]<typename T>() {
    window_sum_kernel<T><<<blocks_for(total), kThreads>>>(dy.data<T>(), dx.data<T>(), total, h, w, f, Acc<T>(1));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

Tensor CudaBackend::avg_pool(const Tensor& x, int f) {
  set_device_of(x);
  int64_t h = x.size(2) / f, w = x.size(3) / f;
  Tensor y = Tensor::empty({x.size(0), x.size(1), h, w}, x.dtype(), x.device());
  int64_t total = y.numel();
  dispatch(x.dtype(), "avg_pool", [&]<typename T>() {
    Acc<T> inv = Acc<T>(1) / static_cast<Acc<T>>(f * f);
    window_sum_kernel<T><<<blocks_for(total), kThreads>>>(x.data<T>(), y.data<T>(), total, h, w, f, inv);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::avg_pool_backward(const Tensor& dy, int f) {
  set_device_of(dy);
  int64_t h = dy.size(2), w = dy.size(3);
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), h * f, w * f}, dy.dtype(), dy.device());
  int64_t total = dx.numel();
  dispatch(dy.dtype(), "avg_pool_backward", [&]<typename T>() {
    Acc<T> inv = Acc<T>(1) / static_cast<Acc<T>>(f * f);
    spread_kernel<T><<<blocks_for(total), kThreads>>>(dy.data<T>(), dx.data<T>(), total, h, w, f, inv);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

Tensor CudaBackend::modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t total = x.numel();
  dispatch(x.dtype(), "modulate", [&]<typename T>() {
    modulate_kernel<T><<<blocks_for(total), kThreads>>>(x.data<T>(), shift.data<T>(), scale.data<T>(), y.data<T>(),
                                                        total, x.size(1), x.size(2));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

std::vector<Tensor> CudaBackend::modulate_backward(const Tensor& dy, const Tensor& x, const Tensor& scale) {
  set_device_of(x);
  int64_t b = x.size(0), t = x.size(1), c = x.size(2);
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device()), dshift = Tensor::empty({b, c}, x.dtype(), x.device()),
         dscale = Tensor::empty({b, c}, x.dtype(), x.device());
  dispatch(x.dtype(), "modulate_backward", [&]<typename T>() {
    modulate_backward_kernel<T><<<blocks_for(b * c), kThreads>>>(dy.data<T>(), x.data<T>(), scale.data<T>(), dx.data<T>(),
                                                                 dshift.data<T>(), dscale.data<T>(), b, t, c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dx, dshift, dscale};
}

Tensor CudaBackend::timestep_embedding(const Tensor& t, int dim, double max_period) {
  set_device_of(t);
  int64_t b = t.size(0), half = dim / 2;
  Tensor y = Tensor::empty({b, static_cast<int64_t>(dim)}, t.dtype(), t.device());
  dispatch(t.dtype(), "timestep_embedding", [&]<typename T>() {
    timestep_kernel<T><<<blocks_for(b * half), kThreads>>>(t.data<T>(), y.data<T>(), b, half, dim, max_period);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) {
  set_device_of(t);
  int64_t b = t.size(0), half = dim / 2;
  Tensor dt = Tensor::empty({b}, t.dtype(), t.device());
  dispatch(t.dtype(), "timestep_embedding_backward", [&]<typename T>() {
    timestep_backward_kernel<T><<<blocks_for(b), kThreads>>>(t.data<T>(), dy.data<T>(), dt.data<T>(), b, half, dim,
                                                             max_period);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dt;
}

}  // namespace remat
