// The backward engine: walks the tape in reverse from a root and accumulates leaf gradients.
#pragma once

#include <vector>

#include "../runtime/tensor.h"

namespace remat {

struct BackwardOptions {
  bool retain_graph = false;  // keep saved tensors so that backward can run again
};

// Gradient of `root` w.r.t. every leaf that requires grad, accumulated into their .grad.
// `grad` defaults to 1 for a scalar root; a non-scalar root needs one of its shape. Runs and, without
// retain_graph, frees only the root's ancestry (over every graph it reaches): another loss of the
// same forward can still run backward afterwards, unless it needs what this one freed.
void backward(const Tensor& root, const Tensor& grad = Tensor(), BackwardOptions options = {});

// The gradients of `root` w.r.t. `inputs` (leaves or intermediate tensors of its ancestry),
// returned instead of accumulated into .grad; no .grad changes. Undefined where an input does not
// lead to the root. Frees the ancestry like backward unless retain_graph.
std::vector<Tensor> grad(const Tensor& root, const std::vector<Tensor>& inputs, const Tensor& grad = Tensor(),
                         BackwardOptions options = {});

}  // namespace remat
