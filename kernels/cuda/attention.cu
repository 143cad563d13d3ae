// CUDA fused scaled dot-product attention, q/k/v [B, H, T, D] with D <= 128, flash style: key and
// value tiles are staged in shared memory, each thread owns one query row with an online softmax,
// and only the row log-sum-exp is saved. The backward rebuilds probabilities from it in two
// passes, dq by query rows and dk/dv by key rows, so no gradient is ever summed with atomics. With
// set_cuda_attention(gemm) (REMAT_CUDA_ATTENTION=gemm) both go through cuBLAS (attention_gemm.cu).
#include "kernels/cuda/attention_gemm.h"
#include "kernels/cuda/attention_mma.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "runtime/cuda_devices.h"

namespace remat {

namespace {

using namespace cuda;

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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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
  extern __shared__ __align__(16) unsigned char smem[];
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

// Runs f.template operator()<DMAX>() with the smallest register width that holds the head dim.
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  REMAT_CHECK(d >= 1 && d <= 128, "attention: the cuda kernel handles head dims 1..128, got ", d);
  if (d <= 32) f.template operator()<32>();
  else if (d <= 64) f.template operator()<64>();
  else f.template operator()<128>();
}

dim3 attention_grid(int64_t heads, int64_t t) {
  REMAT_CHECK(heads <= 65535, "attention: ", heads, " batch x heads exceed the cuda grid (65535)");
  return dim3(static_cast<unsigned>((t + kRows - 1) / kRows), static_cast<unsigned>(heads));
}

}  // namespace

namespace cuda {

Tensor attention_row_dots(const Tensor& d_o, const Tensor& o) {
  const int64_t rows = o.size(0) * o.size(1) * o.size(2), d = o.size(3);
  Tensor row_dot;
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    row_dot = Tensor::empty({rows}, o.dtype() == DType::f64 ? DType::f64 : DType::f32, o.device());
  }
  if (rows == 0) return row_dot;
  dispatch(o.dtype(), "attention_backward", [&]<typename T>() {
    attention_row_dot_kernel<T><<<blocks_for(rows), kThreads>>>(d_o.data<T>(), o.data<T>(), row_dot.data<Acc<T>>(),
                                                                rows, static_cast<int>(d));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return row_dot;
}

}  // namespace cuda

std::vector<Tensor> CudaBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                           double scale) {
  if (cuda_attention() == CudaAttention::gemm && q.size(3) > 0) return attention_gemm(q, k, v, causal, scale);
  set_device_of(q);
  if (cuda_attention() == CudaAttention::mma && mma_attention_supported(q, k, v))
    return attention_mma(q, k, v, causal, scale);
  count_cuda_attention_call(CudaAttention::flash);
  int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  Tensor o = Tensor::empty(q.shape(), q.dtype(), q.device());
  // The log-sum-exp stays in the accumulation dtype: rounded to bf16 it would skew every
  // probability the backward rebuilds by up to a few percent.
  DType lse_dtype = q.dtype() == DType::bf16 ? DType::f32 : q.dtype();
  Tensor lse = Tensor::empty({q.size(0), q.size(1), t}, lse_dtype, q.device());
  if (heads == 0 || t == 0) return {o, lse};
  dispatch(q.dtype(), "attention", [&]<typename T>() {
    using A = Acc<T>;
    size_t smem = 2 * kTile<A> * d * sizeof(A);
    dispatch_head_dim(d, [&]<int DMAX>() {
      attention_forward_kernel<T, DMAX><<<attention_grid(heads, t), kRows, smem>>>(
          q.data<T>(), k.data<T>(), v.data<T>(), o.data<T>(), lse.data<A>(), t, static_cast<int>(d), causal,
          static_cast<A>(scale));
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {o, lse};
}

std::vector<Tensor> CudaBackend::attention_backward(const Tensor& d_o, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& o, const Tensor& lse, bool causal,
                                                    double scale) {
  if (cuda_attention() == CudaAttention::gemm && q.size(3) > 0)
    return attention_backward_gemm(d_o, q, k, v, o, lse, causal, scale);
  set_device_of(q);
  // The lse of either forward serves either backward (f32 for bf16, m + log l of the scaled scores).
  if (cuda_attention() == CudaAttention::mma && mma_attention_supported(q, k, v) &&
      mma_attention_supported(d_o, d_o, d_o))
    return attention_backward_mma(d_o, q, k, v, o, lse, causal, scale);
  count_cuda_attention_call(CudaAttention::flash);
  int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  Tensor dq = Tensor::empty(q.shape(), q.dtype(), q.device()), dk = Tensor::empty(q.shape(), q.dtype(), q.device()),
         dv = Tensor::empty(q.shape(), q.dtype(), q.device());
  if (heads == 0 || t == 0) return {dq, dk, dv};
  Tensor row_dot = attention_row_dots(d_o, o);
  dispatch(q.dtype(), "attention_backward", [&]<typename T>() {
    using A = Acc<T>;
    size_t smem_dq = 2 * kTile<A> * d * sizeof(A);
    size_t smem_dkv = (2 * kTile<A> * d + 2 * kTile<A>) * sizeof(A);
    dispatch_head_dim(d, [&]<int DMAX>() {
      attention_dq_kernel<T, DMAX><<<attention_grid(heads, t), kRows, smem_dq>>>(
          q.data<T>(), k.data<T>(), v.data<T>(), d_o.data<T>(), lse.data<A>(), row_dot.data<A>(), dq.data<T>(), t,
          static_cast<int>(d), causal, static_cast<A>(scale));
      attention_dkv_kernel<T, DMAX><<<attention_grid(heads, t), kRows, smem_dkv>>>(
          q.data<T>(), k.data<T>(), v.data<T>(), d_o.data<T>(), lse.data<A>(), row_dot.data<A>(), dk.data<T>(),
          dv.data<T>(), t, static_cast<int>(d), causal, static_cast<A>(scale));
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace remat
