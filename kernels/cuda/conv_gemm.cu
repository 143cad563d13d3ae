// conv2d on CUDA: the choice between cuDNN and im2col + cuBLAS, the im2col path itself, and the
// bias kernels both paths share. Every sum runs in a fixed order (the column gather of dx walks
// the kernel window in order; dw is one GEMM over all images), so replays reproduce bits.
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/conv.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm.h"

namespace remat {

namespace {

using namespace cuda;

struct ConvShape {
  int64_t n, cin, h, w, cout, kh, kw, ho, wo;
  int stride, padding;
  __host__ __device__ int64_t k() const { return cin * kh * kw; }  // rows of the column matrix
  __host__ __device__ int64_t p() const { return ho * wo; }         // output positions of one image
};

ConvShape conv_shape(const Tensor& x, const Tensor& w, int stride, int padding) {
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3), 0, 0, stride, padding};
  s.ho = (s.h + 2 * padding - s.kh) / stride + 1;
  s.wo = (s.w + 2 * padding - s.kw) / stride + 1;
  return s;
}

Tensor workspace(const Shape& shape, DType dtype, Device device) {
  MemoryCategoryScope scope(MemoryCategory::workspace);
  return Tensor::empty(shape, dtype, device);
}

// Column entry (image i, row r = (c, a, b), position q = (oy, ox)) = x[i, c, oy*s-p+a, ox*s-p+b], zero
// in the padding; written at cols[i * image_stride + r * row_stride + q].
template <typename T>
__global__ void im2col_kernel(const T* x, T* cols, ConvShape s, int64_t image_stride, int64_t row_stride) {
  int64_t k = s.k(), p = s.p();
  REMAT_GRID_STRIDE(e, s.n * k * p) {
    int64_t q = e % p, r = (e / p) % k, i = e / (p * k);
    int64_t b = r % s.kw, a = (r / s.kw) % s.kh, c = r / (s.kw * s.kh);
    int64_t iy = (q / s.wo) * s.stride - s.padding + a, ix = (q % s.wo) * s.stride - s.padding + b;
    bool inside = iy >= 0 && iy < s.h && ix >= 0 && ix < s.w;
    cols[i * image_stride + r * row_stride + q] = inside ? x[((i * s.cin + c) * s.h + iy) * s.w + ix] : T(0);
  }
}

// The adjoint of im2col as a gather: each input pixel sums the column entries that read it, kernel
// rows then columns in order (no atomics). dcols is [N, K, P].
template <typename T>
__global__ void col2im_kernel(const T* dcols, T* dx, ConvShape s) {
  int64_t k = s.k(), p = s.p();
  REMAT_GRID_STRIDE(e, s.n * s.cin * s.h * s.w) {
    int64_t ix = e % s.w, iy = (e / s.w) % s.h, c = (e / (s.w * s.h)) % s.cin, i = e / (s.w * s.h * s.cin);
    Acc<T> sum = 0;
    for (int64_t a = 0; a < s.kh; ++a) {
      int64_t ty = iy + s.padding - a;  // = oy * stride
      if (ty < 0 || ty % s.stride != 0 || ty / s.stride >= s.ho) continue;
      for (int64_t b = 0; b < s.kw; ++b) {
        int64_t tx = ix + s.padding - b;
        if (tx < 0 || tx % s.stride != 0 || tx / s.stride >= s.wo) continue;
        int64_t r = (c * s.kh + a) * s.kw + b, q = (ty / s.stride) * s.wo + tx / s.stride;
        sum += load(dcols, (i * k + r) * p + q);
      }
    }
    dx[e] = cast_to<T>(sum);
  }
}

// [N, C, P] -> [C, N, P]: the output gradient with channels outermost, for dw as a single GEMM.
template <typename T>
__global__ void channels_first_kernel(const T* src, T* dst, int64_t n, int64_t c, int64_t p) {
  REMAT_GRID_STRIDE(e, n * c * p) {
    int64_t q = e % p, ch = (e / p) % c, i = e / (p * c);
    dst[(ch * n + i) * p + q] = src[e];
  }
}

template <typename T>
__global__ void add_channel_bias_kernel(T* y, const T* b, int64_t total, int64_t c, int64_t hw) {
  REMAT_GRID_STRIDE(i, total) y[i] = cast_to<T>(load(y, i) + load(b, (i / hw) % c));
}

// One block per output channel: db[o] = sum over images and positions of dy.
template <typename T>
__global__ void channel_sum_kernel(const T* dy, T* db, int64_t n, int64_t c, int64_t hw) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  Acc<T> s = 0;
  for (int64_t j = threadIdx.x; j < n * hw; j += blockDim.x) s += load(dy, ((j / hw) * c + blockIdx.x) * hw + j % hw);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) db[blockIdx.x] = cast_to<T>(s);
}

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
  Tensor cols = workspace({s.n, s.k(), s.p()}, x.dtype(), x.device());
  dispatch(x.dtype(), "conv2d", [&]<typename T>() {
    im2col_kernel<T><<<blocks_for(cols.numel()), kThreads>>>(x.data<T>(), cols.data<T>(), s, s.k() * s.p(), s.p());
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
    Tensor dcols = workspace({s.n, s.k(), s.p()}, x.dtype(), x.device());
    run_gemm({true, false, s.k(), s.p(), s.cout, w.raw_data(), s.k(), 0, dy.raw_data(), s.p(), s.cout * s.p(),
              dcols.raw_data(), s.k() * s.p(), s.n},
             x.dtype(), x.device().index);
    dispatch(x.dtype(), "conv2d_backward", [&]<typename T>() {
      col2im_kernel<T><<<blocks_for(x.numel()), kThreads>>>(dcols.data<T>(), dx.data<T>(), s);
    });
    REMAT_CUDA_LAUNCH_CHECK();
  }
  // d(weight): dw [Cout, K] = dy' [Cout, N*P] cols' [K, N*P]^T, images side by side in both.
  Tensor cols = workspace({s.k(), np}, x.dtype(), x.device()), dyc = workspace({s.cout, np}, x.dtype(), x.device());
  dispatch(x.dtype(), "conv2d_backward", [&]<typename T>() {
    im2col_kernel<T><<<blocks_for(cols.numel()), kThreads>>>(x.data<T>(), cols.data<T>(), s, s.p(), np);
    channels_first_kernel<T><<<blocks_for(dy.numel()), kThreads>>>(dy.data<T>(), dyc.data<T>(), s.n, s.cout, s.p());
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
      add_channel_bias_kernel<T><<<blocks_for(total), kThreads>>>(y.data<T>(), b.data<T>(), total, y.size(1),
                                                                  y.size(2) * y.size(3));
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
        channel_sum_kernel<T><<<static_cast<unsigned>(c), kThreads>>>(dy.data<T>(), db.data<T>(), n, c, hw);
      });
      REMAT_CUDA_LAUNCH_CHECK();
    }
  }
  return {dx, dw, db};
}

}  // namespace remat
