// CUDA fused scaled dot-product attention, q/k/v [B, H, T, D] with D <= 128, flash style: key and
// value tiles are staged in shared memory, each thread owns one query row with an online softmax,
// and only the row log-sum-exp is saved. The backward rebuilds probabilities from it in two
// passes, dq by query rows and dk/dv by key rows, so no gradient is ever summed with atomics. The
// other paths (runtime/cuda_devices.h, CudaAttention) go through cuBLAS (attention_gemm.cu),
// remat's tensor-core kernels (attention_mma.cu) or cuDNN's fused attention (attention_cudnn.cpp);
// `auto`, the default, picks per call.
#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/attention_flash_kernels.cuh"
#include "kernels/cuda/attention_gemm.h"
#include "kernels/cuda/attention_mma.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "runtime/cuda_devices.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

using namespace cuda;
using namespace cuda::flash_attention;

// Runs f.template operator()<DMAX>() with the smallest register width that holds the head dim.
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  REMAT_CHECK(d >= 1 && d <= 128, "attention: the cuda kernel handles head dims 1..128, got ", d);
  if (d <= 32) f.template operator()<32>();
  else if (d <= 64) f.template operator()<64>();
  else f.template operator()<128>();
}

// The path `auto` takes: the tensor-core kernels where they apply, else the GEMMs in f32 and bf16
// and the reference kernel in f64.
CudaAttention automatic_path(const Tensor& q) {
  if (mma_attention_supported(q)) return CudaAttention::mma;
  return q.dtype() != DType::f64 && q.size(3) > 0 ? CudaAttention::gemm : CudaAttention::flash;
}

// The path this call takes: the chosen one, or `auto`'s. `mma` falls back to the flash kernel,
// `gemm` to it only for an empty head dim, `cudnn` to `auto`'s path (also where cuDNN declines a
// shape: the callers below). From the shape, dtype and device alone, so every call of the same
// shapes and dtypes (a replay, a second step, the backward of a forward) takes the same path,
// whatever the inputs' layouts.
CudaAttention attention_path(const Tensor& q) {
  switch (cuda_attention()) {
    case CudaAttention::gemm: return q.size(3) > 0 ? CudaAttention::gemm : CudaAttention::flash;
    case CudaAttention::mma: return mma_attention_supported(q) ? CudaAttention::mma : CudaAttention::flash;
    case CudaAttention::cudnn: return cudnn_attention_supported(q) ? CudaAttention::cudnn : automatic_path(q);
    case CudaAttention::automatic: return automatic_path(q);
    default: return CudaAttention::flash;
  }
}

// The flash and GEMM paths read contiguous heads; the heads of a fused projection arrive as
// strided views (attention_reads_strided), which the tensor-core kernels read where they lie.
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.as_contiguous(); }

dim3 attention_grid(int64_t heads, int64_t t) {
  REMAT_CHECK(heads <= 65535, "attention: ", heads, " batch x heads exceed the cuda grid (65535)");
  return dim3(static_cast<unsigned>((t + kRows - 1) / kRows), static_cast<unsigned>(heads));
}

}  // namespace

namespace cuda {

Tensor attention_row_dots(const Tensor& d_o, const Tensor& o) {
  const int64_t rows = o.size(0) * o.size(1) * o.size(2), d = o.size(3);
  Tensor row_dot = empty_workspace({rows}, accumulation_dtype(o.dtype()), o.device());
  if (rows == 0) return row_dot;
  dispatch(o.dtype(), "attention_backward", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(rows), kThreads, 0, attention_row_dot_kernel<T>)(
        d_o.data<T>(), o.data<T>(), row_dot.data<Acc<T>>(), rows, static_cast<int>(d));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return row_dot;
}

}  // namespace cuda

std::vector<Tensor> CudaBackend::attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                           double scale) {
  CudaAttention path = attention_path(q_in);
  set_device_of(q_in);
  if (path == CudaAttention::cudnn) {
    if (auto done = attention_cudnn(q_in, k_in, v_in, causal, scale)) return *done;
    path = automatic_path(q_in);  // declined (and its backward will be)
  }
  if (path == CudaAttention::mma) return attention_mma(q_in, k_in, v_in, causal, scale);
  const Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
  if (path == CudaAttention::gemm) return attention_gemm(q, k, v, causal, scale);
  count_cuda_attention_call(CudaAttention::flash);
  int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  Tensor o = Tensor::empty(q.shape(), q.dtype(), q.device());
  // The log-sum-exp stays in the accumulation dtype: rounded to bf16 it would skew every
  // probability the backward rebuilds by up to a few percent.
  DType lse_dtype = accumulation_dtype(q.dtype());
  Tensor lse = Tensor::empty({q.size(0), q.size(1), t}, lse_dtype, q.device());
  if (heads == 0 || t == 0) return {o, lse};
  dispatch(q.dtype(), "attention", [&]<typename T>() {
    using A = Acc<T>;
    size_t smem = 2 * kTile<A> * d * sizeof(A);
    dispatch_head_dim(d, [&]<int DMAX>() {
      REMAT_LAUNCH(attention_grid(heads, t), kRows, smem, attention_forward_kernel<T, DMAX>)(
          q.data<T>(), k.data<T>(), v.data<T>(), o.data<T>(), lse.data<A>(), t, static_cast<int>(d), causal,
          static_cast<A>(scale));
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {o, lse};
}

std::vector<Tensor> CudaBackend::attention_backward(const Tensor& d_o_in, const Tensor& q_in, const Tensor& k_in,
                                                    const Tensor& v_in, const Tensor& o_in, const Tensor& lse,
                                                    bool causal, double scale) {
  // The lse of any forward serves any backward (f32 for bf16, m + log l of the scaled scores).
  CudaAttention path = attention_path(q_in);
  set_device_of(q_in);
  if (path == CudaAttention::cudnn) {
    if (auto done = attention_backward_cudnn(d_o_in, q_in, k_in, v_in, o_in, lse, causal, scale)) return *done;
    path = automatic_path(q_in);  // declined, as its forward was
  }
  if (path == CudaAttention::mma) return attention_backward_mma(d_o_in, q_in, k_in, v_in, o_in, lse, causal, scale);
  const Tensor d_o = dense(d_o_in), q = dense(q_in), k = dense(k_in), v = dense(v_in), o = dense(o_in);
  if (path == CudaAttention::gemm) return attention_backward_gemm(d_o, q, k, v, o, lse, causal, scale);
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
      REMAT_LAUNCH(attention_grid(heads, t), kRows, smem_dq, attention_dq_kernel<T, DMAX>)(
          q.data<T>(), k.data<T>(), v.data<T>(), d_o.data<T>(), lse.data<A>(), row_dot.data<A>(), dq.data<T>(), t,
          static_cast<int>(d), causal, static_cast<A>(scale));
      REMAT_LAUNCH(attention_grid(heads, t), kRows, smem_dkv, attention_dkv_kernel<T, DMAX>)(
          q.data<T>(), k.data<T>(), v.data<T>(), d_o.data<T>(), lse.data<A>(), row_dot.data<A>(), dk.data<T>(),
          dv.data<T>(), t, static_cast<int>(d), causal, static_cast<A>(scale));
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace remat
