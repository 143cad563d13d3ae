// The layout of attention's gradients for heads that lie side by side in one projection, shared by
// the backends: written the same way into one buffer, split's backward takes them back as they lie.
#pragma once

#include <vector>

#include "runtime/tensor.h"

namespace remat {

// Whether q, k and v ([B, H, T, D] views) are the heads of one [B, T, 3C] projection side by side,
// as gpt's fused qkv hands them: split along the last dim, each [B, T, H, D] seen as [B, H, T, D].
bool packed_attention_heads(const Tensor& q, const Tensor& k, const Tensor& v);

// dq, dk and dv for such heads: views of one new [B, T, 3C] tensor on q's device, laid out as q,
// k and v are (zeros where `zeroed`, else uninitialised), so that merging each one's heads is a
// view and split's backward takes the three back without a copy (autograd/ops/shape.cpp).
std::vector<Tensor> packed_attention_grads(const Tensor& q, bool zeroed);

}  // namespace remat
