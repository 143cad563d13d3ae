// Backward: the root's ancestry over every graph it reaches, run in decreasing node sequence;
// gradient accumulation per value; leaf .grad updates; only that ancestry is released.
#include "autograd/engine.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

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

// Leaves may be shared by graphs that run backward on different threads.
std::mutex g_leaf_mutex;

thread_local LeafGradReadyScope* t_leaf_ready = nullptr;

// One graph's part of a backward: its gradients, which of its values lead to the root, where the
// walk is, and whether anything of it ran.
struct GraphWalk {
  Graph* graph;
  std::vector<Tensor> grads;
  std::vector<char> needed;
  int64_t cursor;  // next node to look at (walking down); -1 when done
  bool touched = false;
};

class Backward {
 public:
  Backward(Graph& root_graph, int64_t root_value, uint64_t root_seq, bool retain)
      : retain_(retain), root_seq_(root_seq) {
    add(&root_graph);
    // Every graph the root's graph imports from, transitively: backward may flow into them.
    for (size_t i = 0; i < walks_.size(); ++i)
      for (const auto& [source, values] : walks_[i].graph->imports)
        if (!values.empty()) add(const_cast<Graph*>(source));
    walks_[0].needed[root_value] = 1;
  }

  std::vector<GraphWalk>& walks() { return walks_; }

  // Adds `grad` to value v of graph w: an import passes it on to its source, a leaf to .grad.
  void deposit(size_t w, int64_t v, const Tensor& grad) {
    const ValueInfo& info = walks_[w].graph->values[v];
    if (info.source) {
      deposit(index_of(info.source.get()), info.source_value, grad);
      return;
    }
    if (info.leaf) {
      // Summed in the order the nodes run, whatever graphs the forward was split into.
      auto [it, fresh] = leaf_grads_.try_emplace(info.leaf.get(), info.leaf, Tensor());
      if (fresh) leaf_order_.push_back(info.leaf.get());
      it->second.second = accumulate(it->second.second, grad);
      return;
    }
    walks_[w].grads[v] = accumulate(walks_[w].grads[v], grad);
  }

  void mark_needed(size_t w, int64_t v) {
    const ValueInfo& info = walks_[w].graph->values[v];
    if (info.source) mark_needed(index_of(info.source.get()), info.source_value);
    else if (!info.leaf) walks_[w].needed[v] = 1;
  }

  // The walk whose next node was recorded last, or -1 when all are done.
  int next() const {
    int best = -1;
    uint64_t best_seq = 0;
    for (size_t i = 0; i < walks_.size(); ++i) {
      const GraphWalk& w = walks_[i];
      if (w.cursor < 0) continue;
      uint64_t seq = w.graph->nodes[w.cursor]->seq;
      if (best < 0 || seq > best_seq) best = static_cast<int>(i), best_seq = seq;
    }
    return best;
  }

  // grad(): the gradient reaching value v of graph w is also kept for the caller.
  void capture(size_t w, int64_t v) { captured_[{walks_[w].graph, v}] = Tensor(); }
  Tensor captured(Graph* g, int64_t v) const {
    auto found = captured_.find({g, v});
    return found == captured_.end() ? Tensor() : found->second;
  }
  Tensor leaf_grad(const AutogradMeta* leaf) const {
    auto found = leaf_grads_.find(leaf);
    return found == leaf_grads_.end() ? Tensor() : found->second.second;
  }
  size_t index_of_graph(Graph* g) const {
    auto found = index_.find(g);
    return found == index_.end() ? SIZE_MAX : found->second;
  }

  void run_node(size_t w, int64_t index) {
    GraphWalk& walk = walks_[w];
    Graph& g = *walk.graph;
    Node& node = *g.nodes[index];
    bool in_ancestry = false;
    for (int64_t out : node.outputs) in_ancestry = in_ancestry || walk.needed[out];
    if (!in_ancestry) return;  // another loss's part of the graph: left as it is
    walk.touched = true;
    for (int64_t in : node.inputs)
      if (in >= 0) mark_needed(w, in);
    std::vector<Tensor> grad_outputs(node.outputs.size());
    bool any = false;
    for (size_t i = 0; i < node.outputs.size(); ++i) {
      grad_outputs[i] = std::move(walk.grads[node.outputs[i]]);
      any = any || grad_outputs[i].defined();
      if (!captured_.empty()) {
        auto found = captured_.find({walk.graph, node.outputs[i]});
        if (found != captured_.end()) found->second = grad_outputs[i];
      }
    }
    if (any) {
      std::vector<bool> needs(node.inputs.size());
      for (size_t i = 0; i < node.inputs.size(); ++i)
        needs[i] = node.inputs[i] >= 0 && g.values[node.inputs[i]].requires_grad;
      BackwardContext ctx(g, index, std::move(grad_outputs), needs, retain_);
      // The sums so far of this graph's inputs, moved into the context: a backward may add into
      // one it alone holds (BackwardContext::take_partial_grad). Left undefined here, so that an
      // input that appears twice is offered once.
      std::vector<char> offered(node.inputs.size(), 0);
      for (size_t i = 0; i < node.inputs.size(); ++i) {
        const int64_t v = node.inputs[i];
        if (!needs[i] || g.values[v].source || g.values[v].leaf || !walk.grads[v].defined()) continue;
        ctx.offer_partial_grad(i, std::exchange(walk.grads[v], Tensor()));
        offered[i] = 1;
      }
      std::vector<Tensor> input_grads;
      {
        TraceSpan span(node.name(), "backward");
        input_grads = node.backward(ctx);
      }
      REMAT_CHECK(input_grads.size() == node.inputs.size(), "backward of ", node.name(), " returned ",
                  input_grads.size(), " gradients for its ", node.inputs.size(), " inputs");
      // The sums back first (taken ones as the backward returned them), then the other
      // gradients added to them: an input that appears twice gets both.
      for (size_t i = 0; i < node.inputs.size(); ++i) {
        if (!offered[i]) continue;
        if (!ctx.took_partial_grad(i)) {
          walk.grads[node.inputs[i]] = ctx.untaken_partial_grad(i);
          continue;
        }
        REMAT_CHECK(input_grads[i].defined() && input_grads[i].shape() == g.values[node.inputs[i]].shape &&
                        input_grads[i].dtype() == g.values[node.inputs[i]].dtype,
                    "backward of ", node.name(), " took the partial gradient of input ", i,
                    " and did not return the sum in its place");
        walk.grads[node.inputs[i]] = std::move(input_grads[i]);
      }
      for (size_t i = 0; i < node.inputs.size(); ++i) {
        if (!needs[i] || !input_grads[i].defined() || (offered[i] && ctx.took_partial_grad(i))) continue;
        const ValueInfo& v = g.values[node.inputs[i]];
        REMAT_CHECK(input_grads[i].shape() == v.shape && input_grads[i].dtype() == v.dtype, "backward of ",
                    node.name(), " returned a gradient for input ", i, " as ", input_grads[i].meta_str(),
                    "; expected the input's ", v.meta_str());
        deposit(w, node.inputs[i], input_grads[i]);
      }
    }
    // The hooks go first: they may take over data that releasing these slots would free.
    if (g.hooks) g.hooks->after_backward_node(g, index, retain_);
    if (!retain_) {
      for (SavedSlot& slot : node.saved) {  // those the backward released itself are released already
        if (slot.state == SlotState::kept) g.release(slot.value);
        slot.state = SlotState::released;
      }
      node.done = true;
    }
  }

  // For a LeafGradReadyScope: the last node (lowest sequence number) of this backward that reads
  // each leaf, so that a leaf is known final once the walk has passed it.
  void track_leaves(const LeafGradReadyScope::Fn* ready) {
    ready_ = ready;
    if (!ready_) return;
    // leaf -> (sequence, input position) of its last reader; the position orders leaves of one node
    std::unordered_map<const AutogradMeta*, std::pair<std::pair<uint64_t, size_t>, std::shared_ptr<AutogradMeta>>> last;
    for (const GraphWalk& w : walks_)
      for (int64_t n = w.cursor; n >= 0; --n) {
        const Node& node = *w.graph->nodes[n];
        for (size_t k = 0; k < node.inputs.size(); ++k) {
          int64_t u = node.inputs[k];
          if (u < 0 || !w.graph->values[u].leaf) continue;
          const auto& leaf = w.graph->values[u].leaf;
          auto [it, fresh] = last.try_emplace(leaf.get(), std::pair{node.seq, k}, leaf);
          if (!fresh) it->second.first = std::min(it->second.first, std::pair{node.seq, k});
        }
      }
    for (auto& [key, entry] : last) pending_leaves_.push_back(entry);
    // Highest sequence at the back: the walk passes them in decreasing sequence. Ties (the leaves
    // of one node) by input position, so the order is the same in every process.
    std::sort(pending_leaves_.begin(), pending_leaves_.end(), [](const auto& a, const auto& b) {
      return a.first.first != b.first.first ? a.first.first < b.first.first : a.first.second > b.first.second;
    });
  }

  // After the node with sequence number `seq` ran: the leaves no later node reads are final.
  void after_node(uint64_t seq) {
    while (ready_ && !pending_leaves_.empty() && pending_leaves_.back().first.first >= seq) {
      std::shared_ptr<AutogradMeta> leaf = pending_leaves_.back().second;
      pending_leaves_.pop_back();
      auto found = leaf_grads_.find(leaf.get());
      if (found == leaf_grads_.end() || !found->second.second.defined()) continue;  // not in this root's ancestry
      (*ready_)(leaf.get(), found->second.second);
    }
  }

  void write_leaf_grads() {
    NoGradGuard no_grad;
    MemoryCategoryScope category(MemoryCategory::gradient);
    std::lock_guard lock(g_leaf_mutex);
    for (const AutogradMeta* key : leaf_order_) {
      auto& [meta, grad] = leaf_grads_.at(key);
      Tensor sum = meta->grad ? accumulate(*meta->grad, grad) : std::move(grad);
      grad = Tensor();
      meta->grad = std::make_shared<Tensor>(own_copy(sum));
    }
  }

  uint64_t root_seq() const { return root_seq_; }

 private:
  void add(Graph* g) {
    if (index_.count(g)) return;
    index_[g] = walks_.size();
    GraphWalk w{g, std::vector<Tensor>(g->values.size()), std::vector<char>(g->values.size(), 0), -1};
    // Only nodes recorded before the root can lead to it.
    w.cursor = static_cast<int64_t>(g->nodes.size()) - 1;
    while (w.cursor >= 0 && g->nodes[w.cursor]->seq > root_seq_) --w.cursor;
    walks_.push_back(std::move(w));
  }
  size_t index_of(Graph* g) {
    auto found = index_.find(g);
    REMAT_ASSERT(found != index_.end(), "a graph reached in backward was not collected");
    return found->second;
  }

  bool retain_;
  uint64_t root_seq_;
  std::vector<GraphWalk> walks_;
  std::unordered_map<const Graph*, size_t> index_;
  std::unordered_map<const AutogradMeta*, std::pair<std::shared_ptr<AutogradMeta>, Tensor>> leaf_grads_;
  std::vector<const AutogradMeta*> leaf_order_;
  std::map<std::pair<const Graph*, int64_t>, Tensor> captured_;
  const LeafGradReadyScope::Fn* ready_ = nullptr;
  std::vector<std::pair<std::pair<uint64_t, size_t>, std::shared_ptr<AutogradMeta>>> pending_leaves_;
};

// Seeds and runs a backward from `root`; the walk is left for the caller to read (grad()) or to
// write the leaf gradients (backward()). `prepare` runs on the walk before the first node.
template <typename Prepare>
std::unique_ptr<Backward> run_backward(const Tensor& root, const Tensor& grad, BackwardOptions options,
                                       const char* what, Prepare prepare) {
  REMAT_CHECK(root.defined(), what, ": the root tensor is undefined");
  REMAT_CHECK(root.requires_grad(), what, ": expected a tensor that requires grad, got ", root.meta_str(),
              " that no recorded op produced from a tensor requiring grad");
  const auto& meta = root.autograd_meta_ptr();
  REMAT_CHECK(meta->graph != nullptr, what, ": called on a leaf tensor; its gradient would be the given gradient");
  std::shared_ptr<Graph> graph = meta->graph;  // kept alive through the walk
  Graph& g = *graph;

  Tensor seed = grad;
  if (!seed.defined()) {
    REMAT_CHECK(root.numel() == 1, what, ": a gradient is needed for a non-scalar root ", root.meta_str());
    MemoryCategoryScope category(MemoryCategory::gradient);
    seed = Tensor::ones(root.shape(), root.dtype(), root.device());
  }
  REMAT_CHECK(seed.shape() == root.shape() && seed.dtype() == root.dtype() && seed.device() == root.device(),
              what, ": expected a gradient matching the root ", root.meta_str(), ", got ", seed.meta_str());

  int64_t producer = g.values[meta->value_id].producer;
  auto walk = std::make_unique<Backward>(g, meta->value_id, g.nodes[producer]->seq, options.retain_graph);
  for (GraphWalk& w : walk->walks()) {
    REMAT_CHECK(w.graph->failed_backward.empty(), what, ": an earlier backward through this graph failed (",
                w.graph->failed_backward, "); its state is unknown, so run the forward again");
    std::string open = w.graph->hooks ? w.graph->hooks->open_region() : std::string();
    REMAT_CHECK(open.empty(), what, ": checkpoint region '", open, "' is still open on this graph; close it (leave ",
                "its CheckpointScope or module forward) before backward");
  }
  prepare(*walk);
  for (GraphWalk& w : walk->walks())
    if (w.graph->hooks) w.graph->hooks->before_backward(*w.graph, options.retain_graph, w.graph == &g ? meta->value_id : -1);

  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::gradient);
  try {
    walk->deposit(0, meta->value_id, seed.detach());
    for (int w; (w = walk->next()) >= 0;) {
      GraphWalk& current = walk->walks()[w];
      int64_t index = current.cursor--;
      walk->run_node(static_cast<size_t>(w), index);
      walk->after_node(current.graph->nodes[index]->seq);
    }
    for (GraphWalk& w : walk->walks())
      if (w.touched && w.graph->hooks) w.graph->hooks->after_backward(*w.graph, options.retain_graph);
  } catch (const std::exception& e) {
    // The graphs are half run: no leaf gradient was written, and backward through them is refused.
    for (GraphWalk& w : walk->walks())
      if (w.touched || w.graph == &g) w.graph->failed_backward = e.what();
    throw;
  }
  return walk;
}

}  // namespace

LeafGradReadyScope::LeafGradReadyScope(Fn ready) : fn_(std::move(ready)), outer_(t_leaf_ready) { t_leaf_ready = this; }
LeafGradReadyScope::~LeafGradReadyScope() { t_leaf_ready = outer_; }
const LeafGradReadyScope::Fn* current_leaf_grad_ready() { return t_leaf_ready ? &t_leaf_ready->fn_ : nullptr; }

void backward(const Tensor& root, const Tensor& grad, BackwardOptions options) {
  const LeafGradReadyScope::Fn* ready = current_leaf_grad_ready();
  run_backward(root, grad, options, "backward", [ready](Backward& b) { b.track_leaves(ready); })->write_leaf_grads();
}

std::vector<Tensor> grad(const Tensor& root, const std::vector<Tensor>& inputs, const Tensor& grad,
                         BackwardOptions options) {
  for (size_t i = 0; i < inputs.size(); ++i)
    REMAT_CHECK(inputs[i].defined() && inputs[i].requires_grad(), "grad: input ", i,
                " must be a tensor that requires grad, got ",
                inputs[i].defined() ? inputs[i].meta_str() : std::string("an undefined tensor"));
  auto walk = run_backward(root, grad, options, "grad", [&](Backward& b) {
    for (const Tensor& t : inputs) {
      Graph* g = graph_of(t);
      if (!g) continue;  // a leaf: read from the leaf sums
      size_t w = b.index_of_graph(g);
      if (w != SIZE_MAX) b.capture(w, t.autograd_meta_ptr()->value_id);
    }
  });
  MemoryCategoryScope category(MemoryCategory::gradient);
  std::vector<Tensor> out;
  for (const Tensor& t : inputs) {
    Graph* g = graph_of(t);
    Tensor got = g ? walk->captured(g, t.autograd_meta_ptr()->value_id) : walk->leaf_grad(t.autograd_meta_ptr().get());
    out.push_back(got.defined() ? own_copy(got) : got);
  }
  return out;
}

}  // namespace remat
