// A node of the tape: one recorded op with typed attributes (in the subclass), a pure forward,
// the saved slots its backward reads, and its backward. Forward depends on inputs and attributes
// only, which is what lets checkpointing replay a node exactly.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../kernels/op_list.h"
#include "../runtime/tensor.h"

namespace remat {

class Graph;

// kept: the graph holds the value's data for this slot. dropped: metadata only; a checkpoint
// region can rebuild it by replay. offloaded: held in host memory. released: freed by backward.
enum class SlotState : uint8_t { kept, dropped, offloaded, released };
const char* slot_state_name(SlotState s);

struct SavedSlot {
  int64_t value = -1;  // value id in the graph
  SlotState state = SlotState::kept;
};

// What a node's backward sees: output gradients (undefined = zero), which input gradients are
// wanted, and its saved tensors, each reached only through unpack.
class BackwardContext {
 public:
  BackwardContext(Graph& graph, int64_t node, std::vector<Tensor> grad_outputs, std::vector<bool> needs_input_grad,
                  bool retain_graph = true)
      : graph_(graph),
        node_(node),
        grad_outputs_(std::move(grad_outputs)),
        needs_(std::move(needs_input_grad)),
        retain_graph_(retain_graph),
        partials_(needs_.size()),
        taken_(needs_.size(), false) {}
  const Tensor& grad_output(size_t i) const { return grad_outputs_[i]; }
  // Moves the gradient out: when the caller then holds the only reference to its storage, a
  // backward may write its result over it (sole_owner in autograd/ops/op_helpers.h).
  Tensor take_grad_output(size_t i) const { return std::move(grad_outputs_[i]); }
  bool needs_input_grad(size_t i) const { return needs_[i]; }
  Tensor saved(size_t slot) const;  // unpacks the node's saved slot (may replay a checkpoint region)
  // The backward has read saved slot `slot` for the last time: its tensor may go now, before the
  // node allocates the rest of its gradients, rather than after the node. Nothing under
  // retain_graph (a later backward reads it again).
  void release_saved(size_t slot) const;

  // The gradient of input i summed so far from the nodes that ran before this one, where the
  // engine offers it (an input of this graph, not a leaf or an import; undefined otherwise or when
  // none reached it yet). A backward may take it, add its own gradient for input i into it in
  // place, as partial + gradient (the bits of the engine's sum), and return it as input i's
  // gradient: the pass the engine's addition takes over memory goes. One not taken, the engine
  // adds to as before.
  const Tensor& partial_grad(size_t i) const { return partials_[i]; }
  Tensor take_partial_grad(size_t i) const;
  // The engine's side.
  void offer_partial_grad(size_t i, Tensor partial);
  bool took_partial_grad(size_t i) const { return taken_[i]; }
  Tensor untaken_partial_grad(size_t i) { return std::exchange(partials_[i], Tensor()); }

 private:
  Graph& graph_;
  int64_t node_;
  mutable std::vector<Tensor> grad_outputs_;
  std::vector<bool> needs_;
  bool retain_graph_;
  mutable std::vector<Tensor> partials_;
  mutable std::vector<bool> taken_;
};

class Node {
 public:
  virtual ~Node() = default;
  virtual OpKind kind() const = 0;
  virtual const char* name() const { return op_name(kind()); }
  // Pure: the outputs as a function of inputs and attributes.
  virtual std::vector<Tensor> forward(const std::vector<Tensor>& inputs) const = 0;
  // The tensors backward needs, as indices into inputs (0..n-1) then outputs (n..n+m-1).
  virtual std::vector<int> saved_indices(size_t num_inputs) const = 0;
  // Gradients for each input (undefined where not needed or zero).
  virtual std::vector<Tensor> backward(const BackwardContext& ctx) const = 0;
  // Outputs that carry no gradient (statistics such as mean/rstd, log-sum-exp).
  virtual bool output_differentiable(size_t) const { return true; }

  // Filled in when recorded.
  std::vector<int64_t> inputs;
  std::vector<int64_t> outputs;
  std::vector<SavedSlot> saved;
  int region = -1;  // innermost checkpoint region containing the node, -1 if none
  uint64_t seq = 0;   // global recording order (across graphs): backward runs in decreasing seq
  bool done = false;  // a backward without retain_graph ran it and released its slots
  float forward_us = 0;  // how long its forward took when recorded (the budget planner's op costs)
  // With DeviceOpTiming on and the op on a GPU: events around its forward on the GPU's compute
  // stream, which the planner turns into forward_us (the host time being the launch's).
  std::shared_ptr<void> forward_start_event, forward_end_event;
};

}  // namespace remat
