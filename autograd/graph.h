// The tape: nodes in execution order (a Wengert list) and the values they read and write.
// Backward walks the nodes in reverse. A value's data is held here only while some saved slot
// (or a checkpoint region) holds it; otherwise only its metadata remains.
//
// A graph belongs to the tensors it recorded, not to a thread: an op records onto the newest graph
// among its inputs' (or, while a checkpoint scope is open, onto the scope's graph), and an op whose
// inputs are all leaves starts a graph of its own. So each forward from the parameters has its own graph, and
// its saved data goes as soon as none of its outputs is held any more. An input that another graph
// recorded is imported: backward follows it into that graph. Every node carries a global sequence
// number, and backward runs the nodes of all the graphs it reaches in decreasing order of it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
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
  // An output of another graph read here (an import): backward hands its gradient to that value.
  std::shared_ptr<Graph> source;
  int64_t source_value = -1;
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
  // Called once per backward through this graph, before its first node; root_value: the root's
  // value when the root belongs to this graph, else -1.
  virtual void before_backward(Graph&, bool /*retain_graph*/, int64_t /*root_value*/) {}
  // Called after a node's backward, before its slots are released.
  virtual void after_backward_node(Graph& graph, int64_t node, bool retain_graph) = 0;
  virtual void after_backward(Graph& graph, bool retain_graph) = 0;
  // The name of a region still open on the graph ("" when none): backward must not run then.
  virtual std::string open_region() const { return ""; }
  // Called when a node's backward releases one slot early (BackwardContext::release_saved), before
  // the slot goes; never under retain_graph.
  virtual void before_slot_release(Graph& /*graph*/, int64_t /*node*/, size_t /*slot*/) {}
};

// Saved bytes a graph holds (what its saved slots and regions keep alive), now and at most.
struct GraphMemory {
  int64_t current = 0, peak = 0;
};

class Graph {
 public:
  Graph();
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  std::vector<std::unique_ptr<Node>> nodes;
  std::vector<ValueInfo> values;
  std::unique_ptr<SavedTensorHooks> hooks;  // installed by the checkpoint layer when a region opens
  std::unordered_map<const AutogradMeta*, int64_t> leaf_values;  // one value per leaf
  // One import per value of another graph: (graph, value) -> value id here.
  std::unordered_map<const Graph*, std::unordered_map<int64_t, int64_t>> imports;
  std::thread::id owner;  // the thread that records onto it (a graph is not shared between threads)
  // Creation order, over all threads. A graph only imports from older graphs (a lower id), so
  // the shared_ptrs imports hold can never form a cycle.
  const uint64_t id;
  // Set when a backward through this graph threw: its state is then unknown, so backward refuses it.
  std::string failed_backward;

  // The value id of a tensor in this graph, registering leaves, outside tensors and outputs of
  // other graphs (imports) on first use.
  int64_t value_of(const Tensor& t);
  int64_t add_value(const Tensor& t, int64_t producer, int output_index, bool requires_grad);
  void hold(int64_t value, const Tensor& data);
  void release(int64_t value);
  // The data of a kept slot, checking that it was not modified in place since it was saved.
  Tensor unpack(int64_t node, size_t slot);
  // Releases one saved slot of a node whose backward is running (after the checkpoint hooks'
  // before_slot_release); a released slot stays released.
  void release_slot(int64_t node, size_t slot);
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
  GraphMemory memory() const { return {held_bytes_, peak_held_bytes_}; }

 private:
  int64_t held_bytes_ = 0, peak_held_bytes_ = 0;
};

// The sequence number the next recorded node will get (nodes of all graphs share one sequence).
uint64_t next_node_seq();

// The graph that recorded `t` (null for a leaf or a tensor outside autograd).
Graph* graph_of(const Tensor& t);
// Saved bytes held by the graph that recorded `t` (zeros for a leaf).
GraphMemory graph_memory(const Tensor& t);

// The tape of `t`: the nodes of the graph that recorded it and of every graph that graph imports
// from (transitively), in recording order: what one forward recorded even when it started more
// than one graph (each op on leaves alone starts one). Empty for a leaf.
struct TapeNode {
  Graph* graph;
  int64_t index;
};
std::vector<TapeNode> tape_of(const Tensor& t);
// Where a value comes from: imports followed to the graph and value that produced it.
std::pair<Graph*, int64_t> resolve_value(Graph* graph, int64_t value);

// Recording scopes (checkpoint regions): while one is open on this thread, every op recorded on the
// thread goes to one graph, fixed when the first op after the outermost scope opened is recorded.
// Each scope hears of that graph once, just before its first node is appended.
class RecordingScope {
 public:
  virtual ~RecordingScope() = default;
  virtual void begin_on(const std::shared_ptr<Graph>& graph) = 0;
  virtual void close() = 0;  // as the innermost scope
};
void push_recording_scope(RecordingScope* scope);
// Takes `scope` off this thread's stack; throws a clear error (changing nothing) when it is not
// the innermost.
void pop_recording_scope(RecordingScope* scope, const std::string& name);
RecordingScope* innermost_recording_scope();  // null when none is open

// Records `node` applied to `inputs`: runs its forward, and if grad mode is on and an input
// requires grad, appends it to the graph its inputs choose. Returns the outputs. Strong guarantee:
// if anything throws (a policy callback, say), the graph is as it was.
std::vector<Tensor> record(std::unique_ptr<Node> node, const std::vector<Tensor>& inputs);

// While one is alive (on any thread), each recorded op whose first tensor input is on a GPU gets
// events around its forward on that GPU's compute stream (Node::forward_start_event and
// forward_end_event): the budget planner's recording step, whose host times on a GPU would be
// launch times. Off otherwise: two events per op are not free.
class DeviceOpTiming {
 public:
  DeviceOpTiming();
  ~DeviceOpTiming();
  DeviceOpTiming(const DeviceOpTiming&) = delete;
  DeviceOpTiming& operator=(const DeviceOpTiming&) = delete;
  static bool active();
};

// Watches the ops this thread records: the budget planner's recording step, which dates when the
// program lets go of each value the tape saves. before_op runs before each op's forward (also for
// ops that are not recorded); recorded after a node has joined its graph.
struct RecordWatch {
  std::function<void()> before_op;
  std::function<void(const std::shared_ptr<Graph>& graph, int64_t node)> recorded;
};

// Installs a watch on this thread for the scope's lifetime (an enclosing one resumes after it).
class RecordWatchScope {
 public:
  explicit RecordWatchScope(RecordWatch watch);
  ~RecordWatchScope();
  RecordWatchScope(const RecordWatchScope&) = delete;
  RecordWatchScope& operator=(const RecordWatchScope&) = delete;

 private:
  RecordWatch watch_;
  RecordWatch* previous_;
};

}  // namespace remat
