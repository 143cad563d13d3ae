// Attention on CUDA tensor cores with remat's own mma.sync kernels (attention_mma.cu), beside the
// flash kernel (attention.cu, the reference) and the cuBLAS path (attention_gemm.cu);
// set_cuda_attention(mma) chooses it where it applies. Host-only header. q, k, v, o and dO are
// bf16 [B, H, T, D], read where they lie when their rows are 16-byte aligned with unit stride over
// D (the heads of a fused projection are), else copied; o, dq, dk and dv come back as [B, H, T, D]
// views of [B, T, H, D] memory, so that merging the heads again is a view. lse [B, H, T] in f32,
// as the flash kernel keeps it.
#pragma once

#include <vector>

#include "../../runtime/tensor.h"

namespace remat::cuda {

// Whether the kernels take q's shape and dtype (k, v and dO have them too): bf16, head dim 32, 64
// or 128, T up to 2^30, on a GPU of compute capability 8.0 or newer. Elsewhere another path runs.
bool mma_attention_supported(const Tensor& q);
// {o, lse}, as the flash kernel gives them.
std::vector<Tensor> attention_mma(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale);
// {dq, dk, dv}.
std::vector<Tensor> attention_backward_mma(const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& o, const Tensor& lse, bool causal, double scale);

}  // namespace remat::cuda
