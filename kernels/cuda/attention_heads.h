// The [B, H, T, D] layouts the tensor-core attention paths share (the mma kernels, cuDNN's fused
// attention). Host-only.
#pragma once

#include "../../runtime/tensor.h"

namespace remat::cuda {

// `x` itself where its rows are 16-byte aligned with unit stride over D and its other strides are
// multiples of 8 elements (the heads of a fused projection are), else a contiguous copy.
Tensor readable_heads(const Tensor& x);
// An empty [B, H, T, D] tensor of `like`'s shape, dtype and device, laid out [B, T, H, D]: merging
// the heads of an attention output again is then a view.
Tensor empty_heads(const Tensor& like);
// `x` itself where it is laid out as empty_heads lays out (and 16-byte aligned), else a copy so
// laid out: the layout cuDNN's attention graphs declare for o and dO.
Tensor in_bthd_layout(const Tensor& x);

}  // namespace remat::cuda
