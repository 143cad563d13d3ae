// The backward engine: walks the tape in reverse from a root and accumulates leaf gradients.
#pragma once

#include <functional>
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

// While one is alive on a thread, backward() on that thread calls `ready(leaf, grad)` as soon as a
// leaf's gradient for this backward is final — once the last node that reads the leaf has run,
// while the rest of backward goes on — with that backward's gradient (before it is added to the
// leaf's .grad at the end). For data parallel training: gradients leave for the other ranks while
// backward continues. Scopes nest; the innermost is called. Not used by grad().
class LeafGradReadyScope {
 public:
  // leaf: the leaf's autograd state (Tensor::autograd_meta_ptr().get() of the parameter).
  using Fn = std::function<void(const AutogradMeta* leaf, const Tensor& grad)>;
  explicit LeafGradReadyScope(Fn ready);
  ~LeafGradReadyScope();
  LeafGradReadyScope(const LeafGradReadyScope&) = delete;
  LeafGradReadyScope& operator=(const LeafGradReadyScope&) = delete;

 private:
  Fn fn_;
  LeafGradReadyScope* outer_;
  friend const Fn* current_leaf_grad_ready();
};

// The gradients of `root` w.r.t. `inputs` (leaves or intermediate tensors of its ancestry),
// returned instead of accumulated into .grad; no .grad changes. Undefined where an input does not
// lead to the root. Frees the ancestry like backward unless retain_graph.
std::vector<Tensor> grad(const Tensor& root, const std::vector<Tensor>& inputs, const Tensor& grad = Tensor(),
                         BackwardOptions options = {});

}  // namespace remat
