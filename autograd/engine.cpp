// Backward: reverse walk over the tape, gradient accumulation per value, leaf .grad updates.
#include "autograd/engine.h"

#include "autograd/grad_mode.h"
#include "autograd/graph.h"
#include "autograd/trace.h"
#include "kernels/backend.h"

namespace remat {

namespace {

Tensor accumulate(const Tensor& sum, const Tensor& g) {
  if (!sum.defined()) return g;
  return backend_for(OpKind::add, g.device()).binary(BinaryFn::add, sum, g);
}

// Leaf gradients must be plain, contiguous and unshared: optimizers and clipping write them in place.
Tensor own_copy(const Tensor& g) {
  if (g.is_contiguous() && g.storage().use_count() == 1 && g.offset() == 0) return g.detach();
  return backend_for(g.device()).copy_strided(g);
}

}  // namespace

void backward(const Tensor& root, const Tensor& grad, BackwardOptions options) {
  REMAT_CHECK(root.defined(), "backward: the root tensor is undefined");
  REMAT_CHECK(root.requires_grad(), "backward: expected a tensor that requires grad, got ", root.meta_str(),
              " that no recorded op produced from a tensor requiring grad");
  const auto& meta = root.autograd_meta_ptr();
  REMAT_CHECK(meta->graph != nullptr, "backward: called on a leaf tensor; its gradient would be the given gradient");
  auto graph = std::static_pointer_cast<Graph>(meta->graph);
  Graph& g = *graph;
  REMAT_CHECK(!g.freed, "backward through the graph a second time: its saved tensors were freed by an earlier ",
              "backward; pass retain_graph=true to that backward to run it twice");

  Tensor seed = grad;
  if (!seed.defined()) {
    REMAT_CHECK(root.numel() == 1, "backward: a gradient is needed for a non-scalar root ", root.meta_str());
    MemoryCategoryScope category(MemoryCategory::gradient);
    seed = Tensor::ones(root.shape(), root.dtype(), root.device());
  }
  REMAT_CHECK(seed.shape() == root.shape() && seed.dtype() == root.dtype() && seed.device() == root.device(),
              "backward: expected a gradient matching the root ", root.meta_str(), ", got ", seed.meta_str());

  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::gradient);
  std::vector<Tensor> grads(g.values.size());
  grads[meta->value_id] = seed.detach();
  int64_t start = g.values[meta->value_id].producer;
  for (int64_t index = start; index >= 0; --index) {
    Node& node = *g.nodes[index];
    std::vector<Tensor> grad_outputs(node.outputs.size());
    bool any = false;
    for (size_t i = 0; i < node.outputs.size(); ++i) {
      grad_outputs[i] = std::move(grads[node.outputs[i]]);
      any = any || grad_outputs[i].defined();
    }
    if (any) {
      std::vector<bool> needs(node.inputs.size());
      for (size_t i = 0; i < node.inputs.size(); ++i)
        needs[i] = node.inputs[i] >= 0 && g.values[node.inputs[i]].requires_grad;
      BackwardContext ctx(g, index, std::move(grad_outputs), needs);
      std::vector<Tensor> input_grads;
      {
        TraceSpan span(node.name(), "backward");
        input_grads = node.backward(ctx);
      }
      REMAT_ASSERT(input_grads.size() == node.inputs.size(), node.name(), " returned ", input_grads.size(),
                   " gradients for ", node.inputs.size(), " inputs");
      for (size_t i = 0; i < node.inputs.size(); ++i) {
        if (!needs[i] || !input_grads[i].defined()) continue;
        const ValueInfo& v = g.values[node.inputs[i]];
        REMAT_ASSERT(input_grads[i].shape() == v.shape, node.name(), " gradient ", i, " has shape ",
                     shape_str(input_grads[i].shape()), ", its input ", shape_str(v.shape));
        REMAT_CHECK(!v.stale, "backward through the graph a second time: input ", i, " of ", node.name(),
                    " comes from a graph already freed by an earlier backward; pass retain_graph=true to it");
        grads[node.inputs[i]] = accumulate(grads[node.inputs[i]], input_grads[i]);
      }
    }
    // The hooks go first: they may take over data that releasing these slots would free.
    if (g.hooks) g.hooks->after_backward_node(g, index, options.retain_graph);
    if (!options.retain_graph)
      for (SavedSlot& slot : node.saved) {
        if (slot.state == SlotState::kept) g.release(slot.value);
        slot.state = SlotState::released;
      }
  }
  for (size_t v = 0; v < g.values.size(); ++v) {
    const ValueInfo& info = g.values[v];
    if (!info.leaf || !grads[v].defined()) continue;
    Tensor sum = info.leaf->grad ? accumulate(*info.leaf->grad, grads[v]) : grads[v];
    grads[v] = Tensor();
    info.leaf->grad = std::make_shared<Tensor>(own_copy(sum));
  }
  if (g.hooks) g.hooks->after_backward(g, options.retain_graph);
  if (!options.retain_graph) {
    g.freed = true;
    for (auto& node : g.nodes)
      for (SavedSlot& slot : node->saved) {
        if (slot.state == SlotState::kept) g.release(slot.value);
        slot.state = SlotState::released;
      }
  }
}

}  // namespace remat
