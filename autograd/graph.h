// The tape: nodes in execution order (a Wengert list) and the values they read and write.
// Backward walks the nodes in reverse. A value's data is held here only while some saved slot
// (or a checkpoint region) holds it; otherwise only its metadata remains.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "node.h"
#include "../runtime/tensor.h"

namespace remat {

struct ValueInfo {
  Shape shape;
  DType dtype = DType::f32;
  Device device;
  int64_t producer = -1;  // node index; -1 for a value from outside the graph
  int output_index = 0;
  bool requires_grad = false;
  std::shared_ptr<AutogradMeta> leaf;  // leaves that require grad: where .grad accumulates
  bool stale = false;                  // non-leaf from a graph already freed by backward
  std::string tag;                     // user name (checkpoint_name)
  // Data, alive while holds > 0.
  Tensor data;
  int holds = 0;
  uint64_t version = 0;  // storage version when recorded
  std::string meta_str() const;
};

// What the checkpoint layer plugs into: told of every recorded node, asked for dropped slots,
// told when backward has finished a node. Autograd never learns why a slot was dropped.
class SavedTensorHooks {
 public:
  virtual ~SavedTensorHooks() = default;
  virtual void on_record(Graph& graph, int64_t node, const std::vector<Tensor>& inputs,
                         const std::vector<Tensor>& outputs) = 0;
  virtual Tensor unpack_dropped(Graph& graph, int64_t node, size_t slot) = 0;
  // A recorded value got a user name (checkpoint_name); `data` is the tensor itself.
  virtual void on_tag(Graph&, int64_t /*value*/, const Tensor& /*data*/) {}
  // Called after a node's backward, before its slots are released.
  virtual void after_backward_node(Graph& graph, int64_t node, bool retain_graph) = 0;
  virtual void after_backward(Graph& graph, bool retain_graph) = 0;
};

class Graph {
 public:
  std::vector<std::unique_ptr<Node>> nodes;
  std::vector<ValueInfo> values;
  std::unique_ptr<SavedTensorHooks> hooks;  // installed by the checkpoint layer when a region opens
  bool freed = false;  // backward ran without retain_graph: saved data is gone
  std::unordered_map<const AutogradMeta*, int64_t> leaf_values;  // one value per leaf

  // The value id of a tensor in this graph, registering outside tensors on first use.
  int64_t value_of(const Tensor& t);
  int64_t add_value(const Tensor& t, int64_t producer, int output_index, bool requires_grad);
  void hold(int64_t value, const Tensor& data);
  void release(int64_t value);
  // The data of a kept slot, checking that it was not modified in place since it was saved.
  Tensor unpack(int64_t node, size_t slot);
  // Drops a kept slot (its value's data is freed when nothing else holds it).
  void drop_slot(int64_t node, size_t slot);
  // Moves a held value's data to pinned host memory (when it lives on a GPU), asynchronously on
  // the copy stream; value_data brings it back. Returns the bytes moved (0 for host data).
  int64_t offload(int64_t value);
  // A held value's data on the device it was recorded on: an offloaded value comes back (from a
  // prefetch when one was started); the device copy lives as long as its user holds it.
  Tensor value_data(int64_t value);
  // Starts copying an offloaded value back ahead of its use (no-op for other values).
  void prefetch(int64_t value);
  bool is_offloaded(int64_t value) const {
    const ValueInfo& v = values[value];
    return v.data.defined() && v.data.device() != v.device;
  }
  // Offloaded values already on their way back, with the end of their copy.
  std::unordered_map<int64_t, std::pair<Tensor, std::shared_ptr<void>>> prefetched;
};

// The graph ops record onto on this thread (created on demand, replaced after a backward frees it).
std::shared_ptr<Graph> current_graph();
// Records `node` applied to `inputs`: runs its forward, and if grad mode is on and an input
// requires grad, appends it to the tape. Returns the outputs.
std::vector<Tensor> record(std::unique_ptr<Node> node, const std::vector<Tensor>& inputs);

}  // namespace remat
