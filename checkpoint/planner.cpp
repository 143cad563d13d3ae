// The budget planner: record, build each block's options, search, place.
#include "checkpoint/planner.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "autograd/engine.h"
#include "autograd/graph.h"
#include "checkpoint/apply.h"
#include "runtime/cuda_backend.h"

namespace remat {

namespace {

int64_t value_bytes(const ValueInfo& v) { return numel_of(v.shape) * static_cast<int64_t>(dtype_size(v.dtype)); }

struct Span {
  std::string name;
  Module* module;
  int64_t begin = -1, end = -1;         // node sequence numbers
  size_t first_event = 0, end_event = 0;  // allocator timeline indices
  double ms = 0;
};

// Block containers and their blocks, in tree order (the order a chain model runs them).
void collect_blocks(Module& m, std::vector<Span>& out) {
  for (auto& [path, container] : find_named_block_containers(m))
    for (auto& [index, block] : container->children()) out.push_back({path + "." + index, block.get()});
}

// A value is known by the graph and value that produced it, whatever graph reads it.
using Key = std::pair<Graph*, int64_t>;

int64_t seq_of(const Key& k) {
  int64_t producer = k.first->values[k.second].producer;
  return producer < 0 ? int64_t{-1} : static_cast<int64_t>(k.first->nodes[producer]->seq);
}

// Bytes that values hold in memory, added up once per storage: values sharing one (a view and its
// base, the heads split from one projection) count it once, at the storage's size. A value whose
// data the step no longer holds counts its own size.
class HeldBytes {
 public:
  // Adds a value; returns the bytes that adds (0 for a storage counted already).
  int64_t add(const Key& k) {
    const ValueInfo& v = k.first->values[k.second];
    int64_t bytes = 0;
    if (!v.data.defined() || !v.data.storage()) bytes = value_bytes(v);
    else if (storages_.insert(v.data.storage().get()).second) bytes = static_cast<int64_t>(v.data.storage()->bytes());
    total_ += bytes;
    return bytes;
  }
  int64_t total() const { return total_; }

 private:
  std::set<const Storage*> storages_;
  int64_t total_ = 0;
};

// What a step's activations are: not the parameters.
bool counts(const Key& k) {
  const ValueInfo& v = k.first->values[k.second];
  return v.producer >= 0 || !v.leaf;
}

// A block as recorded: its nodes in recording order, its non-parameter inputs, the values its
// nodes save, and which node produced each of its values.
struct BlockTape {
  std::vector<TapeNode> nodes;
  std::set<Key> inputs, saved;
  std::map<Key, size_t> producer_of;
  const Node& node(size_t i) const { return *nodes[i].graph->nodes[nodes[i].index]; }
};

// The bytes, rebuilds and time of recomputing the nodes marked in `recompute`: the block keeps its
// inputs, the outputs of the nodes it saves and the saved slots those cover; replay rebuilds the
// other saved slots, re-running their producers back to kept values, and allocates their outputs.
BlockOption option_cost(const BlockTape& b, std::vector<bool> recompute) {
  std::set<Key> kept = b.inputs, rebuilt;
  for (size_t i = 0; i < b.nodes.size(); ++i) {
    if (recompute[i]) continue;
    for (int64_t v : b.node(i).outputs)
      if (counts({b.nodes[i].graph, v})) kept.insert({b.nodes[i].graph, v});
  }
  for (const Key& k : b.saved) (b.producer_of.count(k) && !kept.count(k) ? rebuilt : kept).insert(k);
  std::vector<char> needed(b.nodes.size(), 0);
  std::vector<Key> stack(rebuilt.begin(), rebuilt.end());
  while (!stack.empty()) {
    Key k = stack.back();
    stack.pop_back();
    auto found = b.producer_of.find(k);
    if (found == b.producer_of.end() || kept.count(k) || needed[found->second]) continue;
    needed[found->second] = 1;
    for (int64_t u : b.node(found->second).inputs)
      if (u >= 0) stack.push_back(resolve_value(b.nodes[found->second].graph, u));
  }
  // A saved op whose outputs no backward node reads and no replay re-runs from costs bytes and
  // buys nothing: it is dropped too (the region lets it go; replay never asks for it).
  std::set<Key> read_by_replay;
  for (size_t i = 0; i < b.nodes.size(); ++i)
    if (needed[i])
      for (int64_t u : b.node(i).inputs)
        if (u >= 0) read_by_replay.insert(resolve_value(b.nodes[i].graph, u));
  for (size_t i = 0; i < b.nodes.size(); ++i) {
    if (recompute[i]) continue;
    bool unused = true;
    for (int64_t v : b.node(i).outputs) {
      Key k{b.nodes[i].graph, v};
      unused = unused && (!counts(k) || (!b.saved.count(k) && !read_by_replay.count(k)));
    }
    if (!unused) continue;
    recompute[i] = true;
    for (int64_t v : b.node(i).outputs) kept.erase({b.nodes[i].graph, v});
  }
  BlockOption o;
  HeldBytes held;
  for (const Key& k : kept) {
    held.add(k);
    // Saved outputs no backward reads stay alive in forward too, on top of what it held without checkpointing.
    if (!b.saved.count(k) && !b.inputs.count(k)) o.extra_forward_bytes += value_bytes(k.first->values[k.second]);
  }
  // A kept view keeps its base's storage: a view kept beside a base that is rebuilt costs both.
  o.kept_bytes = held.total();
  // The replay re-run as one pass in tape order: rebuilt slots stay, other outputs go after their
  // last use in the pass; its peak bounds what the passes of per-node replay hold.
  std::map<Key, int> uses;
  for (size_t i = 0; i < b.nodes.size(); ++i)
    if (needed[i])
      for (int64_t u : b.node(i).inputs)
        if (u >= 0) ++uses[resolve_value(b.nodes[i].graph, u)];
  int64_t alive = 0;
  for (size_t i = 0; i < b.nodes.size(); ++i) {
    if (!needed[i]) continue;
    for (int64_t v : b.node(i).outputs) {
      Key k{b.nodes[i].graph, v};
      if (!kept.count(k)) alive += value_bytes(k.first->values[k.second]);
    }
    o.rebuilt_bytes = std::max(o.rebuilt_bytes, alive);
    for (int64_t v : b.node(i).outputs) {  // outputs nothing reads: gone at once
      Key k{b.nodes[i].graph, v};
      if (!kept.count(k) && !rebuilt.count(k) && !uses.count(k)) alive -= value_bytes(k.first->values[k.second]);
    }
    for (int64_t u : b.node(i).inputs) {
      if (u < 0) continue;
      Key k = resolve_value(b.nodes[i].graph, u);
      if (--uses[k] == 0 && b.producer_of.count(k) && !kept.count(k) && !rebuilt.count(k))
        alive -= value_bytes(k.first->values[k.second]);
    }
  }
  for (size_t i = 0; i < b.nodes.size(); ++i)
    if (needed[i]) o.recompute_ms += b.node(i).forward_us / 1000.0;
  o.recompute = std::move(recompute);
  o.reruns.assign(needed.begin(), needed.end());
  return o;
}

// How cheap an op is to recompute: 1 shape and pointwise ops (dropout and casts included), 2 norms
// and reductions, 3 matrix products and convolutions, 4 the rest (attention, cross-entropy, custom).
int op_class(OpKind op) {
  switch (op) {
    case OpKind::layer_norm: case OpKind::group_norm: case OpKind::softmax: case OpKind::sum: case OpKind::mean:
    case OpKind::max: case OpKind::embedding: case OpKind::upsample_nearest: case OpKind::avg_pool:
    case OpKind::timestep_embedding:
      return 2;
    case OpKind::matmul: case OpKind::linear: case OpKind::conv2d:
      return 3;
    case OpKind::attention: case OpKind::cross_entropy: case OpKind::custom:
      return 4;
    default:
      return 1;
  }
}

bool is_view(OpKind op) {
  return op == OpKind::reshape || op == OpKind::permute || op == OpKind::slice || op == OpKind::expand ||
         op == OpKind::split;
}

// "all" when every op is dropped, else what replay re-runs ("3 of 21 ops: layer_norm, gelu").
std::string option_name(const BlockTape& b, const BlockOption& o) {
  if (std::count(o.recompute.begin(), o.recompute.end(), true) == static_cast<std::ptrdiff_t>(b.nodes.size()))
    return "all";
  size_t n = std::count(o.reruns.begin(), o.reruns.end(), true);
  std::string kinds;
  std::set<std::string> seen;
  for (size_t i = 0; i < b.nodes.size(); ++i)
    if (o.reruns[i] && seen.insert(b.node(i).name()).second)
      kinds += (kinds.empty() ? "" : ", ") + std::string(b.node(i).name());
  return std::to_string(n) + " of " + std::to_string(b.nodes.size()) + " ops: " + kinds;
}

// The block's options: keep; every prefix of its ops ordered by recorded time per output byte
// (views first, as they cost no memory of their own); the op classes cumulatively. Options another
// one beats in kept bytes, replay peak and time are dropped, and so are those keeping no less than
// the block without checkpointing.
std::vector<BlockOption> block_options(const BlockTape& b, int64_t saved_bytes) {
  const size_t n = b.nodes.size();
  std::vector<std::vector<bool>> sets;
  std::vector<double> score(n);
  for (size_t i = 0; i < n; ++i) {
    const Node& node = b.node(i);
    int64_t bytes = 0;
    for (int64_t v : node.outputs) bytes += value_bytes(b.nodes[i].graph->values[v]);
    score[i] = is_view(node.kind()) ? -1.0 : node.forward_us / static_cast<double>(std::max<int64_t>(bytes, 1));
  }
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t c) { return score[a] < score[c]; });
  std::vector<bool> prefix(n, false);
  for (size_t k = 0; k < n; ++k) {
    prefix[order[k]] = true;
    sets.push_back(prefix);
  }
  for (int cls = 1; cls <= 3; ++cls) {
    std::vector<bool> set(n);
    for (size_t i = 0; i < n; ++i) set[i] = op_class(b.node(i).kind()) <= cls;
    sets.push_back(set);
  }
  std::vector<BlockOption> candidates;
  auto consider = [&](const std::vector<bool>& set) {
    if (std::count(set.begin(), set.end(), true) == 0) return;
    BlockOption o = option_cost(b, set);
    // Keeping the block beats an option that keeps as much (it saves outputs no backward reads).
    if (o.kept_bytes < saved_bytes) candidates.push_back(std::move(o));
  };
  for (auto& set : sets) consider(set);
  // By what is dropped rather than by op: the ops whose outputs the block's backward reads are the
  // units; an option keeps some of them and re-runs whatever rebuilding the others needs, back to
  // kept values. Every subset where there are few units (gpt: 10), else a greedy walk that drops
  // next the unit whose recompute time grows least per byte it frees.
  std::vector<size_t> units;
  for (size_t i = 0; i < n; ++i)
    for (int64_t v : b.node(i).outputs)
      if (b.saved.count({b.nodes[i].graph, v})) {
        units.push_back(i);
        break;
      }
  auto dropping = [&](const std::vector<bool>& dropped) {  // dropped[u]: unit u recomputed
    std::vector<bool> set(n, true);
    for (size_t u = 0; u < units.size(); ++u) set[units[u]] = dropped[u];
    return set;
  };
  constexpr size_t kExhaustiveUnits = 12;
  if (units.size() <= kExhaustiveUnits) {
    for (uint32_t mask = 1; mask < (1u << units.size()); ++mask) {
      std::vector<bool> dropped(units.size());
      for (size_t u = 0; u < units.size(); ++u) dropped[u] = (mask >> u) & 1u;
      consider(dropping(dropped));
    }
  } else {
    std::vector<bool> dropped(units.size(), false);
    BlockOption at = option_cost(b, dropping(dropped));
    for (size_t round = 0; round < units.size(); ++round) {
      double best_ratio = 0;
      size_t best = units.size();
      BlockOption best_option;
      for (size_t u = 0; u < units.size(); ++u) {
        if (dropped[u]) continue;
        dropped[u] = true;
        BlockOption o = option_cost(b, dropping(dropped));
        dropped[u] = false;
        const int64_t freed = at.kept_bytes - o.kept_bytes;
        const double ratio = (o.recompute_ms - at.recompute_ms) / static_cast<double>(std::max<int64_t>(freed, 1));
        if (best == units.size() || ratio < best_ratio) best_ratio = ratio, best = u, best_option = std::move(o);
      }
      if (best == units.size()) break;
      dropped[best] = true;
      at = best_option;
      if (at.kept_bytes < saved_bytes) candidates.push_back(at);
    }
  }
  auto beats = [](const BlockOption& a, const BlockOption& c) {
    return a.kept_bytes <= c.kept_bytes && a.kept_bytes + a.rebuilt_bytes <= c.kept_bytes + c.rebuilt_bytes &&
           a.extra_forward_bytes <= c.extra_forward_bytes && a.recompute_ms <= c.recompute_ms;
  };
  std::vector<BlockOption> out;
  out.push_back({"keep", {}, saved_bytes, 0, 0.0});
  for (size_t i = 0; i < candidates.size(); ++i) {
    bool dominated = false;
    for (size_t j = 0; j < candidates.size() && !dominated; ++j)
      dominated = j != i && beats(candidates[j], candidates[i]) && (!beats(candidates[i], candidates[j]) || j < i);
    if (dominated) continue;
    candidates[i].name = option_name(b, candidates[i]);
    out.push_back(candidates[i]);
  }
  return out;
}

}  // namespace

uint64_t tape_signature(const Tensor& t) {
  std::vector<TapeNode> tape = tape_of(t);
  if (tape.empty()) return 0;
  uint64_t h = 1469598103934665603ull;  // FNV-1a over op kinds and output shapes
  for (const TapeNode& at : tape) {
    const Node& node = *at.graph->nodes[at.index];
    h = (h ^ static_cast<uint64_t>(node.kind())) * 1099511628211ull;
    for (int64_t v : node.outputs)
      for (int64_t d : at.graph->values[v].shape) h = (h ^ static_cast<uint64_t>(d)) * 1099511628211ull;
  }
  return h;
}

Policy position_policy(std::vector<bool> recompute, std::string name) {
  return {std::move(name), [recompute = std::move(recompute)](const PolicyContext& ctx) {
            bool inside = ctx.position >= 0 && static_cast<size_t>(ctx.position) < recompute.size();
            // An op past the recorded ones (the tape changed) is saved; the planner replans.
            return inside && recompute[static_cast<size_t>(ctx.position)] ? Decision::prefer_recompute
                                                                           : Decision::must_save;
          }};
}

namespace {

int64_t saved_by_blocks(const std::vector<PlannedBlock>& blocks) {
  int64_t saved = 0;
  for (const PlannedBlock& b : blocks) saved += b.saved_bytes;
  return saved;
}

// One block of the simulation (planner.h): from the bytes kept by the blocks before it and the
// worst peak so far, those after block `b` under option `i` (its forward, and its replay if any).
std::pair<int64_t, int64_t> advance(const PlannedBlock& b, size_t i, const StepMemory& step, int64_t prefix,
                                    int64_t worst) {
  const BlockOption& o = b.options[i];
  worst = std::max(worst, prefix + b.alive_before_bytes + b.forward_peak_bytes + o.extra_forward_bytes);
  if (i > 0) worst = std::max(worst, step.pre_saved + prefix + o.kept_bytes + o.rebuilt_bytes);
  return {prefix + o.kept_bytes, worst};
}

}  // namespace

int64_t simulate_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step) {
  int64_t kept = 0, peak = step.before_blocks_peak;
  for (const PlannedBlock& b : blocks)
    std::tie(kept, peak) = advance(b, static_cast<size_t>(b.choice), step, kept, peak);
  return std::max(peak, step.after_blocks_peak - saved_by_blocks(blocks) + kept);
}

int64_t floor_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step) {
  // The search below without the time: states no other beats in bytes kept and worst peak so far.
  std::vector<std::pair<int64_t, int64_t>> states{{0, step.before_blocks_peak}};  // (kept so far, worst)
  for (const PlannedBlock& b : blocks) {
    std::vector<std::pair<int64_t, int64_t>> next;
    for (auto [prefix, worst] : states)
      for (size_t i = 0; i < b.options.size(); ++i) next.push_back(advance(b, i, step, prefix, worst));
    std::sort(next.begin(), next.end());
    states.clear();
    for (auto& c : next)
      if (states.empty() || c.second < states.back().second) states.push_back(c);
  }
  int64_t best = -1, tail = step.after_blocks_peak - saved_by_blocks(blocks);
  for (auto [prefix, worst] : states) {
    int64_t peak = std::max(worst, tail + prefix);
    if (best < 0 || peak < best) best = peak;
  }
  return best;
}

OptionChoice choose_options(const std::vector<PlannedBlock>& blocks, const StepMemory& step, int64_t budget_bytes) {
  // Walk the blocks in order, trying every option of each, keeping the states no other beats in
  // all of recompute time, bytes kept so far and worst peak so far: a state dropped this way has a
  // state at least as good in every later comparison, so the search is exact.
  struct State {
    int64_t prefix, worst;
    double cost;
    std::vector<int> choice;
  };
  OptionChoice out;
  if (step.before_blocks_peak > budget_bytes) return out;
  const int64_t tail = step.after_blocks_peak - saved_by_blocks(blocks);
  std::vector<State> states{{0, step.before_blocks_peak, 0.0, {}}};
  for (const PlannedBlock& b : blocks) {
    std::vector<State> next;
    for (const State& s : states) {
      for (size_t i = 0; i < b.options.size(); ++i) {
        State t = s;
        std::tie(t.prefix, t.worst) = advance(b, i, step, s.prefix, s.worst);
        if (i > 0) t.cost += b.options[i].recompute_ms;
        t.choice.push_back(static_cast<int>(i));
        // Kept bytes only grow, so a prefix past the tail's share of the budget never fits.
        if (t.worst <= budget_bytes && tail + t.prefix <= budget_bytes) next.push_back(std::move(t));
      }
    }
    std::sort(next.begin(), next.end(), [](const State& a, const State& b) {
      return a.cost != b.cost ? a.cost < b.cost : a.prefix != b.prefix ? a.prefix < b.prefix : a.worst < b.worst;
    });
    states.clear();
    for (State& c : next) {
      bool dominated = std::any_of(states.begin(), states.end(), [&](const State& o) {
        return o.cost <= c.cost && o.prefix <= c.prefix && o.worst <= c.worst;
      });
      if (!dominated) states.push_back(std::move(c));
    }
    out.search_states = std::max(out.search_states, states.size());
  }
  const State* best = nullptr;
  for (const State& s : states)
    if (std::max(s.worst, tail + s.prefix) <= budget_bytes && (!best || s.cost < best->cost)) best = &s;
  if (!best) return out;
  out.fits = true;
  out.recompute_ms = best->cost;
  out.choice = best->choice;
  return out;
}

BudgetPlanner::BudgetPlanner(Module& model, int64_t budget_bytes, double percent, BudgetScope scope)
    : model_(model), budget_bytes_(budget_bytes), percent_(percent), scope_(scope) {
  REMAT_CHECK(percent > 0 || budget_bytes > 0, "budget: expected a positive byte count or percentage");
  REMAT_CHECK(percent <= 0 || percent <= 100, "budget: expected a percentage in (0, 100], got ", percent);
}

const BudgetPlan& BudgetPlanner::plan(const std::function<Tensor()>& loss_fn,
                                      const std::function<void(const Tensor&)>& backward_fn) {
  remove_checkpointing(model_);
  std::vector<Span> spans;
  collect_blocks(model_, spans);
  REMAT_CHECK(!spans.empty(), "budget planner: no block container found in ", model_.type_name(),
              "; the planner places regions on the children of containers named like blocks, double_blocks, ...");
  // Measured on the device that holds the model's parameters.
  std::vector<Tensor> params = model_.parameters();
  Allocator& alloc = allocator_for(params.empty() ? Device::cpu() : params.front().device());
  // Mark each block's range on the tape and on the allocator's timeline, and time its forward.
  for (Span& s : spans) {
    auto start = std::make_shared<std::chrono::steady_clock::time_point>();
    s.module->add_forward_hook(
        {"planner_probe",
         [&s, start, &alloc](Module&) {
           s.begin = static_cast<int64_t>(next_node_seq());
           s.first_event = alloc.recorded_events();
           *start = std::chrono::steady_clock::now();
         },
         [&s, start, &alloc](Module&, bool) {
           s.end = static_cast<int64_t>(next_node_seq());
           s.end_event = alloc.recorded_events();
           s.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - *start).count();
         }});
  }
  alloc.reset_peak();
  int64_t base = alloc.stats()[MemoryCategory::activation].current;
  Tensor loss;
  alloc.start_recording();
  try {
    // On a GPU an op's host time is its launch: events on the GPU's stream time its kernels.
    std::optional<DeviceOpTiming> timing;
    if (!params.empty() && params.front().device().is_cuda()) timing.emplace();
    loss = loss_fn();
  } catch (...) {
    alloc.stop_recording();
    for (Span& s : spans) s.module->remove_hooks("planner_probe");
    throw;
  }
  for (Span& s : spans) s.module->remove_hooks("planner_probe");
  if (!loss.defined() || graph_of(loss) == nullptr) alloc.stop_recording();
  REMAT_CHECK(loss.defined() && graph_of(loss) != nullptr,
              "budget planner: the step function must return a tensor with a graph (the loss)");

  BudgetPlan p;
  p.tape_signature = tape_signature(loss);
  // The step's tape (over every graph its forward started), in recording order; a value is known
  // by the graph and value that produced it, whatever graph reads it.
  std::vector<TapeNode> tape = tape_of(loss);
  for (const TapeNode& at : tape) {  // GPU ops: their kernels' time, from the events around them
    Node& node = *at.graph->nodes[at.index];
    if (node.forward_start_event && node.forward_end_event)
      node.forward_us = 1000.0f * cuda_elapsed_ms(node.forward_start_event, node.forward_end_event);
    node.forward_start_event.reset();
    node.forward_end_event.reset();
  }
  // Values saved at the end of forward, attributed to the block whose node saves them, each
  // storage to the first block that holds it.
  std::set<Key> counted;
  HeldBytes held;
  for (const Span& s : spans) {
    REMAT_CHECK(s.begin >= 0 && s.end >= s.begin, "budget planner: block ", s.name, " did not run in the step");
    PlannedBlock b;
    b.name = s.name;
    b.forward_ms = s.ms;
    std::set<Key> saved, inputs;
    std::vector<TapeNode> nodes;  // the block's nodes, in recording order
    for (const TapeNode& at : tape) {
      const Node& node = *at.graph->nodes[at.index];
      if (static_cast<int64_t>(node.seq) < s.begin || static_cast<int64_t>(node.seq) >= s.end) continue;
      nodes.push_back(at);
      for (const SavedSlot& slot : node.saved) {
        Key k = resolve_value(at.graph, slot.value);
        if (counts(k)) saved.insert(k);
      }
      for (int64_t u : node.inputs) {
        if (u < 0) continue;
        Key k = resolve_value(at.graph, u);
        int64_t produced = seq_of(k);
        if (produced >= 0 && produced < s.begin) inputs.insert(k);
      }
    }
    for (const Key& k : saved)
      if (counted.insert(k).second) b.saved_bytes += held.add(k);
    for (const Key& k : inputs) b.input_bytes += value_bytes(k.first->values[k.second]);
    BlockTape bt{std::move(nodes), std::move(inputs), std::move(saved), {}};
    for (size_t i = 0; i < bt.nodes.size(); ++i)
      for (int64_t v : bt.node(i).outputs) bt.producer_of[{bt.nodes[i].graph, v}] = i;
    b.options = block_options(bt, b.saved_bytes);
    p.blocks.push_back(std::move(b));
  }
  for (const TapeNode& at : tape) {  // what the ops before the blocks save
    const Node& node = *at.graph->nodes[at.index];
    if (static_cast<int64_t>(node.seq) >= spans.front().begin) continue;
    for (const SavedSlot& slot : node.saved) {
      Key k = resolve_value(at.graph, slot.value);
      if (counts(k) && counted.insert(k).second) p.step.pre_saved += held.add(k);
    }
  }
  try {
    // The recording step is a normal training step.
    if (backward_fn) backward_fn(loss);
    else backward(loss);
  } catch (...) {
    alloc.stop_recording();
    throw;
  }
  loss = Tensor();
  std::vector<MemoryEvent> events = alloc.stop_recording();
  MemoryStats stats = alloc.stats();
  p.none_peak_bytes = stats[MemoryCategory::activation].peak - base;
  p.none_total_peak_bytes = stats.total.peak;
  // The activations alive (above the step's start) before each event, and the peak over a range.
  std::vector<int64_t> alive(events.size() + 1, 0);
  for (size_t i = 0; i < events.size(); ++i)
    alive[i + 1] = alive[i] + (events[i].category == MemoryCategory::activation ? events[i].bytes : 0);
  auto peak_over = [&](size_t from, size_t to) {  // events [from, to)
    return *std::max_element(alive.begin() + static_cast<std::ptrdiff_t>(from),
                             alive.begin() + static_cast<std::ptrdiff_t>(to) + 1);
  };
  int64_t saved_before = 0;
  for (size_t j = 0; j < spans.size(); ++j) {
    PlannedBlock& b = p.blocks[j];
    int64_t at_start = alive[spans[j].first_event];
    b.alive_before_bytes = at_start - saved_before;
    b.forward_peak_bytes = peak_over(spans[j].first_event, spans[j].end_event) - at_start;
    saved_before += b.saved_bytes;
  }
  p.step.before_blocks_peak = peak_over(0, spans.front().first_event);
  p.step.after_blocks_peak = peak_over(spans.back().end_event, events.size());
  p.floor_bytes = floor_peak(p.blocks, p.step);
  p.scope = scope_;
  if (scope_ == BudgetScope::activations) {
    p.budget_bytes = percent_ > 0 ? static_cast<int64_t>(static_cast<double>(p.none_peak_bytes) * percent_ / 100.0)
                                   : budget_bytes_;
    REMAT_CHECK(p.floor_bytes <= p.budget_bytes, "budget ", p.budget_bytes, " bytes is below the achievable floor of ",
                p.floor_bytes, " bytes (every block checkpointed as little as memory allows; ", p.none_peak_bytes,
                " bytes without checkpointing)");
  } else {
    // Everything but the step's activations, each category at its own peak: the activations
    // alive before the step, parameters, gradients (with backward's temporaries), optimizer
    // state, workspace.
    p.fixed_bytes = base;
    for (int c = 0; c < kMemoryCategoryCount; ++c)
      if (static_cast<MemoryCategory>(c) != MemoryCategory::activation) p.fixed_bytes += stats.by_category[c].peak;
    p.total_budget_bytes = percent_ > 0
                               ? static_cast<int64_t>(static_cast<double>(p.none_total_peak_bytes) * percent_ / 100.0)
                               : budget_bytes_;
    p.budget_bytes = p.total_budget_bytes - p.fixed_bytes;
    REMAT_CHECK(p.floor_bytes <= p.budget_bytes, "budget total ", p.total_budget_bytes,
                " bytes is below the achievable floor of ", p.floor_bytes + p.fixed_bytes,
                " bytes (every block checkpointed as little as memory allows: ",
                p.floor_bytes, " bytes of activations, plus ", p.fixed_bytes,
                " bytes of parameters, gradients, optimizer state and workspace; ", p.none_total_peak_bytes,
                " bytes without checkpointing)");
  }

  OptionChoice choice = choose_options(p.blocks, p.step, p.budget_bytes);
  REMAT_ASSERT(choice.fits, "the floor fits the budget but the search found no plan");
  p.search_states = choice.search_states;
  for (size_t i = 0; i < p.blocks.size(); ++i) {
    PlannedBlock& b = p.blocks[i];
    b.choice = choice.choice[i];
    b.checkpointed = b.choice != 0;
    if (b.checkpointed) {
      const BlockOption& o = b.options[static_cast<size_t>(b.choice)];
      CheckpointOptions opts;
      opts.name = b.name;
      opts.policy = position_policy(o.recompute, "planned: " + o.name);
      checkpoint(*spans[i].module, opts);
    }
  }
  p.predicted_peak_bytes = simulate_peak(p.blocks, p.step);
  p.predicted_recompute_ms = choice.recompute_ms;
  plan_ = std::move(p);
  return plan_;
}

bool BudgetPlanner::observe(const Tensor& loss, int64_t activation_peak_bytes, double replay_ms) {
  plan_.measured_peak_bytes = activation_peak_bytes;
  plan_.measured_replay_ms = replay_ms;
  return tape_signature(loss) == plan_.tape_signature;
}

std::string BudgetPlan::to_string() const {
  auto mib = [](int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  std::ostringstream out;
  out.setf(std::ios::fixed);
  out.precision(2);
  if (scope == BudgetScope::total)
    out << "budget total " << mib(total_budget_bytes) << " MiB (no checkpointing: " << mib(none_total_peak_bytes)
        << " MiB): " << mib(fixed_bytes) << " MiB for parameters, gradients, optimizer state and workspace, ";
  out << "budget " << mib(budget_bytes) << " MiB of activations (no checkpointing: " << mib(none_peak_bytes)
      << " MiB, floor " << mib(floor_bytes) << " MiB)\n";
  int n = 0;
  for (const PlannedBlock& b : blocks) n += b.checkpointed;
  out << "checkpoint " << n << " of " << blocks.size() << " blocks";
  for (const PlannedBlock& b : blocks)
    if (b.checkpointed) out << "\n  " << b.name << ": recompute " << b.options[static_cast<size_t>(b.choice)].name;
  out << "\npredicted activation peak " << mib(predicted_peak_bytes) << " MiB, recompute " << predicted_recompute_ms
      << " ms per step\n";
  if (measured_peak_bytes >= 0)
    out << "measured activation peak " << mib(measured_peak_bytes) << " MiB, replay " << measured_replay_ms << " ms\n";
  return out.str();
}

}  // namespace remat
