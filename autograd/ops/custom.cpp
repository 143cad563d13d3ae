// User-defined ops: a forward and a backward given as functions, recorded like any other node.
#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

class CustomNode final : public Node {
 public:
  explicit CustomNode(CustomOp op) : op_(std::move(op)) {}
  OpKind kind() const override { return OpKind::custom; }
  const char* name() const override { return op_.name.c_str(); }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override { return op_.forward(in); }
  std::vector<int> saved_indices(size_t) const override { return op_.saved; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    std::vector<Tensor> grads, saved;
    for (size_t i = 0; i < outputs.size(); ++i) grads.push_back(ctx.grad_output(i));
    for (size_t i = 0; i < op_.saved.size(); ++i) saved.push_back(ctx.saved(i));
    std::vector<Tensor> result = op_.backward(grads, saved);
    REMAT_CHECK(result.size() == inputs.size(), "custom op ", op_.name, ": backward returned ", result.size(),
                " gradients for ", inputs.size(), " inputs");
    return result;
  }

 private:
  CustomOp op_;
};

}  // namespace

std::vector<Tensor> custom(const CustomOp& op, const std::vector<Tensor>& inputs) {
  REMAT_CHECK(op.forward && op.backward, "custom op ", op.name, ": expected both forward and backward functions");
  for (int i : op.saved)
    REMAT_CHECK(i >= 0, "custom op ", op.name, ": saved indices must be >= 0, got ", i);
  return detail::apply<CustomNode>(inputs, op);
}

}  // namespace remat
