// Attention on cuDNN's fused scaled-dot-product attention (attention_cudnn.cpp), the `cudnn` path
// of CudaAttention (runtime/cuda_devices.h). Host-only header. In a build without cuDNN's
// frontend the path is absent: cudnn_attention_supported is false and the calls decline.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../../runtime/tensor.h"

namespace remat::cuda {

// Whether the path takes q's shape and dtype (k, v and dO have them too): this build has cuDNN's
// frontend, q is bf16 with a head dim of 8 to 128 in multiples of 8, on a GPU of compute
// capability 8.0 or newer. Elsewhere another path runs.
bool cudnn_attention_supported(const Tensor& q);

// {o, lse} as the other paths give them: o [B, H, T, D] laid out [B, T, H, D], lse [B, H, T] in
// f32 (the max plus the natural log of the sum of exponentials of the scaled scores, cuDNN's
// statistics). nullopt where cuDNN declines the shape and layout in either direction (said once
// on stderr); the caller then takes another path, and so will the backward of that shape.
std::optional<std::vector<Tensor>> attention_cudnn(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                   double scale);
// {dq, dk, dv}, from cuDNN's deterministic backward: the same bits on every call.
std::optional<std::vector<Tensor>> attention_backward_cudnn(const Tensor& d_o, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& o, const Tensor& lse,
                                                            bool causal, double scale);

// Why cuDNN's frontend rejects the two graphs of a problem (B, H, T, D; the B, H and T strides of
// q, k and v) for a GPU of compute capability `sm` (90 for 9.0), checked without a GPU: the
// frontend's validation of attributes, shapes and layouts and its support checks, before cuDNN's
// heuristics, which need the GPU. "" when both pass. For the tests.
std::string cudnn_attention_graphs_invalid(const std::array<int64_t, 4>& shape, const std::array<int64_t, 9>& strides,
                                           bool causal, float scale, int sm);

}  // namespace remat::cuda
