// CUDA image and conditioning ops: nearest upsampling, average pooling, adaLN modulation and the
// sinusoidal timestep embedding. One thread per output; sums run in the CPU's order (the kernels:
// image_kernels.cuh).
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/image_kernels.cuh"

namespace remat {

using namespace cuda;
using namespace cuda::image_kernels;

Tensor CudaBackend::upsample_nearest(const Tensor& x, int f) {
  set_device_of(x);
  int64_t h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({x.size(0), x.size(1), h * f, w * f}, x.dtype(), x.device());
  int64_t total = y.numel();
  dispatch(x.dtype(), "upsample_nearest", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(total), kThreads, 0, upsample_kernel<T>)(x.data<T>(), y.data<T>(), total, h, w, f);
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
    REMAT_LAUNCH(blocks_for(total), kThreads, 0, window_sum_kernel<T>)(
        dy.data<T>(), dx.data<T>(), total, h, w, f, Acc<T>(1));
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
    REMAT_LAUNCH(blocks_for(total), kThreads, 0, window_sum_kernel<T>)(x.data<T>(), y.data<T>(), total, h, w, f, inv);
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
    REMAT_LAUNCH(blocks_for(total), kThreads, 0, spread_kernel<T>)(dy.data<T>(), dx.data<T>(), total, h, w, f, inv);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

Tensor CudaBackend::modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t total = x.numel();
  dispatch(x.dtype(), "modulate", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(total), kThreads, 0, modulate_kernel<T>)(
        x.data<T>(), shift.data<T>(), scale.data<T>(), y.data<T>(), total, x.size(1), x.size(2));
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
    REMAT_LAUNCH(blocks_for(b * c), kThreads, 0, modulate_backward_kernel<T>)(
        dy.data<T>(), x.data<T>(), scale.data<T>(), dx.data<T>(), dshift.data<T>(), dscale.data<T>(), b, t, c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dx, dshift, dscale};
}

Tensor CudaBackend::timestep_embedding(const Tensor& t, int dim, double max_period) {
  set_device_of(t);
  int64_t b = t.size(0), half = dim / 2;
  Tensor y = Tensor::empty({b, static_cast<int64_t>(dim)}, t.dtype(), t.device());
  dispatch(t.dtype(), "timestep_embedding", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(b * half), kThreads, 0, timestep_kernel<T>)(
        t.data<T>(), y.data<T>(), b, half, dim, max_period);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) {
  set_device_of(t);
  int64_t b = t.size(0), half = dim / 2;
  Tensor dt = Tensor::empty({b}, t.dtype(), t.device());
  dispatch(t.dtype(), "timestep_embedding_backward", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(b), kThreads, 0, timestep_backward_kernel<T>)(
        t.data<T>(), dy.data<T>(), dt.data<T>(), b, half, dim, max_period);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dt;
}

}  // namespace remat
