// Region bookkeeping: inputs held, slots dropped at close, replay from the tape, rebuilt data freed.
#include "checkpoint/region.h"

#include <algorithm>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include <chrono>

#include "autograd/grad_mode.h"
#include "autograd/trace.h"
#include "runtime/cuda_backend.h"

namespace remat {

namespace {

thread_local RegionCounters t_totals;

PolicyContext context_of(const Graph& graph, const Node& node, bool is_recompute) {
  PolicyContext ctx;
  ctx.kind = node.kind();
  ctx.op_name = node.name();
  for (int64_t v : node.inputs)
    if (v >= 0) ctx.inputs.push_back({graph.values[v].shape, graph.values[v].dtype, graph.values[v].device});
  for (int64_t v : node.outputs) ctx.outputs.push_back({graph.values[v].shape, graph.values[v].dtype, graph.values[v].device});
  if (!node.outputs.empty()) ctx.tag = graph.values[node.outputs[0]].tag;
  ctx.is_recompute = is_recompute;
  return ctx;
}

int64_t value_bytes(const ValueInfo& v) { return numel_of(v.shape) * static_cast<int64_t>(dtype_size(v.dtype)); }

}  // namespace

RegionCounters checkpoint_counters() { return t_totals; }
void reset_checkpoint_counters() { t_totals = {}; }

RegionManager& RegionManager::of(Graph& graph) {
  if (!graph.hooks) graph.hooks = std::make_unique<RegionManager>();
  auto* manager = dynamic_cast<RegionManager*>(graph.hooks.get());
  REMAT_ASSERT(manager != nullptr, "the graph carries saved-tensor hooks of another kind");
  return *manager;
}

int RegionManager::open(Graph& graph, CheckpointOptions options) {
  Region r;
  r.id = static_cast<int>(regions_.size());
  r.parent = open_.empty() ? -1 : open_.back();
  r.depth = open_.empty() ? 0 : regions_[open_.back()].depth + 1;
  r.begin = static_cast<int64_t>(graph.nodes.size());
  r.options = std::move(options);
  if (r.options.name.empty()) r.options.name = "region" + std::to_string(r.id);
  regions_.push_back(std::move(r));
  open_.push_back(regions_.back().id);
  return regions_.back().id;
}

void RegionManager::on_record(Graph& graph, int64_t node, const std::vector<Tensor>& inputs,
                              const std::vector<Tensor>& outputs) {
  if (open_.empty()) return;
  Node& n = *graph.nodes[node];
  // Each open region asks its policy now, in tape order, while the outputs still exist. Policies
  // are user code: all of them answer before anything changes, so one that throws leaves every
  // region as it was (and record() takes the node back off the tape).
  PolicyContext ctx = context_of(graph, n, false);
  std::vector<Decision> decided;
  for (int id : open_) {
    ctx.position = node - regions_[id].begin;
    decided.push_back(regions_[id].options.policy.decide(ctx));
  }
  n.region = open_.back();
  bool must_save = false;
  for (size_t k = 0; k < open_.size(); ++k) {
    Region& r = regions_[open_[k]];
    Decision d = decided[k];
    r.decisions.push_back(d);
    must_save = must_save || d == Decision::must_save;
    if (is_save(d))
      for (size_t i = 0; i < n.outputs.size(); ++i) {
        r.saved_outputs.push_back({n.outputs[i], SlotState::kept});
        graph.hold(n.outputs[i], outputs[i]);
        // OFFLOAD: the saved copy waits in host memory; its users copy it back (Graph::value_data).
        if (d == Decision::must_offload || d == Decision::prefer_offload) {
          int64_t bytes = graph.offload(n.outputs[i]);
          if (bytes > 0) offload_devices_.insert(outputs[i].device().index);
          r.counters.bytes_offloaded += bytes;
          t_totals.bytes_offloaded += bytes;
        }
      }
  }
  if (must_save) must_saved_.insert(node);
  // A slot whose value an open region will drop at its close is dropped now: nothing holds it
  // through the rest of the region's forward, which matters for regions as large as the model.
  for (size_t s = 0; s < n.saved.size(); ++s) {
    int64_t value = n.saved[s].value, p = graph.values[value].producer;
    for (int id : open_) {
      const Region& r = regions_[id];
      if (p < r.begin) continue;
      Decision d = r.decisions[p - r.begin];
      if (is_save(d) || (!is_must(d) && must_saved_.count(p))) continue;
      if (n.saved[s].state == SlotState::kept) {
        graph.drop_slot(node, s);
        dropped_slots_[value].push_back({node, static_cast<int64_t>(s)});
        if (dropped_values_.insert(value).second) {
          int64_t bytes = value_bytes(graph.values[value]);
          regions_[open_.back()].counters.bytes_dropped += bytes;
          t_totals.bytes_dropped += bytes;
        }
      }
      break;
    }
  }
  for (int id : open_) {
    Region& r = regions_[id];
    ++r.counters.ops_forward;
    if (r.options.debug) r.forward_ops.push_back(n.name());
    // Values produced before the region are its inputs: held so that replay can start from them.
    for (size_t i = 0; i < n.inputs.size(); ++i) {
      int64_t u = n.inputs[i];
      if (u < 0 || graph.values[u].producer >= r.begin) continue;
      bool known = std::any_of(r.inputs.begin(), r.inputs.end(), [u](const RegionInput& in) { return in.value == u; });
      if (known) continue;
      r.inputs.push_back({u, SlotState::kept});
      graph.hold(u, inputs[i]);
    }
  }
  ++t_totals.ops_forward;
}

void RegionManager::on_tag(Graph& graph, int64_t value, const Tensor& data) {
  int64_t p = graph.values[value].producer;
  if (p < 0) return;
  // Policies decide when an op is recorded; a name given afterwards asks the open regions again.
  PolicyContext ctx = context_of(graph, *graph.nodes[p], false);
  ctx.tag = graph.values[value].tag;
  std::vector<Decision> decided;  // all answers first, as in on_record
  for (int id : open_)
    if (p >= regions_[id].begin) {
      ctx.position = p - regions_[id].begin;
      decided.push_back(regions_[id].options.policy.decide(ctx));
    }
  size_t k = 0;
  for (int id : open_) {
    Region& r = regions_[id];
    if (p < r.begin) continue;
    Decision before = r.decisions[p - r.begin];
    Decision after = decided[k++];
    r.decisions[p - r.begin] = after;
    if (after == Decision::must_save) must_saved_.insert(p);
    auto held = std::find_if(r.saved_outputs.begin(), r.saved_outputs.end(),
                             [value](const RegionInput& o) { return o.value == value && o.state == SlotState::kept; });
    if (is_save(after) && held == r.saved_outputs.end()) {
      r.saved_outputs.push_back({value, SlotState::kept});
      graph.hold(value, data);
    } else if (!is_save(after) && is_save(before) && held != r.saved_outputs.end()) {
      held->state = SlotState::released;
      graph.release(value);
    }
  }
}

void RegionManager::close(Graph& graph, int id) {
  REMAT_ASSERT(!open_.empty() && open_.back() == id, "regions must close in the reverse order they opened");
  open_.pop_back();
  Region& r = regions_[id];
  r.end = static_cast<int64_t>(graph.nodes.size());

  // The decision recorded for a producer; a MUST_SAVE of any region outlives a PREFER_RECOMPUTE.
  auto should_drop = [&](int64_t value) {
    int64_t p = graph.values[value].producer;
    if (p < r.begin) return false;  // the region's inputs stay
    Decision d = r.decisions[p - r.begin];
    if (!is_must(d) && must_saved_.count(p)) return false;
    return !is_save(d);
  };
  std::unordered_set<int64_t> dropped_values;
  for (int64_t n = r.begin; n < r.end; ++n) {
    Node& node = *graph.nodes[n];
    for (size_t s = 0; s < node.saved.size(); ++s) {
      if (node.saved[s].state != SlotState::kept || !should_drop(node.saved[s].value)) continue;
      graph.drop_slot(n, s);
      dropped_values.insert(node.saved[s].value);
      dropped_slots_[node.saved[s].value].push_back({n, static_cast<int64_t>(s)});
    }
  }
  // Inputs and saved outputs of nested regions produced inside this one are intermediates here.
  for (size_t d = id + 1; d < regions_.size(); ++d) {
    Region& inner = regions_[d];
    if (inner.begin < r.begin || inner.end > r.end || inner.end < 0) continue;
    for (size_t j = 0; j < inner.inputs.size(); ++j) {
      RegionInput& in = inner.inputs[j];
      if (in.state != SlotState::kept || !should_drop(in.value)) continue;
      in.state = SlotState::dropped;
      graph.release(in.value);
      dropped_values.insert(in.value);
      dropped_slots_[in.value].push_back({-1 - static_cast<int64_t>(d), static_cast<int64_t>(j)});
    }
    for (RegionInput& out : inner.saved_outputs) {
      if (out.state != SlotState::kept || !should_drop(out.value)) continue;
      out.state = SlotState::dropped;  // the inner region's replay re-runs those ops
      graph.release(out.value);
    }
  }
  for (int64_t v : dropped_values) {
    if (!dropped_values_.insert(v).second) continue;  // counted when it was dropped at record time
    r.counters.bytes_dropped += value_bytes(graph.values[v]);
    t_totals.bytes_dropped += value_bytes(graph.values[v]);
  }
}

void RegionManager::hold_rebuilt(Graph& graph, int64_t node, int64_t slot, int64_t value, const Tensor& data) {
  if (!rebuilt_holds_.insert({node, slot}).second) return;
  ValueInfo& v = graph.values[value];
  if (!v.data.defined()) v.version = data.version();  // fresh storage: its own version from now on
  graph.hold(value, data);
}

void RegionManager::release_rebuilt(Graph& graph, int64_t node, int64_t slot, int64_t value) {
  if (rebuilt_holds_.erase({node, slot})) graph.release(value);
}

Tensor RegionManager::unpack_dropped(Graph& graph, int64_t node, size_t slot) {
  const Node& n = *graph.nodes[node];
  int64_t value = n.saved[slot].value;
  if (!available(graph, value)) {
    REMAT_ASSERT(n.region >= 0, "a dropped slot outside every region");
    // Everything this node's backward reads, in one pass.
    std::vector<Target> targets;
    for (size_t s = 0; s < n.saved.size(); ++s)
      if (n.saved[s].state == SlotState::dropped && !available(graph, n.saved[s].value))
        targets.push_back({node, static_cast<int64_t>(s), n.saved[s].value});
    replay(graph, n.region, targets, node);
  }
  REMAT_ASSERT(available(graph, value), "replay of ", regions_[n.region].options.name, " did not rebuild a slot of ",
               n.name());
  return graph.value_data(value);
}

void RegionManager::replay_inputs_of(Graph& graph, int child, int64_t position) {
  const Region& c = regions_[child];
  REMAT_ASSERT(c.parent >= 0, "an input of ", c.options.name, " is gone");
  std::vector<Target> targets;
  for (size_t j = 0; j < c.inputs.size(); ++j)
    if (c.inputs[j].state == SlotState::dropped)
      targets.push_back({-1 - static_cast<int64_t>(child), static_cast<int64_t>(j), c.inputs[j].value});
  replay(graph, c.parent, targets, position);
}

bool RegionManager::pending(const Graph& graph, int id, int64_t owner, int64_t index, int64_t position) const {
  if (rebuilt_holds_.count({owner, index})) return false;  // holds its data already
  if (owner >= 0) {
    const Node& n = *graph.nodes[owner];
    return owner <= position && n.region == id && !n.done && n.saved[index].state == SlotState::dropped;
  }
  const Region& c = regions_[-1 - owner];
  return c.parent == id && c.end >= 0 && c.begin <= position && c.inputs[index].state == SlotState::dropped;
}

void RegionManager::replay(Graph& graph, int id, const std::vector<Target>& targets, int64_t position) {
  Region& r = regions_[id];
  // The nodes the missing targets depend on, walking producers back to available values: saved
  // outputs, kept and rebuilt values, the region's inputs (rebuilt by the outer region when it
  // dropped them).
  std::set<int64_t> needed;
  std::vector<int64_t> stack;
  std::unordered_set<int64_t> visited;
  for (const Target& t : targets)
    if (!available(graph, t.value)) stack.push_back(t.value);
  while (!stack.empty()) {
    int64_t v = stack.back();
    stack.pop_back();
    if (!visited.insert(v).second || available(graph, v)) continue;
    int64_t p = graph.values[v].producer;
    if (p < r.begin) {
      replay_inputs_of(graph, id, position);
      if (!available(graph, v)) fail(r, "cannot rebuild a value produced outside the region (internal error)");
      continue;
    }
    if (!needed.insert(p).second) continue;
    for (int64_t u : graph.nodes[p]->inputs)
      if (u >= 0 && !available(graph, u)) stack.push_back(u);
  }

  // Uses of each value by the nodes still to run, so intermediates are freed after their last use.
  std::unordered_map<int64_t, int> uses;
  for (int64_t p : needed)
    for (int64_t u : graph.nodes[p]->inputs)
      if (u >= 0) ++uses[u];
  std::unordered_map<int64_t, std::vector<const Target*>> targets_of;
  for (const Target& t : targets) targets_of[t.value].push_back(&t);

  // Saved outputs no later replay can need go as soon as this pass has read them for the last time:
  // a whole-model region then trades each saved output that only served to rebuild a value (the
  // residual stream's increments) for the value itself once rebuilt, instead of holding both.
  std::unordered_set<int64_t> release_after_use;
  if (!r.saved_outputs.empty() && whole_region_in_this_backward(graph, id)) {
    std::unordered_map<int64_t, int64_t> will_hold;  // value -> the node it is held for
    auto note_hold = [&](int64_t v, int64_t owner) {
      int64_t until = owner >= 0 ? owner : regions_[-1 - owner].begin;
      auto [it, inserted] = will_hold.emplace(v, until);
      if (!inserted) it->second = std::min(it->second, until);
    };
    for (const Target& t : targets) note_hold(t.value, t.node);
    for (int64_t p : needed)
      for (int64_t v : graph.nodes[p]->outputs) {
        auto waiting = dropped_slots_.find(v);
        if (waiting == dropped_slots_.end()) continue;
        for (auto [owner, index] : waiting->second)
          if (pending(graph, id, owner, index, position)) note_hold(v, owner);
      }
    std::unordered_set<int64_t> still = saved_outputs_still_needed(graph, id, will_hold);
    for (const RegionInput& out : std::vector<RegionInput>(r.saved_outputs)) {
      if (out.state != SlotState::kept || still.count(out.value)) continue;
      auto use = uses.find(out.value);
      if (use != uses.end() && use->second > 0) release_after_use.insert(out.value);
      else release_saved_output(graph, id, out.value);
    }
  }

  // Re-execute them in tape order.
  auto replay_start = std::chrono::steady_clock::now();
  TraceSpan replay_span(r.options.name.c_str(), "replay");
  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::activation);
  std::unordered_map<int64_t, Tensor> rebuilt;
  for (int64_t p : needed) {
    const Node& node = *graph.nodes[p];
    std::vector<Tensor> inputs;
    for (int64_t u : node.inputs) {
      if (u < 0) {
        inputs.emplace_back();
        continue;
      }
      auto found = rebuilt.find(u);
      if (found != rebuilt.end()) {
        inputs.push_back(found->second);
        continue;
      }
      const ValueInfo& info = graph.values[u];
      REMAT_ASSERT(info.data.defined(), "replay input missing");
      if (info.data.version() != info.version)
        fail(r, detail::concat("an input of replayed op ", node.name(), " (", info.meta_str(),
                               ") was modified by an in-place operation after the forward (version ",
                               info.data.version(), ", expected ", info.version, ")"));
      inputs.push_back(graph.value_data(u));
    }
    std::vector<Tensor> outputs;
    {
      TraceSpan span(node.name(), "replay");
      outputs = node.forward(inputs);
    }
    inputs.clear();
    if (r.options.debug) r.replay_ops.push_back(node.name());
    if (outputs.size() != node.outputs.size())
      fail(r, detail::concat("replayed op ", node.name(), " (index ", p - r.begin, " in the region) produced ",
                             outputs.size(), " outputs, the forward recorded ", node.outputs.size()));
    for (size_t i = 0; i < outputs.size(); ++i) {
      int64_t v = node.outputs[i];
      const ValueInfo& info = graph.values[v];
      const Tensor& out = outputs[i];
      if (out.shape() != info.shape || out.dtype() != info.dtype || out.device() != info.device)
        fail(r, detail::concat("replayed op ", node.name(), " (index ", p - r.begin, " in the region) produced output ",
                               i, " as ", out.meta_str(), ", but the forward recorded ", info.meta_str()));
      r.counters.bytes_rebuilt += static_cast<int64_t>(out.nbytes());
      t_totals.bytes_rebuilt += static_cast<int64_t>(out.nbytes());
      // Targets go to their slots at once, and so do other dropped slots of the region still to
      // come in backward that this pass rebuilt on the way (no pass rebuilds a value twice);
      // other outputs stay only while later replayed ops read them.
      auto wanted = targets_of.find(v);
      if (wanted != targets_of.end())
        for (const Target* t : wanted->second) hold_rebuilt(graph, t->node, t->slot, v, out.detach());
      auto waiting = dropped_slots_.find(v);
      if (waiting != dropped_slots_.end())
        for (auto [owner, index] : waiting->second)
          if (pending(graph, id, owner, index, position)) hold_rebuilt(graph, owner, index, v, out.detach());
      if (uses.count(v) && uses[v] > 0) rebuilt[v] = out.detach();
    }
    for (int64_t u : node.inputs)
      if (u >= 0 && --uses[u] == 0) {
        rebuilt.erase(u);
        if (release_after_use.erase(u)) release_saved_output(graph, id, u);
      }
    ++r.counters.ops_replayed;
    ++t_totals.ops_replayed;
    ++r.counters.replayed_by_op[static_cast<int>(node.kind())];
    ++t_totals.replayed_by_op[static_cast<int>(node.kind())];
  }
  if (!r.replayed) {
    ++r.counters.replays;
    ++t_totals.replays;
    r.replayed = true;
  }
  ++r.counters.replay_passes;
  ++t_totals.replay_passes;
  int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - replay_start).count();
  r.counters.replay_ns += ns;
  t_totals.replay_ns += ns;

  // Targets that were available without replay (kept elsewhere) are held for their slots too.
  for (const Target& t : targets) {
    if (rebuilt_holds_.count({t.node, t.slot})) continue;
    REMAT_ASSERT(graph.values[t.value].data.defined(), "a target of the replay of ", r.options.name, " was not rebuilt");
    hold_rebuilt(graph, t.node, t.slot, t.value, graph.values[t.value].data);
  }
}

void RegionManager::before_backward(Graph&, bool retain_graph, int64_t root_value) {
  backward_root_ = root_value;
  backward_retains_ = retain_graph;
  whole_region_.clear();
  // The last copy forward offloaded lands before backward's prefetches start, so the device memory
  // copies hold is one forward copy or backward's prefetches, never both (what the budget
  // planner's simulation counts).
  for (int device : offload_devices_) cuda_wait_copies(device, 0);
}

bool RegionManager::whole_region_in_this_backward(const Graph& graph, int id) {
  if (backward_root_ < 0 || backward_retains_) return false;
  auto cached = whole_region_.find(id);
  if (cached != whole_region_.end()) return cached->second;
  const Region& r = regions_[id];
  // The root's ancestors from the region's start on.
  std::vector<char> ancestor(graph.nodes.size(), 0);
  std::vector<int64_t> stack{backward_root_};
  std::unordered_set<int64_t> seen;
  while (!stack.empty()) {
    int64_t v = stack.back();
    stack.pop_back();
    if (!seen.insert(v).second) continue;
    int64_t p = graph.values[v].producer;
    if (p < r.begin || ancestor[p]) continue;
    ancestor[p] = 1;
    for (int64_t u : graph.nodes[p]->inputs)
      if (u >= 0) stack.push_back(u);
  }
  bool whole = true;
  for (int64_t n = r.begin; n < r.end && whole; ++n) whole = graph.nodes[n]->done || ancestor[n];
  whole_region_[id] = whole;
  return whole;
}

std::unordered_set<int64_t> RegionManager::saved_outputs_still_needed(
    const Graph& graph, int id, const std::unordered_map<int64_t, int64_t>& will_hold) const {
  const Region& r = regions_[id];
  // Runs once per replay pass over the whole tape, so its tables are dense by value id: with hash
  // tables this walk was most of `ops`' host time in backward (gpt2: ~2 ms of a step's 8).
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  const size_t n_values = graph.values.size();
  // Backward runs nodes from the last down. A value held for node N's slot (or kept by N's slot)
  // stays until N's backward is done, so it serves every node M >= N: `until` is the lowest such N.
  std::vector<int64_t> until(n_values, kNever);
  auto note = [&](int64_t v, int64_t node) { until[v] = std::min(until[v], node); };
  for (auto [v, node] : will_hold) note(v, node);
  for (auto [owner, index] : rebuilt_holds_)
    if (owner >= 0) note(graph.nodes[owner]->saved[index].value, owner);
    else note(regions_[-1 - owner].inputs[index].value, regions_[-1 - owner].begin);
  for (int64_t n = r.begin; n < static_cast<int64_t>(graph.nodes.size()); ++n) {
    const Node& node = *graph.nodes[n];
    if (node.done) continue;
    for (const SavedSlot& slot : node.saved)
      if (slot.state == SlotState::kept) note(slot.value, n);
  }
  std::vector<char> is_input(n_values, 0), is_saved(n_values, 0);
  for (const RegionInput& in : r.inputs)
    if (in.state == SlotState::kept) is_input[in.value] = 1;
  for (const RegionInput& out : r.saved_outputs)
    if (out.state == SlotState::kept) is_saved[out.value] = 1;
  auto serves = [&](int64_t v, int64_t node) {
    if (graph.values[v].producer < r.begin || is_input[v]) return true;  // the region's inputs
    return until[v] <= node;
  };
  // Every slot still waiting for its data, walked back to values that serve it: one sweep from
  // the region's last node down, carrying for each value the lowest node that waits for it (a value
  // that serves that node serves every later one). A value's demand is settled at its producer;
  // only values produced earlier are asked for after that, so none is asked for twice.
  std::vector<int64_t> demand(n_values, kNever);  // value -> lowest waiting node
  int64_t outstanding = 0;
  auto wait_for = [&](int64_t v, int64_t node) {
    if (demand[v] == kNever) ++outstanding;
    demand[v] = std::min(demand[v], node);
  };
  for (int64_t n = r.begin; n < r.end; ++n) {
    const Node& node = *graph.nodes[n];
    if (node.done || node.region != id) continue;
    for (const SavedSlot& slot : node.saved)
      if (slot.state == SlotState::dropped) wait_for(slot.value, n);
  }
  for (const Region& c : regions_)
    if (c.parent == id && c.end >= 0 && !all_done(graph, c, -1))
      for (const RegionInput& in : c.inputs)
        if (in.state == SlotState::dropped) wait_for(in.value, c.begin);
  std::unordered_set<int64_t> needed;
  for (int64_t p = r.end - 1; p >= r.begin && outstanding > 0; --p) {
    const Node& node = *graph.nodes[p];
    for (int64_t v : node.outputs) {
      if (demand[v] == kNever) continue;
      const int64_t waiting = demand[v];
      demand[v] = kNever;
      --outstanding;
      if (serves(v, waiting)) continue;
      if (is_saved[v]) {
        needed.insert(v);
        continue;
      }
      for (int64_t u : node.inputs)
        if (u >= 0 && graph.values[u].producer >= r.begin) wait_for(u, waiting);
    }
  }
  return needed;
}

void RegionManager::release_saved_output(Graph& graph, int id, int64_t value) {
  Region& r = regions_[id];
  for (RegionInput& out : r.saved_outputs)
    if (out.value == value && out.state == SlotState::kept) {
      int64_t bytes = value_bytes(graph.values[value]);
      r.counters.bytes_released_early += bytes;
      t_totals.bytes_released_early += bytes;
      graph.release(value);
      out.state = SlotState::released;
      return;
    }
}

// A kept slot about to free the last copy of a value that dropped slots still wait for: hand the
// data over to them instead of rebuilding it later.
void RegionManager::hand_over(Graph& graph, int64_t node, int64_t value) {
  auto waiting = dropped_slots_.find(value);
  if (waiting == dropped_slots_.end()) return;
  for (auto [owner, index] : waiting->second) {
    bool pending = owner >= 0 ? owner < node && graph.nodes[owner]->saved[index].state == SlotState::dropped
                              : regions_[-1 - owner].begin < node;
    if (pending) hold_rebuilt(graph, owner, index, value, graph.values[value].data);
  }
}

void RegionManager::before_slot_release(Graph& graph, int64_t node, size_t s) {
  const SavedSlot& slot = graph.nodes[node]->saved[s];
  release_rebuilt(graph, node, static_cast<int64_t>(s), slot.value);
  if (slot.state != SlotState::kept) return;
  if (graph.values[slot.value].holds == 1) hand_over(graph, node, slot.value);
  release_saved_outputs_done_with(graph, slot.value, 1);
}

void RegionManager::release_saved_outputs_done_with(Graph& graph, int64_t value, int going) {
  const Tensor& data = graph.values[value].data;
  if (!data.defined() || !data.storage()) return;
  // The saved outputs on the slot's storage: the value itself, or the value it is a view of (the
  // loss reads gpt's logits through a reshape).
  std::vector<std::pair<int, int64_t>> holders;  // (region, saved value)
  std::unordered_map<int64_t, int> region_holds;
  for (const Region& r : regions_)
    for (const RegionInput& out : r.saved_outputs)
      if (out.state == SlotState::kept && graph.values[out.value].data.storage() == data.storage()) {
        holders.push_back({r.id, out.value});
        ++region_holds[out.value];
      }
  if (holders.empty()) return;
  // Nothing but the going slots and those regions holds them: no other slot reads them.
  auto own = region_holds.find(value);
  if (graph.values[value].holds != going + (own == region_holds.end() ? 0 : own->second)) return;
  for (auto [u, n] : region_holds)
    if (u != value && graph.values[u].holds != n) return;
  for (auto [id, u] : holders)
    if (whole_region_in_this_backward(graph, id) && !saved_outputs_still_needed(graph, id, {}).count(u))
      release_saved_output(graph, id, u);
}

void RegionManager::after_backward_node(Graph& graph, int64_t node, bool retain_graph) {
  const Node& n = *graph.nodes[node];
  // Device copies of offloaded tensors go as soon as their copies have landed, not at the end of
  // backward: the last ones offloaded in forward would otherwise stay through it, and so would
  // every prefetched copy when the GPU runs behind the host. The host waits for the GPU when more
  // copies than a prefetch window's are in flight, which bounds the device memory they hold.
  constexpr int kCopiesInFlight = 8;
  for (int device : offload_devices_) cuda_wait_copies(device, kCopiesInFlight);
  // Offloaded tensors of the next nodes start back to the GPU now, on the copy stream, while the
  // compute stream runs the nodes in between.
  constexpr int64_t kPrefetchNodes = 4;
  for (int64_t k = node - 1; k >= 0 && k >= node - kPrefetchNodes; --k)
    for (const SavedSlot& slot : graph.nodes[k]->saved)
      if (slot.state == SlotState::kept) graph.prefetch(slot.value);
  for (size_t s = 0; s < n.saved.size(); ++s) release_rebuilt(graph, node, static_cast<int64_t>(s), n.saved[s].value);
  if (!retain_graph)
    for (const SavedSlot& slot : n.saved) {
      if (slot.state != SlotState::kept) continue;
      int own = static_cast<int>(std::count_if(n.saved.begin(), n.saved.end(), [&](const SavedSlot& o) {
        return o.state == SlotState::kept && o.value == slot.value;
      }));
      if (graph.values[slot.value].holds == own) hand_over(graph, node, slot.value);
      release_saved_outputs_done_with(graph, slot.value, own);
    }
  // Backward has passed below the start of these regions: their inputs are needed no more, unless
  // some of their nodes belong to another loss whose backward is still to come.
  for (Region& r : regions_) {
    if (r.begin != node) continue;
    bool finished = !retain_graph && all_done(graph, r, node);
    if (finished)
      for (RegionInput& out : r.saved_outputs) {
        if (out.state == SlotState::kept) graph.release(out.value);
        out.state = SlotState::released;
      }
    for (size_t j = 0; j < r.inputs.size(); ++j) {
      RegionInput& in = r.inputs[j];
      release_rebuilt(graph, -1 - r.id, static_cast<int64_t>(j), in.value);
      if (finished && in.state == SlotState::kept) {
        graph.release(in.value);
        in.state = SlotState::released;
      }
    }
  }
}

void RegionManager::after_backward(Graph& graph, bool retain_graph) {
  backward_root_ = -1;  // a graph a later backward reaches without before_backward releases nothing early
  whole_region_.clear();
  graph.prefetched.clear();  // prefetches for nodes that needed no gradient
  // Only when something was offloaded: polling loads the CUDA part (CUDA's libraries, ~150 MiB of
  // RSS), which a CPU run never needs.
  if (!offload_devices_.empty()) cuda_poll_copies();
  for (auto [node, slot] : std::vector<std::pair<int64_t, int64_t>>(rebuilt_holds_.begin(), rebuilt_holds_.end())) {
    int64_t value = node >= 0 ? graph.nodes[node]->saved[slot].value : regions_[-1 - node].inputs[slot].value;
    release_rebuilt(graph, node, slot, value);
  }
  for (Region& r : regions_) {
    r.replayed = false;
    if (retain_graph || !all_done(graph, r, -1)) continue;
    for (auto* list : {&r.inputs, &r.saved_outputs})
      for (RegionInput& in : *list) {
        if (in.state == SlotState::kept) graph.release(in.value);
        in.state = SlotState::released;
      }
  }
}

bool RegionManager::all_done(const Graph& graph, const Region& r, int64_t finishing) const {
  int64_t end = r.end < 0 ? static_cast<int64_t>(graph.nodes.size()) : r.end;
  for (int64_t n = r.begin; n < end; ++n)
    if (n != finishing && !graph.nodes[n]->done) return false;
  return true;
}

std::string RegionManager::open_region() const { return open_.empty() ? "" : regions_[open_.back()].options.name; }

std::string RegionManager::debug_text(const Region& r) const {
  auto join = [](const std::vector<std::string>& ops) {
    std::string s;
    for (size_t i = 0; i < ops.size(); ++i) s += (i ? ", " : "") + ops[i];
    return s.empty() ? std::string("(none)") : s;
  };
  return "; forward ops: [" + join(r.forward_ops) + "]; replayed ops: [" + join(r.replay_ops) + "]";
}

void RegionManager::fail(const Region& r, const std::string& message) const {
  REMAT_FAIL("checkpoint region '", r.options.name, "': ", message, r.options.debug ? debug_text(r) : std::string());
}

}  // namespace remat
