// One cuBLAS GEMM call of the CUDA backend, shared by matmul/linear (blas.cu) and the im2col
// convolution (conv_gemm.cu), and linear's cuBLASLt calls (blas_lt.cpp). Host-only header. Matrices
// are row-major, batches strided.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../runtime/dtype.h"

namespace remat::cuda {

// C[i] = op(A[i]) op(B[i]) for i < batch, where A[i] starts at a + i * stride_a (a stride of 0
// shares one matrix across the batch); lda and ldb are the row lengths of A and B as stored.
struct Gemm {
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda, stride_a;
  const void* b;
  int64_t ldb, stride_b;
  void* c;
  int64_t stride_c;
  int64_t batch;
};

// On the device's one handle with its fixed workspace (same kernels every call: replays
// reproduce bits). f32, f64 and bf16 (f32 accumulation).
void run_gemm(const Gemm& g, DType dtype, int device);
// C = alpha op(A) op(B) + beta C with C in c_dtype: the inputs' dtype, or f32 for bf16 inputs
// (the attention scores, kept in f32; dW summed over chunks).
void run_gemm_into(const Gemm& g, DType dtype, DType c_dtype, double alpha, int device, double beta = 0.0);

// The device's GEMM workspace: cuBLAS's, which cuBLASLt shares (both run on the one compute
// stream, so no two calls use it at once).
struct GemmWorkspace {
  void* data;
  size_t bytes;
};
GemmWorkspace gemm_workspace(int device);

// y[rows, out] = x[rows, in] w[out, in]^T + b[out] in one cuBLASLt call, the bias added in the
// epilogue (f32 accumulation, one rounding to y's dtype), for bf16 and f32 (TF32 when
// set_cuda_tf32). false, with nothing queued, where cuBLASLt offers no algorithm (f64, or the
// shape and alignment): the caller then runs the GEMM and the bias kernel. The algorithm is chosen
// once per shape, dtype and pointer alignment and kept, so every call of a shape (a replay) runs
// the same kernel.
bool linear_bias_epilogue(const void* x, const void* w, const void* b, void* y, int64_t rows, int64_t in, int64_t out,
                          DType dtype, int device);

// dw[out, in] = dy[rows, out]^T x[rows, in] and db[out] = the column sums of dy in one cuBLASLt
// call, db from the BGRADB epilogue as the GEMM reads dy: dy and x bf16 or f32 (`dtype`), dw and db
// f32 (`grad_dtype`; TF32 for f32 when set_cuda_tf32). false, with nothing queued, where cuBLASLt
// offers no algorithm: the caller then runs the GEMM and the column reduction. Chosen once per
// problem and kept, as above.
bool linear_weight_bias_grads(const void* dy, const void* x, void* dw, void* db, int64_t rows, int64_t in,
                              int64_t out, DType dtype, DType grad_dtype, int device);

}  // namespace remat::cuda
