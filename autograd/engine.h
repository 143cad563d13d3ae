// The backward engine: walks the tape in reverse from a root and accumulates leaf gradients.
#pragma once

#include "../runtime/tensor.h"

namespace remat {

struct BackwardOptions {
  bool retain_graph = false;  // keep saved tensors so that backward can run again
};

// Gradient of `root` w.r.t. every leaf that requires grad, accumulated into their .grad.
// `grad` defaults to 1 for a scalar root; a non-scalar root needs one of its shape.
void backward(const Tensor& root, const Tensor& grad = Tensor(), BackwardOptions options = {});

}  // namespace remat
