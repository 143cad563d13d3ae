// The image and conditioning kernels of image_ops.cu: nearest upsampling, window sums (average
// pooling and the upsampling's backward), adaLN modulation and the sinusoidal timestep embedding,
// one thread per output, sums in the CPU's order. Kept apart so that tests/test_simt_ops.cpp can
// also run them on the CPU under the SIMT emulator (tests/simt_emulator.h).
#pragma once

#include "kernels/cuda/cuda_common.cuh"

namespace remat::cuda::image_kernels {

#ifdef REMAT_SIMT_EMULATION
using std::cos;
using std::exp;
using std::log;
using std::sin;
#endif

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

}  // namespace remat::cuda::image_kernels
