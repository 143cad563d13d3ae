// The kernels of the im2col convolution (conv_gemm.cu): the column matrix and its adjoint as a
// gather, the output gradient with channels outermost (for dw as one GEMM), and the bias kernels
// that the cuDNN path shares. Kept apart so that tests/test_simt_ops.cpp can also run them on the
// CPU under the SIMT emulator (tests/simt_emulator.h), with the GEMMs done on the host.
#pragma once

#include "kernels/cuda/cuda_common.cuh"

namespace remat::cuda::conv_kernels {

struct ConvShape {
  int64_t n, cin, h, w, cout, kh, kw, ho, wo;
  int stride, padding;
  __host__ __device__ int64_t k() const { return cin * kh * kw; }  // rows of the column matrix
  __host__ __device__ int64_t p() const { return ho * wo; }         // output positions of one image
};

inline ConvShape conv_shape(const Tensor& x, const Tensor& w, int stride, int padding) {
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3), 0, 0, stride, padding};
  s.ho = (s.h + 2 * padding - s.kh) / stride + 1;
  s.wo = (s.w + 2 * padding - s.kw) / stride + 1;
  return s;
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

}  // namespace remat::cuda::conv_kernels
