// conv2d on CUDA, two ways: cuDNN (conv_cudnn.cu) where it has a deterministic algorithm for the
// shape and dtype, and im2col + cuBLAS GEMM (conv_gemm.cu) otherwise, or in a build without cuDNN.
// Host-only header. Images are [N, C, H, W], weights [Cout, Cin, kh, kw].
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "../../runtime/tensor.h"

namespace remat::cuda {

// The im2col path: forward, and (dx, dw) of backward. Deterministic for a fixed shape.
Tensor conv2d_gemm(const Tensor& x, const Tensor& w, int stride, int padding);
std::pair<Tensor, Tensor> conv2d_backward_gemm(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                               int padding);

// The cuDNN path: nothing when cuDNN cannot do it with deterministic algorithms (f64 on some
// versions, unusual shapes); other cuDNN failures throw.
std::optional<Tensor> conv2d_cudnn(const Tensor& x, const Tensor& w, int stride, int padding);
std::optional<std::pair<Tensor, Tensor>> conv2d_backward_cudnn(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                               int stride, int padding);

}  // namespace remat::cuda
