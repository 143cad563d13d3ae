// The flash attention kernels of attention.cu on CUDA cores (that file's head says what they do):
// the reference path. Kept apart so that tests/test_simt.cpp can also run them on the CPU under
// the SIMT emulator (tests/simt_emulator.h) against attention in double.
#pragma once

#include "kernels/cuda/cuda_common.cuh"

namespace remat::cuda::flash_attention {

#ifdef REMAT_SIMT_EMULATION
using std::exp;
using std::log;
using std::max;
using std::min;
#endif

constexpr int kRows = 64;  // query (or key) rows per block, one per thread

// Keys per shared tile: two tiles of kTile x D accumulators stay within 32 KiB for D = 128.
template <typename A> constexpr int kTile = sizeof(A) == 8 ? 16 : 32;

template <typename A, int DMAX>
__device__ __forceinline__ A dot_row(const A (&r)[DMAX], const A* tile_row, int d) {
  A s = 0;
#pragma unroll
  for (int e = 0; e < DMAX; ++e)
    if (e < d) s += r[e] * tile_row[e];
  return s;
}

template <typename T, int DMAX>
__device__ __forceinline__ void load_row(Acc<T> (&r)[DMAX], const T* p, int d, bool active) {
#pragma unroll
  for (int e = 0; e < DMAX; ++e) r[e] = (active && e < d) ? load(p, e) : Acc<T>(0);
}

template <typename T>
__device__ void stage_tile(Acc<T>* dst, const T* src, int64_t rows, int d) {
  for (int64_t i = threadIdx.x; i < rows * d; i += blockDim.x) dst[i] = load(src, i);
}

template <typename T, int DMAX>
__global__ void attention_forward_kernel(const T* q, const T* k, const T* v, T* o, Acc<T>* lse, int64_t t, int d,
                                         bool causal, Acc<T> scale) {
  using A = Acc<T>;
  constexpr int BC = kTile<A>;
  REMAT_DYNAMIC_SHARED(smem);
  A* ks = reinterpret_cast<A*>(smem);
  A* vs = ks + BC * d;
  int64_t head = blockIdx.y, base = head * t * d;
  int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  bool active = row < t;
  A qr[DMAX], acc[DMAX];
  load_row<T, DMAX>(qr, q + base + row * d, d, active);
#pragma unroll
  for (int e = 0; e < DMAX; ++e) acc[e] = 0;
  A m = -std::numeric_limits<A>::infinity(), l = 0;
  int64_t key_end = causal ? min(t, (blockIdx.x + 1) * static_cast<int64_t>(blockDim.x)) : t;
  for (int64_t kb = 0; kb < key_end; kb += BC) {
    int64_t nk = min(static_cast<int64_t>(BC), t - kb);
    stage_tile<T>(ks, k + base + kb * d, nk, d);
    stage_tile<T>(vs, v + base + kb * d, nk, d);
    __syncthreads();
    if (active) {
      A s[BC];
      A tile_max = -std::numeric_limits<A>::infinity();
#pragma unroll 1  // keys stay a loop: unrolling them multiplies the code by the tile
      for (int j = 0; j < BC; ++j) {
        bool visible = j < nk && !(causal && kb + j > row);
        s[j] = visible ? dot_row<A, DMAX>(qr, ks + j * d, d) * scale : -std::numeric_limits<A>::infinity();
        tile_max = max(tile_max, s[j]);
      }
      if (tile_max > -std::numeric_limits<A>::infinity()) {
        A m_new = max(m, tile_max), corr = exp(m - m_new);
        l *= corr;
#pragma unroll
        for (int e = 0; e < DMAX; ++e) acc[e] *= corr;
#pragma unroll 1  // keys stay a loop: unrolling them multiplies the code by the tile
        for (int j = 0; j < BC; ++j) {
          if (s[j] == -std::numeric_limits<A>::infinity()) continue;
          A p = exp(s[j] - m_new);
          l += p;
#pragma unroll
          for (int e = 0; e < DMAX; ++e)
            if (e < d) acc[e] += p * vs[j * d + e];
        }
        m = m_new;
      }
    }
    __syncthreads();
  }
  if (active) {
#pragma unroll
    for (int e = 0; e < DMAX; ++e)
      if (e < d) o[base + row * d + e] = cast_to<T>(acc[e] / l);
    lse[head * t + row] = m + log(l);
  }
}

// D_i = dO_i . O_i, the row term of the softmax backward.
template <typename T>
__global__ void attention_row_dot_kernel(const T* d_o, const T* o, Acc<T>* out, int64_t rows, int d) {
  REMAT_GRID_STRIDE(r, rows) {
    Acc<T> s = 0;
    for (int e = 0; e < d; ++e) s += load(d_o, r * d + e) * load(o, r * d + e);
    out[r] = s;
  }
}

template <typename T, int DMAX>
__global__ void attention_dq_kernel(const T* q, const T* k, const T* v, const T* d_o, const Acc<T>* lse,
                                    const Acc<T>* row_dot, T* dq, int64_t t, int d, bool causal, Acc<T> scale) {
  using A = Acc<T>;
  constexpr int BC = kTile<A>;
  REMAT_DYNAMIC_SHARED(smem);
  A* ks = reinterpret_cast<A*>(smem);
  A* vs = ks + BC * d;
  int64_t head = blockIdx.y, base = head * t * d;
  int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  bool active = row < t;
  A qr[DMAX], dor[DMAX], acc[DMAX];
  load_row<T, DMAX>(qr, q + base + row * d, d, active);
  load_row<T, DMAX>(dor, d_o + base + row * d, d, active);
#pragma unroll
  for (int e = 0; e < DMAX; ++e) acc[e] = 0;
  A L = active ? lse[head * t + row] : A(0), Di = active ? row_dot[head * t + row] : A(0);
  int64_t key_end = causal ? min(t, (blockIdx.x + 1) * static_cast<int64_t>(blockDim.x)) : t;
  for (int64_t kb = 0; kb < key_end; kb += BC) {
    int64_t nk = min(static_cast<int64_t>(BC), t - kb);
    stage_tile<T>(ks, k + base + kb * d, nk, d);
    stage_tile<T>(vs, v + base + kb * d, nk, d);
    __syncthreads();
    if (active) {
      for (int j = 0; j < nk; ++j) {
        if (causal && kb + j > row) break;
        A p = exp(dot_row<A, DMAX>(qr, ks + j * d, d) * scale - L);
        A ds = p * (dot_row<A, DMAX>(dor, vs + j * d, d) - Di) * scale;
#pragma unroll
        for (int e = 0; e < DMAX; ++e)
          if (e < d) acc[e] += ds * ks[j * d + e];
      }
    }
    __syncthreads();
  }
  if (active) {
#pragma unroll
    for (int e = 0; e < DMAX; ++e)
      if (e < d) dq[base + row * d + e] = cast_to<T>(acc[e]);
  }
}

template <typename T, int DMAX>
__global__ void attention_dkv_kernel(const T* q, const T* k, const T* v, const T* d_o, const Acc<T>* lse,
                                     const Acc<T>* row_dot, T* dk, T* dv, int64_t t, int d, bool causal, Acc<T> scale) {
  using A = Acc<T>;
  constexpr int BC = kTile<A>;
  REMAT_DYNAMIC_SHARED(smem);
  A* qs = reinterpret_cast<A*>(smem);
  A* dos = qs + BC * d;
  A* ls = dos + BC * d;
  A* ds_row = ls + BC;
  int64_t head = blockIdx.y, base = head * t * d;
  int64_t key = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  bool active = key < t;
  A kr[DMAX], vr[DMAX], dk_acc[DMAX], dv_acc[DMAX];
  load_row<T, DMAX>(kr, k + base + key * d, d, active);
  load_row<T, DMAX>(vr, v + base + key * d, d, active);
#pragma unroll
  for (int e = 0; e < DMAX; ++e) dk_acc[e] = 0, dv_acc[e] = 0;
  // Causal: queries before this block's first key see none of its keys.
  int64_t query_begin = causal ? blockIdx.x * static_cast<int64_t>(blockDim.x) : 0;
  for (int64_t qb = query_begin; qb < t; qb += BC) {
    int64_t nq = min(static_cast<int64_t>(BC), t - qb);
    stage_tile<T>(qs, q + base + qb * d, nq, d);
    stage_tile<T>(dos, d_o + base + qb * d, nq, d);
    for (int64_t i = threadIdx.x; i < nq; i += blockDim.x) {
      ls[i] = lse[head * t + qb + i];
      ds_row[i] = row_dot[head * t + qb + i];
    }
    __syncthreads();
    if (active) {
      for (int i = 0; i < nq; ++i) {
        if (causal && qb + i < key) continue;
        A p = exp(dot_row<A, DMAX>(kr, qs + i * d, d) * scale - ls[i]);
        A ds = p * (dot_row<A, DMAX>(vr, dos + i * d, d) - ds_row[i]) * scale;
#pragma unroll
        for (int e = 0; e < DMAX; ++e)
          if (e < d) {
            dv_acc[e] += p * dos[i * d + e];
            dk_acc[e] += ds * qs[i * d + e];
          }
      }
    }
    __syncthreads();
  }
  if (active) {
#pragma unroll
    for (int e = 0; e < DMAX; ++e)
      if (e < d) {
        dk[base + key * d + e] = cast_to<T>(dk_acc[e]);
        dv[base + key * d + e] = cast_to<T>(dv_acc[e]);
      }
  }
}

}  // namespace remat::cuda::flash_attention
