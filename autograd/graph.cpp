// Recording onto the tape, value bookkeeping and saved-slot unpacking.
#include "autograd/graph.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <utility>

#include "runtime/cuda_backend.h"

#include "autograd/grad_mode.h"
#include "autograd/trace.h"

namespace remat {

const char* slot_state_name(SlotState s) {
  switch (s) {
    case SlotState::kept: return "kept";
    case SlotState::dropped: return "dropped";
    case SlotState::offloaded: return "offloaded";
    case SlotState::released: return "released";
  }
  return "?";
}

std::string ValueInfo::meta_str() const {
  return std::string(dtype_name(dtype)) + shape_str(shape) + " on " + device.str();
}

Tensor BackwardContext::saved(size_t slot) const { return graph_.unpack(node_, slot); }

Tensor BackwardContext::take_partial_grad(size_t i) const {
  REMAT_CHECK(partials_[i].defined(), "backward: no partial gradient of input ", i, " to take");
  taken_[i] = true;
  return std::exchange(partials_[i], Tensor());
}

void BackwardContext::offer_partial_grad(size_t i, Tensor partial) {
  partials_[i] = std::move(partial);
  taken_[i] = false;
}

void BackwardContext::release_saved(size_t slot) const {
  if (!retain_graph_) graph_.release_slot(node_, slot);
}

namespace {

std::atomic<uint64_t> g_node_seq{1};
std::atomic<uint64_t> g_graph_ids{1};

// The recording scopes open on this thread, innermost last, and the graph they record onto once
// the first op inside them has chosen it (how many of them have heard of it: `begun`).
struct ScopeStack {
  std::vector<RecordingScope*> scopes;
  size_t begun = 0;
  std::shared_ptr<Graph> graph;
};
thread_local ScopeStack t_scopes;

}  // namespace

Graph::Graph() : owner(std::this_thread::get_id()), id(g_graph_ids.fetch_add(1)) {}

Graph::~Graph() = default;

uint64_t next_node_seq() { return g_node_seq.load(); }

namespace {
std::atomic<int> g_device_op_timing{0};
}  // namespace

DeviceOpTiming::DeviceOpTiming() { g_device_op_timing.fetch_add(1); }
DeviceOpTiming::~DeviceOpTiming() { g_device_op_timing.fetch_sub(1); }
bool DeviceOpTiming::active() { return g_device_op_timing.load() > 0; }

namespace {
thread_local RecordWatch* t_record_watch = nullptr;
}  // namespace

RecordWatchScope::RecordWatchScope(RecordWatch watch) : watch_(std::move(watch)), previous_(t_record_watch) {
  t_record_watch = &watch_;
}
RecordWatchScope::~RecordWatchScope() { t_record_watch = previous_; }

Graph* graph_of(const Tensor& t) {
  const auto& meta = t.autograd_meta_ptr();
  return meta ? meta->graph.get() : nullptr;
}

GraphMemory graph_memory(const Tensor& t) {
  Graph* g = graph_of(t);
  return g ? g->memory() : GraphMemory{};
}

std::pair<Graph*, int64_t> resolve_value(Graph* graph, int64_t value) {
  while (graph->values[value].source) {
    const ValueInfo& v = graph->values[value];
    graph = v.source.get(), value = v.source_value;
  }
  return {graph, value};
}

std::vector<TapeNode> tape_of(const Tensor& t) {
  std::vector<TapeNode> tape;
  Graph* root = graph_of(t);
  if (!root) return tape;
  std::vector<Graph*> graphs{root};
  for (size_t i = 0; i < graphs.size(); ++i)
    for (const auto& [source, values] : graphs[i]->imports)
      if (!values.empty() && std::find(graphs.begin(), graphs.end(), source) == graphs.end())
        graphs.push_back(const_cast<Graph*>(source));
  for (Graph* g : graphs)
    for (int64_t n = 0; n < static_cast<int64_t>(g->nodes.size()); ++n) tape.push_back({g, n});
  std::sort(tape.begin(), tape.end(), [](const TapeNode& a, const TapeNode& b) {
    return a.graph->nodes[a.index]->seq < b.graph->nodes[b.index]->seq;
  });
  return tape;
}

void push_recording_scope(RecordingScope* scope) { t_scopes.scopes.push_back(scope); }

RecordingScope* innermost_recording_scope() { return t_scopes.scopes.empty() ? nullptr : t_scopes.scopes.back(); }

void pop_recording_scope(RecordingScope* scope, const std::string& name) {
  ScopeStack& s = t_scopes;
  REMAT_CHECK(!s.scopes.empty() && s.scopes.back() == scope, "checkpoint region '", name,
              "' closed while a region opened after it is still open: regions must close in the reverse order they ",
              "opened (", s.scopes.size(), " open on this thread)");
  s.scopes.pop_back();
  s.begun = std::min(s.begun, s.scopes.size());
  if (s.scopes.empty()) s.graph.reset();
}

int64_t Graph::add_value(const Tensor& t, int64_t producer, int output_index, bool requires_grad) {
  ValueInfo v;
  v.shape = t.shape();
  v.dtype = t.dtype();
  v.device = t.device();
  v.producer = producer;
  v.output_index = output_index;
  v.requires_grad = requires_grad;
  v.version = t.version();
  v.tag = t.tag();
  values.push_back(std::move(v));
  return static_cast<int64_t>(values.size()) - 1;
}

int64_t Graph::value_of(const Tensor& t) {
  const auto& meta = t.autograd_meta_ptr();
  if (meta && meta->graph.get() == this) return meta->value_id;
  if (meta && meta->graph) {
    // An output of another graph: imported once; backward hands its gradient over there.
    auto& from = imports[meta->graph.get()];
    auto found = from.find(meta->value_id);
    if (found != from.end()) return found->second;
    int64_t id = add_value(t, -1, 0, t.requires_grad());
    values[id].source = meta->graph;
    values[id].source_value = meta->value_id;
    from[meta->value_id] = id;
    return id;
  }
  if (t.requires_grad()) {
    // One value per leaf, so that its gradient is summed once and a region holds it once.
    auto found = leaf_values.find(meta.get());
    if (found != leaf_values.end()) return found->second;
    int64_t id = add_value(t, -1, 0, true);
    values[id].leaf = meta;
    leaf_values[meta.get()] = id;
    return id;
  }
  return add_value(t, -1, 0, false);
}

void Graph::hold(int64_t value, const Tensor& data) {
  ValueInfo& v = values[value];
  if (v.holds++ == 0) {
    v.data = data.detach();
    held_bytes_ += static_cast<int64_t>(v.data.nbytes());
    peak_held_bytes_ = std::max(peak_held_bytes_, held_bytes_);
  }
}

void Graph::release(int64_t value) {
  ValueInfo& v = values[value];
  REMAT_ASSERT(v.holds > 0, "release of value ", value, " that nothing holds");
  if (--v.holds == 0) {
    held_bytes_ -= static_cast<int64_t>(v.data.nbytes());
    v.data = Tensor();
    prefetched.erase(value);
  }
}

void Graph::release_slot(int64_t node, size_t slot) {
  SavedSlot& s = nodes[node]->saved.at(slot);
  if (s.state == SlotState::released) return;
  // The hooks go first: they may take over data that releasing the slot would free.
  if (hooks) hooks->before_slot_release(*this, node, slot);
  if (s.state == SlotState::kept) release(s.value);
  s.state = SlotState::released;
}

Tensor Graph::unpack(int64_t node, size_t slot) {
  Node& n = *nodes[node];
  REMAT_CHECK(slot < n.saved.size(), "backward of ", n.name(), " asked for saved tensor ", slot, ", but it saves ",
              n.saved.size());
  const SavedSlot& s = n.saved[slot];
  switch (s.state) {
    case SlotState::kept: {
      const ValueInfo& v = values[s.value];
      REMAT_ASSERT(v.data.defined(), "kept slot without data");
      REMAT_CHECK(v.data.version() == v.version, "backward of ", n.name(), " (node ", node,
                  "): a tensor it saved (", v.meta_str(), ") was modified by an in-place operation after it was ",
                  "saved (version ", v.data.version(), ", expected ", v.version, ")");
      return value_data(s.value);
    }
    case SlotState::released:
      REMAT_FAIL("backward through the graph a second time: the saved tensors of ", n.name(), " (node ", node,
                 ") were freed by an earlier backward; pass retain_graph=true to that backward to run it twice");
    case SlotState::dropped:
    case SlotState::offloaded:
      REMAT_ASSERT(hooks != nullptr, "a slot is ", slot_state_name(s.state), " but no checkpoint layer is installed");
      return hooks->unpack_dropped(*this, node, slot);
  }
  return Tensor();
}

namespace {

// What an asynchronous copy keeps alive until it has finished: the storage of both its ends.
std::shared_ptr<const void> both_ends(const Tensor& src, const Tensor& dst) {
  return std::make_shared<std::pair<std::shared_ptr<Storage>, std::shared_ptr<Storage>>>(src.storage(), dst.storage());
}

}  // namespace

int64_t Graph::offload(int64_t value) {
  ValueInfo& v = values[value];
  if (!v.data.defined() || v.data.device().is_cpu()) return 0;
  Tensor src = v.data.is_contiguous() ? v.data : v.data.as_contiguous();
  Tensor host = Tensor::empty_pinned(v.shape, v.dtype);
  // Both ends stay alive until the copy has finished (the device copy until it has been read);
  // from then on only the host copy is held.
  cuda_copy_async(host.raw_data(), src.raw_data(), src.nbytes(), src.device().index, false,
                  both_ends(src, host));
  v.data = host;
  v.version = host.version();  // the host copy's own counter from now on
  // The device copy is freed only once its copy has run. When the GPU runs behind the host (a
  // large model: the host queues far ahead), the copies of every offload so far would otherwise
  // wait together, each holding its device copy, and offload would save nothing. So the host waits
  // here until the earlier offloads' copies have landed: one copy in flight at a time.
  cuda_wait_copies(src.device().index, 1);
  return static_cast<int64_t>(host.nbytes());
}

namespace {

// A device copy of an offloaded value, arriving on the copy stream by the ticket's event.
std::pair<Tensor, CopyTicket> copy_back(const ValueInfo& v) {
  MemoryCategoryScope category(MemoryCategory::activation);
  Tensor dev = Tensor::empty(v.shape, v.dtype, v.device);
  // The destination is kept too: a prefetch dropped before it is used (a released value, the end
  // of backward) must not hand the block back to the allocator while the copy still writes to it.
  CopyTicket ticket = cuda_copy_async(dev.raw_data(), v.data.raw_data(), v.data.nbytes(), v.device.index, true,
                                      both_ends(v.data, dev));
  return {dev, ticket};
}

}  // namespace

Tensor Graph::value_data(int64_t value) {
  if (!is_offloaded(value)) return values[value].data;
  auto found = prefetched.find(value);
  auto [dev, ticket] = found != prefetched.end() ? std::move(found->second) : copy_back(values[value]);
  if (found != prefetched.end()) prefetched.erase(found);
  cuda_wait(ticket);  // the kernels that read it run after it has arrived
  return dev;
}

void Graph::prefetch(int64_t value) {
  if (!is_offloaded(value) || prefetched.count(value)) return;
  prefetched[value] = copy_back(values[value]);
}

void Graph::drop_slot(int64_t node, size_t slot) {
  SavedSlot& s = nodes[node]->saved[slot];
  if (s.state != SlotState::kept) return;
  s.state = SlotState::dropped;
  release(s.value);
}

Tensor checkpoint_name(Tensor t, const std::string& name) {
  AutogradMeta& meta = t.autograd_meta();
  meta.tag = name;
  if (Graph* g = meta.graph.get()) {
    g->values[meta.value_id].tag = name;
    if (g->hooks) g->hooks->on_tag(*g, meta.value_id, t);
  }
  return t;
}

namespace {

// The graph an op with these inputs records onto, keeping imports pointing at older graphs only:
// the open scopes' graph (checked: no input may come from a newer graph); else the newest of the
// inputs' graphs, when this thread recorded it; else a new one. Scopes pin a graph only if it is
// the newest in existence (no graph can import from it then), else a new one. Scopes that have
// not heard of their graph yet hear of it now.
std::shared_ptr<Graph> graph_for(const std::vector<Tensor>& inputs) {
  ScopeStack& s = t_scopes;
  std::shared_ptr<Graph> newest;
  for (const Tensor& t : inputs) {
    const auto& meta = t.defined() ? t.autograd_meta_ptr() : nullptr;
    if (meta && meta->graph && (!newest || meta->graph->id > newest->id)) newest = meta->graph;
  }
  std::shared_ptr<Graph> graph = s.graph;
  if (graph) {
    REMAT_CHECK(!newest || newest->id <= graph->id, "an op inside a checkpoint region read a tensor recorded on ",
                "another thread after the region began; share such tensors before the region, or detach them");
  } else {
    if (newest && newest->owner == std::this_thread::get_id()) graph = newest;
    if (graph && !s.scopes.empty() && graph->id != g_graph_ids.load() - 1) graph.reset();
    if (!graph) graph = std::make_shared<Graph>();
  }
  if (!s.scopes.empty()) {
    s.graph = graph;
    for (; s.begun < s.scopes.size(); ++s.begun) s.scopes[s.begun]->begin_on(graph);
  }
  return graph;
}

}  // namespace

std::vector<Tensor> record(std::unique_ptr<Node> node, const std::vector<Tensor>& inputs) {
  bool needs_grad = false;
  if (grad_enabled())
    for (const Tensor& t : inputs) needs_grad = needs_grad || (t.defined() && t.requires_grad());
  if (t_record_watch && t_record_watch->before_op) t_record_watch->before_op();
  std::vector<Tensor> outputs;
  {
    NoGradGuard no_grad;  // forward is pure kernels; nothing inside is recorded
    TraceSpan span(node->name(), "forward");
    int timed_gpu = -1;  // with DeviceOpTiming: the GPU whose stream the events go on
    if (DeviceOpTiming::active())
      for (const Tensor& t : inputs)
        if (t.defined()) {
          if (t.device().is_cuda()) timed_gpu = t.device().index;
          break;
        }
    std::shared_ptr<void> start_event = timed_gpu >= 0 ? cuda_record_event(timed_gpu) : nullptr;
    auto start = std::chrono::steady_clock::now();
    outputs = node->forward(inputs);
    node->forward_us = std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (start_event) {
      node->forward_start_event = std::move(start_event);
      node->forward_end_event = cuda_record_event(timed_gpu);
    }
  }
  for (Tensor& out : outputs) out = out.detach();  // fresh autograd state, even for views and pass-throughs
  if (!needs_grad) return outputs;

  size_t n_in = inputs.size();
  std::vector<int> saved = node->saved_indices(n_in);
  for (int idx : saved) {
    REMAT_CHECK(idx >= 0 && static_cast<size_t>(idx) < n_in + outputs.size(), node->name(), ": saves index ", idx,
                " but has ", n_in, " inputs and ", outputs.size(), " outputs");
    REMAT_CHECK(static_cast<size_t>(idx) >= n_in || inputs[idx].defined(), node->name(), ": saves input ", idx,
                " for backward, but that input is undefined");
  }
  std::shared_ptr<Graph> graph = graph_for(inputs);
  Graph& g = *graph;
  const size_t values_before = g.values.size();
  const int64_t index = static_cast<int64_t>(g.nodes.size());
  Node* n = node.get();
  bool appended = false;
  try {
    for (const Tensor& t : inputs) n->inputs.push_back(t.defined() ? g.value_of(t) : -1);
    for (size_t i = 0; i < outputs.size(); ++i) {
      bool differentiable = n->output_differentiable(i) && is_floating(outputs[i].dtype());
      int64_t id = g.add_value(outputs[i], index, static_cast<int>(i), differentiable);
      AutogradMeta& meta = outputs[i].autograd_meta();
      meta.requires_grad = differentiable;
      meta.graph = graph;
      meta.value_id = id;
      n->outputs.push_back(id);
    }
    for (int idx : saved) {
      const Tensor& t = static_cast<size_t>(idx) < n_in ? inputs[idx] : outputs[idx - n_in];
      int64_t value = static_cast<size_t>(idx) < n_in ? n->inputs[idx] : n->outputs[idx - n_in];
      g.hold(value, t);
      n->saved.push_back({value, SlotState::kept});
    }
    n->seq = g_node_seq.fetch_add(1);
    g.nodes.push_back(std::move(node));
    appended = true;
    if (g.hooks) g.hooks->on_record(g, index, inputs, outputs);
    if (t_record_watch && t_record_watch->recorded) t_record_watch->recorded(graph, index);
  } catch (...) {
    // Undo: the node, its holds, and every value it added (leaves and imports registered for it).
    if (appended) {
      node = std::move(g.nodes.back());  // keeps `n` alive for the rest of the undo
      g.nodes.pop_back();
    }
    for (const SavedSlot& slot : n->saved)
      if (slot.state == SlotState::kept && g.values[slot.value].holds > 0) g.release(slot.value);
    for (size_t v = values_before; v < g.values.size(); ++v) {
      const ValueInfo& info = g.values[v];
      if (info.leaf) g.leaf_values.erase(info.leaf.get());
      if (info.source) g.imports[info.source.get()].erase(info.source_value);
    }
    g.values.resize(values_before);
    throw;
  }
  return outputs;
}

}  // namespace remat
