// CUDA attention through cuBLAS, on the tensor cores: the scores S = scale Q K^T, O = P V and, in
// backward, dP = dO V^T, dQ = dS K, dK = dS^T Q and dV = P^T dO are batched GEMMs (bf16 inputs with
// f32 accumulation; f32 and f64 as stored); row kernels do the masked softmax, saving the
// log-sum-exp as the flash kernel does, and dS = P (dP - rowsum(dO O)) scale. Heads go a chunk at
// a time, so that each [T, T] temporary stays within 64 MiB. Deterministic as every GEMM here is
// (one stream, a fixed cuBLAS workspace) and the row reductions run in a fixed order.
#include "kernels/cuda/attention_gemm.h"

#include <algorithm>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/attention_gemm_kernels.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/gemm.h"
#include "runtime/cuda_devices.h"
#include "runtime/workspace.h"

namespace remat::cuda {

namespace {

using namespace attention_gemm_kernels;

constexpr int64_t kChunkBytes = int64_t{64} << 20;

// Heads per pass: a [T, T] temporary in the accumulation dtype for each fits in kChunkBytes.
int64_t heads_per_chunk(int64_t heads, int64_t t, DType acc) {
  const int64_t per_head = std::max<int64_t>(1, t * t * static_cast<int64_t>(dtype_size(acc)));
  return std::clamp<int64_t>(kChunkBytes / per_head, 1, heads);
}

// The element at `offset` of a tensor's data, as the byte pointer a Gemm takes.
char* element(const Tensor& x, int64_t offset) {
  return static_cast<char*>(const_cast<void*>(x.raw_data())) + offset * static_cast<int64_t>(dtype_size(x.dtype()));
}

// Per head h0 .. h0 + g - 1: c = alpha A B^T for [T, D] operands a and b, in the accumulation
// dtype (c [g, T, T]). The scores S = scale Q K^T in forward and again in backward go through
// this one call, so backward rebuilds the very scores the saved log-sum-exp came from; also
// dP = dO V^T.
void times_transposed(const Tensor& a, const Tensor& b, int64_t h0, int64_t g, double alpha, const Tensor& c) {
  const int64_t t = a.size(2), d = a.size(3), td = t * d;
  run_gemm_into({false, true, t, t, d, element(a, h0 * td), d, td, element(b, h0 * td), d, td, c.raw_data(), t * t, g},
                a.dtype(), c.dtype(), alpha, a.device().index);
}

unsigned one_block_per_row(int64_t rows) {
  REMAT_CHECK(rows <= INT32_MAX, "attention: ", rows, " rows exceed the cuda grid");
  return static_cast<unsigned>(rows);
}

}  // namespace

std::vector<Tensor> attention_gemm(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  set_device_of(q);
  count_cuda_attention_call(CudaAttention::gemm);
  const int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3), td = t * d, tt = t * t;
  const DType acc = accumulation_dtype(q.dtype());
  Tensor o = Tensor::empty(q.shape(), q.dtype(), q.device());
  Tensor lse = Tensor::empty({q.size(0), q.size(1), t}, acc, q.device());
  if (heads == 0 || t == 0) return {o, lse};
  REMAT_CHECK(d > 0, "attention: the gemm path needs a head dim of at least 1");
  const int64_t chunk = heads_per_chunk(heads, t, acc);
  Tensor s = empty_workspace({chunk, t, t}, acc, q.device()), p = empty_workspace({chunk, t, t}, q.dtype(), q.device());
  const int device = q.device().index;
  for (int64_t h0 = 0; h0 < heads; h0 += chunk) {
    const int64_t g = std::min(chunk, heads - h0), at = h0 * td;
    times_transposed(q, k, h0, g, scale, s);  // S = scale Q K^T
    dispatch(q.dtype(), "attention", [&]<typename T>() {
      using A = Acc<T>;
      REMAT_LAUNCH(one_block_per_row(g * t), kThreads, 0, masked_softmax_kernel<T>)(
          s.data<A>(), p.data<T>(), lse.data<A>() + h0 * t, t, causal);
    });
    REMAT_CUDA_LAUNCH_CHECK();
    // O = P V, per head [T, T] x [T, D].
    run_gemm_into({false, false, t, d, t, p.raw_data(), t, tt, element(v, at), d, td, element(o, at), td, g},
                  q.dtype(), q.dtype(), 1.0, device);
  }
  return {o, lse};
}

std::vector<Tensor> attention_backward_gemm(const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& o, const Tensor& lse, bool causal, double scale) {
  set_device_of(q);
  count_cuda_attention_call(CudaAttention::gemm);
  const int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3), td = t * d, tt = t * t;
  const DType acc = accumulation_dtype(q.dtype());
  Tensor dq = Tensor::empty(q.shape(), q.dtype(), q.device()), dk = Tensor::empty(q.shape(), q.dtype(), q.device()),
         dv = Tensor::empty(q.shape(), q.dtype(), q.device());
  if (heads == 0 || t == 0 || d == 0) return {dq, dk, dv};
  const int64_t chunk = heads_per_chunk(heads, t, acc);
  Tensor row_dot = attention_row_dots(d_o, o);
  Tensor s = empty_workspace({chunk, t, t}, acc, q.device()), dp = empty_workspace({chunk, t, t}, acc, q.device());
  Tensor p = empty_workspace({chunk, t, t}, q.dtype(), q.device());
  Tensor ds = empty_workspace({chunk, t, t}, q.dtype(), q.device());
  const int device = q.device().index;
  for (int64_t h0 = 0; h0 < heads; h0 += chunk) {
    const int64_t g = std::min(chunk, heads - h0), at = h0 * td;
    times_transposed(q, k, h0, g, scale, s);  // S = scale Q K^T, as in forward
    times_transposed(d_o, v, h0, g, 1.0, dp);  // dP = dO V^T
    dispatch(q.dtype(), "attention_backward", [&]<typename T>() {
      using A = Acc<T>;
      REMAT_LAUNCH(one_block_per_row(g * t), kThreads, 0, softmax_grad_kernel<T>)(
          s.data<A>(), dp.data<A>(), lse.data<A>() + h0 * t, row_dot.data<A>() + h0 * t, p.data<T>(), ds.data<T>(), t,
          causal, static_cast<A>(scale));
    });
    REMAT_CUDA_LAUNCH_CHECK();
    // dQ = dS K, dK = dS^T Q, dV = P^T dO: [T, T] (or its transpose) x [T, D] per head.
    run_gemm_into({false, false, t, d, t, ds.raw_data(), t, tt, element(k, at), d, td, element(dq, at), td, g},
                  q.dtype(), q.dtype(), 1.0, device);
    run_gemm_into({true, false, t, d, t, ds.raw_data(), t, tt, element(q, at), d, td, element(dk, at), td, g},
                  q.dtype(), q.dtype(), 1.0, device);
    run_gemm_into({true, false, t, d, t, p.raw_data(), t, tt, element(d_o, at), d, td, element(dv, at), td, g},
                  q.dtype(), q.dtype(), 1.0, device);
  }
  return {dq, dk, dv};
}

}  // namespace remat::cuda
