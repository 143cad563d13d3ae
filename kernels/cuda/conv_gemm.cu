// conv2d on CUDA: the choice between cuDNN and im2col + cuBLAS, the im2col path itself, and the
// bias kernels both paths share. Every sum runs in a fixed order (the column gather of dx walks
// the kernel window in order; dw is one GEMM over all images), so replays reproduce bits.
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/conv.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/conv_kernels.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

using namespace cuda;
using namespace cuda::conv_kernels;

// REMAT_CUDA_CONV=gemm sends every convolution down the im2col path (to test it on a machine
// whose cuDNN would take them).
bool gemm_forced() {
  const char* v = std::getenv("REMAT_CUDA_CONV");
  return v != nullptr && std::strcmp(v, "gemm") == 0;
}

}  // namespace

namespace cuda {

Tensor conv2d_gemm(const Tensor& x, const Tensor& w, int stride, int padding) {
  ConvShape s = conv_shape(x, w, stride, padding);
  if (s.k() == 0) return Tensor::zeros({s.n, s.cout, s.ho, s.wo}, x.dtype(), x.device());
  Tensor y = Tensor::empty({s.n, s.cout, s.ho, s.wo}, x.dtype(), x.device());
  if (y.numel() == 0) return y;
  Tensor cols = empty_workspace({s.n, s.k(), s.p()}, x.dtype(), x.device());
  dispatch(x.dtype(), "conv2d", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(cols.numel()), kThreads, 0, im2col_kernel<T>)(
        x.data<T>(), cols.data<T>(), s, s.k() * s.p(), s.p());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  // y[i] [Cout, P] = W [Cout, K] cols[i] [K, P], W shared by the batch.
  run_gemm({false, false, s.cout, s.p(), s.k(), w.raw_data(), s.k(), 0, cols.raw_data(), s.p(), s.k() * s.p(),
            y.raw_data(), s.cout * s.p(), s.n},
           x.dtype(), x.device().index);
  return y;
}

std::pair<Tensor, Tensor> conv2d_backward_gemm(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                               int padding) {
  ConvShape s = conv_shape(x, w, stride, padding);
  Tensor dx = Tensor::zeros(x.shape(), x.dtype(), x.device()), dw = Tensor::zeros(w.shape(), x.dtype(), x.device());
  if (dy.numel() == 0 || s.k() == 0) return {dx, dw};
  int64_t np = s.n * s.p();
  {
    // d(input): dcols[i] [K, P] = W^T dy[i], gathered back onto the pixels.
    Tensor dcols = empty_workspace({s.n, s.k(), s.p()}, x.dtype(), x.device());
    run_gemm({true, false, s.k(), s.p(), s.cout, w.raw_data(), s.k(), 0, dy.raw_data(), s.p(), s.cout * s.p(),
              dcols.raw_data(), s.k() * s.p(), s.n},
             x.dtype(), x.device().index);
    dispatch(x.dtype(), "conv2d_backward", [&]<typename T>() {
      REMAT_LAUNCH(blocks_for(x.numel()), kThreads, 0, col2im_kernel<T>)(dcols.data<T>(), dx.data<T>(), s);
    });
    REMAT_CUDA_LAUNCH_CHECK();
  }
  // d(weight): dw [Cout, K] = dy' [Cout, N*P] cols' [K, N*P]^T, images side by side in both.
  Tensor cols = empty_workspace({s.k(), np}, x.dtype(), x.device());
  Tensor dyc = empty_workspace({s.cout, np}, x.dtype(), x.device());
  dispatch(x.dtype(), "conv2d_backward", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(cols.numel()), kThreads, 0, im2col_kernel<T>)(x.data<T>(), cols.data<T>(), s, s.p(), np);
    REMAT_LAUNCH(blocks_for(dy.numel()), kThreads, 0, channels_first_kernel<T>)(
        dy.data<T>(), dyc.data<T>(), s.n, s.cout, s.p());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  run_gemm({false, true, s.cout, s.k(), np, dyc.raw_data(), np, 0, cols.raw_data(), np, 0, dw.raw_data(), 0, 1},
           x.dtype(), x.device().index);
  return {dx, dw};
}

}  // namespace cuda

Tensor CudaBackend::conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) {
  set_device_of(x);
  std::optional<Tensor> done;
#ifdef REMAT_HAVE_CUDNN
  if (!gemm_forced()) done = conv2d_cudnn(x, w, stride, padding);
#endif
  Tensor y = done ? *done : conv2d_gemm(x, w, stride, padding);
  if (b.defined() && y.numel() > 0) {
    int64_t total = y.numel();
    dispatch(x.dtype(), "conv2d", [&]<typename T>() {
      REMAT_LAUNCH(blocks_for(total), kThreads, 0, add_channel_bias_kernel<T>)(
          y.data<T>(), b.data<T>(), total, y.size(1), y.size(2) * y.size(3));
    });
    REMAT_CUDA_LAUNCH_CHECK();
  }
  return y;
}

std::vector<Tensor> CudaBackend::conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                                 int padding, bool has_bias) {
  set_device_of(x);
  std::optional<std::pair<Tensor, Tensor>> done;
#ifdef REMAT_HAVE_CUDNN
  if (!gemm_forced() && dy.numel() > 0) done = conv2d_backward_cudnn(dy, x, w, stride, padding);
#endif
  auto [dx, dw] = done ? *done : conv2d_backward_gemm(dy, x, w, stride, padding);
  Tensor db;
  if (has_bias) {
    int64_t n = dy.size(0), c = dy.size(1), hw = dy.size(2) * dy.size(3);
    db = Tensor::zeros({c}, x.dtype(), x.device());
    if (c > 0 && n * hw > 0) {
      dispatch(x.dtype(), "conv2d_backward", [&]<typename T>() {
        REMAT_LAUNCH(static_cast<unsigned>(c), kThreads, 0, channel_sum_kernel<T>)(
            dy.data<T>(), db.data<T>(), n, c, hw);
      });
      REMAT_CUDA_LAUNCH_CHECK();
    }
  }
  return {dx, dw, db};
}

}  // namespace remat
