// Attention on CUDA through cuBLAS GEMMs on the tensor cores (attention_gemm.cu), beside the flash
// kernel (attention.cu, the reference); set_cuda_attention chooses. Host-only header. q, k, v, o
// and dO are contiguous [B, H, T, D]; lse [B, H, T] in the accumulation dtype (f32, or f64).
#pragma once

#include <vector>

#include "../../runtime/tensor.h"

namespace remat::cuda {

// {o, lse}, as the flash kernel gives them.
std::vector<Tensor> attention_gemm(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale);
// {dq, dk, dv}.
std::vector<Tensor> attention_backward_gemm(const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& o, const Tensor& lse, bool causal, double scale);

// D = rowsum(dO * O) per query row, [B * H * T] in the accumulation dtype (workspace): the row
// term of the softmax backward, for both paths (attention.cu).
Tensor attention_row_dots(const Tensor& d_o, const Tensor& o);

}  // namespace remat::cuda
