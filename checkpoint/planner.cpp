// The budget planner: record, build each block's options, search, place.
#include "checkpoint/planner.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
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
// base, the heads split from one projection) count it once, at the storage's size. A storage made
// before the step (its data, say) counts nothing: the step's activations are measured above what
// was alive at its start. A value whose data the step no longer holds counts its own size.
class HeldBytes {
 public:
  explicit HeldBytes(uint64_t step_first_storage) : step_first_storage_(step_first_storage) {}
  // Adds a value; returns the bytes that adds (0 for a storage counted already).
  int64_t add(const Key& k) {
    const ValueInfo& v = k.first->values[k.second];
    int64_t bytes = 0;
    if (!v.data.defined() || !v.data.storage()) bytes = value_bytes(v);
    else if (storages_.insert(v.data.storage().get()).second && v.data.storage()->serial() >= step_first_storage_)
      bytes = static_cast<int64_t>(v.data.storage()->bytes());
    total_ += bytes;
    return bytes;
  }
  int64_t total() const { return total_; }

 private:
  uint64_t step_first_storage_;
  std::set<const Storage*> storages_;
  int64_t total_ = 0;
};

// What a step's activations are: not the parameters.
bool counts(const Key& k) {
  const ValueInfo& v = k.first->values[k.second];
  return v.producer >= 0 || !v.leaf;
}

// When the program lets go of each value the tape saves, during the recorded forward: a storage
// that only the graphs' held values still reference was released by the program (under
// checkpointing, a dropped value goes then). Polled before every op and at block boundaries, a
// release is dated by the allocator's event count at the poll: never earlier than it happened.
class ProgramReleases {
 public:
  explicit ProgramReleases(Allocator& alloc) : alloc_(alloc) {}

  // Watches the storages a newly recorded node's saved slots hold.
  void recorded(const std::shared_ptr<Graph>& graph, int64_t node) {
    for (const SavedSlot& slot : graph->nodes[node]->saved) {
      const Tensor& data = graph->values[slot.value].data;
      if (!data.defined() || !data.storage()) continue;
      Watched& w = watched_[data.storage().get()];
      if (w.storage.expired()) w.storage = data.storage();
      bool known = false;
      for (const auto& [g, v] : w.holders) known = known || (v == slot.value && g.lock() == graph);
      if (!known) w.holders.emplace_back(graph, slot.value);
    }
  }

  void poll() {
    const size_t now = alloc_.recorded_events();
    for (auto it = watched_.begin(); it != watched_.end();) {
      Watched& w = it->second;
      const long uses = w.storage.use_count();
      long held = 0;
      for (const auto& [weak_graph, v] : w.holders) {
        std::shared_ptr<Graph> g = weak_graph.lock();
        if (!g) continue;
        const Tensor& data = g->values[static_cast<size_t>(v)].data;
        held += data.defined() && data.storage().get() == it->first;
      }
      if (uses > 0 && uses == held) released_[it->first] = now;
      // Gone or released: nothing more to watch (a storage freed and reused later is watched anew).
      if (uses == 0 || uses == held) it = watched_.erase(it);
      else ++it;
    }
  }

  // The event count at which the program had let go of each storage (those it let go of).
  const std::map<const Storage*, size_t>& released() const { return released_; }

 private:
  struct Watched {
    std::weak_ptr<Storage> storage;
    std::vector<std::pair<std::weak_ptr<Graph>, int64_t>> holders;  // values whose data may reference it
  };
  Allocator& alloc_;
  std::map<const Storage*, Watched> watched_;
  std::map<const Storage*, size_t> released_;
};

// A block as recorded: its nodes in recording order, its non-parameter inputs, the values its
// nodes save, and which node produced each of its values.
struct BlockTape {
  std::vector<TapeNode> nodes;
  std::set<Key> inputs, saved;
  std::map<Key, size_t> producer_of;
  const std::map<const Storage*, size_t>* released = nullptr;  // ProgramReleases::released()
  uint64_t step_first_storage = 0;  // the serial of the step's first storage
  const Node& node(size_t i) const { return *nodes[i].graph->nodes[nodes[i].index]; }
};

const Storage* storage_of(const Key& k) {
  const Tensor& data = k.first->values[k.second].data;
  return data.defined() ? data.storage().get() : nullptr;
}

// An option before the timeline is known: besides its costs, the saved storages it lets go of in
// forward, each with the event count at which the program released it.
struct Candidate {
  BlockOption option;
  std::vector<std::pair<size_t, int64_t>> releases;  // (event count, bytes)
};

// How cheap an op is to recompute: 1 shape and pointwise ops (dropout and casts included), 2 norms
// and reductions, 3 matrix products and convolutions, 4 the rest (attention, the losses, custom).
int op_class(OpKind op) {
  switch (op) {
    case OpKind::layer_norm: case OpKind::group_norm: case OpKind::softmax: case OpKind::sum: case OpKind::mean:
    case OpKind::max: case OpKind::embedding: case OpKind::upsample_nearest: case OpKind::avg_pool:
    case OpKind::timestep_embedding:
      return 2;
    case OpKind::matmul: case OpKind::linear: case OpKind::conv2d:
      return 3;
    case OpKind::attention: case OpKind::cross_entropy: case OpKind::linear_cross_entropy: case OpKind::custom:
      return 4;
    default:
      return 1;
  }
}

bool is_view(OpKind op) {
  return op == OpKind::reshape || op == OpKind::permute || op == OpKind::slice || op == OpKind::expand ||
         op == OpKind::split;
}

// Whether output `k` of the block's node `i` shares its input's memory. Only view ops' outputs do,
// and a reshape's only where its input's strides allow: as recorded where the output still has its
// data (the same storage as the nearest value up the chain of views that has its data; without
// one, a storage larger than the output), else by the op (a reshape is taken for a copy).
bool aliases_input(const BlockTape& b, size_t i, const Key& k) {
  const Node& node = b.node(i);
  if (!is_view(node.kind()) || node.inputs.empty() || node.inputs[0] < 0) return false;
  const Storage* out = storage_of(k);
  if (!out) return node.kind() != OpKind::reshape;
  Key up = resolve_value(b.nodes[i].graph, node.inputs[0]);
  for (;;) {
    if (const Storage* in = storage_of(up)) return in == out;
    auto producer = b.producer_of.find(up);
    if (producer == b.producer_of.end()) break;
    const Node& p = b.node(producer->second);
    if (!is_view(p.kind()) || p.inputs.empty() || p.inputs[0] < 0) break;
    up = resolve_value(b.nodes[producer->second].graph, p.inputs[0]);
  }
  return static_cast<int64_t>(out->bytes()) > value_bytes(k.first->values[k.second]);
}

// The most the replay holds above the kept bytes when it re-runs the `needed` nodes as one pass in
// tape order: rebuilt slots stay, other outputs go after their last use in the pass; memory is
// counted once per allocation, so a view costs nothing but keeps what it views alive; an offloaded
// value the pass reads comes back as a copy of its own for that op (and for as long as a view of
// it lives). Its peak bounds what the passes of per-node replay hold.
int64_t replay_pass_peak(const BlockTape& b, const std::vector<char>& needed, const std::set<Key>& kept,
                         const std::set<Key>& rebuilt, const std::set<Key>& offloaded) {
  std::map<Key, int> uses;
  for (size_t i = 0; i < b.nodes.size(); ++i)
    if (needed[i])
      for (int64_t u : b.node(i).inputs)
        if (u >= 0) ++uses[resolve_value(b.nodes[i].graph, u)];
  // Allocations: bytes and the live values that hold each; -1 for memory the pass does not pay
  // for (kept values, the block's inputs).
  std::vector<int64_t> bytes, holders;
  std::map<Key, int64_t> allocation;
  int64_t alive = 0, peak = 0;
  auto hold = [&](int64_t a, int delta) {
    if (a < 0) return;
    if (holders[a] == 0) alive += bytes[a];
    holders[a] += delta;
    if (holders[a] == 0) alive -= bytes[a];
  };
  auto allocate = [&](int64_t n) {
    bytes.push_back(n);
    holders.push_back(0);
    return static_cast<int64_t>(bytes.size()) - 1;
  };
  auto allocation_of = [&](const Key& k) {
    auto found = allocation.find(k);
    return found == allocation.end() ? int64_t{-1} : found->second;
  };
  for (size_t i = 0; i < b.nodes.size(); ++i) {
    if (!needed[i]) continue;
    const Node& node = b.node(i);
    std::vector<int64_t> copies;  // offloaded inputs, back for this op
    std::map<Key, int64_t> input_allocation;
    for (int64_t u : node.inputs) {
      if (u < 0) continue;
      Key k = resolve_value(b.nodes[i].graph, u);
      if (offloaded.count(k) && !input_allocation.count(k)) {
        copies.push_back(allocate(value_bytes(k.first->values[k.second])));
        hold(copies.back(), 1);
        input_allocation[k] = copies.back();
      } else if (!input_allocation.count(k)) {
        input_allocation[k] = kept.count(k) ? -1 : allocation_of(k);
      }
    }
    for (int64_t v : node.outputs) {
      Key k{b.nodes[i].graph, v};
      if (kept.count(k)) continue;
      int64_t a = aliases_input(b, i, k) ? input_allocation[resolve_value(b.nodes[i].graph, node.inputs[0])]
                                         : allocate(value_bytes(k.first->values[k.second]));
      allocation[k] = a;
      hold(a, 1);
    }
    peak = std::max(peak, alive);
    for (int64_t v : node.outputs) {  // outputs nothing reads: gone at once
      Key k{b.nodes[i].graph, v};
      if (!kept.count(k) && !rebuilt.count(k) && !uses.count(k)) hold(allocation_of(k), -1);
    }
    for (int64_t u : node.inputs) {
      if (u < 0) continue;
      Key k = resolve_value(b.nodes[i].graph, u);
      if (--uses[k] == 0 && b.producer_of.count(k) && !kept.count(k) && !rebuilt.count(k) && !offloaded.count(k))
        hold(allocation_of(k), -1);
    }
    for (int64_t a : copies) hold(a, -1);
  }
  return peak;
}

// The most that copies of offloaded values back on the device hold at once in the block's backward:
// a node unpacks its offloaded slots (a copy each) while prefetch brings back those of the next
// four nodes (RegionManager::after_backward_node), so the most over five consecutive nodes.
int64_t prefetch_window_bytes(const BlockTape& b, const std::set<Key>& offloaded) {
  if (offloaded.empty()) return 0;
  constexpr size_t kWindow = 5;
  std::vector<int64_t> per_node(b.nodes.size(), 0);
  for (size_t i = 0; i < b.nodes.size(); ++i)
    for (const SavedSlot& slot : b.node(i).saved) {
      Key k = resolve_value(b.nodes[i].graph, slot.value);
      if (offloaded.count(k)) per_node[i] += value_bytes(k.first->values[k.second]);
    }
  int64_t most = 0, sum = 0;
  for (size_t i = 0; i < per_node.size(); ++i) {
    sum += per_node[i] - (i >= kWindow ? per_node[i - kWindow] : 0);
    most = std::max(most, sum);
  }
  return most;
}

// The bytes, rebuilds and time of recomputing the nodes marked in `recompute` and offloading the
// outputs of those marked in `offload` (empty: none): the block keeps its inputs, the outputs of
// the nodes it saves on the device and the saved slots those cover; replay rebuilds the other
// saved slots, re-running their producers back to kept or offloaded values, and allocates their
// outputs.
Candidate option_cost(const BlockTape& b, std::vector<bool> recompute, std::vector<bool> offload = {}) {
  offload.resize(b.nodes.size(), false);
  std::set<Key> kept = b.inputs, rebuilt, offloaded;
  for (size_t i = 0; i < b.nodes.size(); ++i) {
    if (recompute[i]) continue;
    for (int64_t v : b.node(i).outputs)
      if (counts({b.nodes[i].graph, v})) (offload[i] ? offloaded : kept).insert({b.nodes[i].graph, v});
  }
  for (const Key& k : b.saved)
    if (!offloaded.count(k)) (b.producer_of.count(k) && !kept.count(k) ? rebuilt : kept).insert(k);
  std::vector<char> needed(b.nodes.size(), 0);
  std::vector<Key> stack(rebuilt.begin(), rebuilt.end());
  while (!stack.empty()) {
    Key k = stack.back();
    stack.pop_back();
    auto found = b.producer_of.find(k);
    if (found == b.producer_of.end() || kept.count(k) || offloaded.count(k) || needed[found->second]) continue;
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
    offload[i] = false;
    for (int64_t v : b.node(i).outputs) kept.erase({b.nodes[i].graph, v}), offloaded.erase({b.nodes[i].graph, v});
  }
  BlockOption o;
  HeldBytes held(b.step_first_storage);
  for (const Key& k : kept) {
    held.add(k);
    // Saved outputs no backward reads stay alive in forward too, on top of what it held without checkpointing.
    if (!b.saved.count(k) && !b.inputs.count(k)) o.extra_forward_bytes += value_bytes(k.first->values[k.second]);
  }
  // A kept view keeps its base's storage: a view kept beside a base that is rebuilt costs both.
  o.kept_bytes = held.total();
  // An offloaded value moves as one contiguous copy of its own size; its device storage stays
  // until its copy has landed.
  for (const Key& k : offloaded) {
    const int64_t bytes = value_bytes(k.first->values[k.second]);
    const Storage* s = storage_of(k);
    o.offloaded_bytes += bytes;
    o.in_flight_bytes = std::max({o.in_flight_bytes, bytes, s ? static_cast<int64_t>(s->bytes()) : int64_t{0}});
  }
  o.rebuilt_bytes = replay_pass_peak(b, needed, kept, rebuilt, offloaded);
  o.prefetch_bytes = prefetch_window_bytes(b, offloaded);
  for (size_t i = 0; i < b.nodes.size(); ++i)
    if (needed[i]) o.recompute_ms += b.node(i).forward_us / 1000.0;
  o.recompute = std::move(recompute);
  if (!offloaded.empty()) o.offload = std::move(offload);
  o.reruns.assign(needed.begin(), needed.end());
  // In forward, a saved storage that no kept value holds goes when the program lets go of it
  // (the region drops its slot at once, or holds only its host copy); without checkpointing it
  // stayed until backward.
  Candidate c{std::move(o), {}};
  std::set<const Storage*> kept_storages, freed;
  for (const Key& k : kept)
    if (const Storage* s = storage_of(k)) kept_storages.insert(s);
  std::vector<Key> going(rebuilt.begin(), rebuilt.end());
  going.insert(going.end(), offloaded.begin(), offloaded.end());
  for (const Key& k : going) {
    const Storage* s = storage_of(k);
    if (!s || s->serial() < b.step_first_storage || kept_storages.count(s) || !freed.insert(s).second || !b.released)
      continue;
    auto at = b.released->find(s);
    if (at != b.released->end()) c.releases.emplace_back(at->second, static_cast<int64_t>(s->bytes()));
  }
  return c;
}

// "all" when every op is dropped, else what replay re-runs ("3 of 21 ops: layer_norm, gelu").
// An option that offloads adds what ("...; offload 3 of 21 ops: linear, attention"), or is named by
// that alone when replay re-runs nothing.
std::string option_name(const BlockTape& b, const BlockOption& o) {
  if (std::count(o.recompute.begin(), o.recompute.end(), true) == static_cast<std::ptrdiff_t>(b.nodes.size()))
    return "all";
  auto ops = [&](const std::vector<bool>& marked) {
    size_t n = std::count(marked.begin(), marked.end(), true);
    std::string kinds;
    std::set<std::string> seen;
    for (size_t i = 0; i < b.nodes.size(); ++i)
      if (marked[i] && seen.insert(b.node(i).name()).second)
        kinds += (kinds.empty() ? "" : ", ") + std::string(b.node(i).name());
    return std::to_string(n) + " of " + std::to_string(b.nodes.size()) + " ops: " + kinds;
  };
  const bool reruns = std::count(o.reruns.begin(), o.reruns.end(), true) > 0;
  std::string name = reruns ? ops(o.reruns) : "";
  if (!o.offload.empty()) name += (reruns ? "; offload " : "offload ") + ops(o.offload);
  return name;
}

// Whose saved outputs an offloading option moves to host memory: matrix products and attention,
// the large outputs that cost most to rebuild.
bool offloadable(OpKind op) { return op_class(op) == 3 || op == OpKind::attention; }

// Options that offload on a GPU, for `add`: for each recompute set of `sets` and for none, every
// matrix product and attention it saves offloaded, views re-run (a view kept on the device would
// keep its offloaded base there); and, re-running shape, pointwise and norm ops (or nothing), the
// largest of those outputs alone, the two largest, ...: less to move where the bandwidth is short.
template <class Add>
void add_offload_candidates(const BlockTape& b, std::vector<std::vector<bool>> sets, const Add& add) {
  const size_t n = b.nodes.size();
  std::vector<size_t> movable;  // offloadable ops, largest output first
  std::vector<int64_t> bytes(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (!offloadable(b.node(i).kind())) continue;
    movable.push_back(i);
    for (int64_t v : b.node(i).outputs) bytes[i] += value_bytes(b.nodes[i].graph->values[v]);
  }
  if (movable.empty()) return;
  std::stable_sort(movable.begin(), movable.end(), [&](size_t a, size_t c) { return bytes[a] > bytes[c]; });
  auto with_views = [&](std::vector<bool> set) {
    for (size_t i = 0; i < n; ++i) set[i] = set[i] || is_view(b.node(i).kind());
    return set;
  };
  auto variant = [&](const std::vector<bool>& recompute, size_t most) {
    std::vector<bool> moved(n, false);
    size_t count = 0;
    for (size_t i : movable)
      if (!recompute[i] && count < most) moved[i] = true, ++count;
    if (count > 0) add(option_cost(b, recompute, moved));
  };
  sets.push_back(std::vector<bool>(n, false));
  for (const std::vector<bool>& set : sets) variant(with_views(set), movable.size());
  for (int cls = 0; cls <= 2; ++cls) {
    std::vector<bool> set(n);
    for (size_t i = 0; i < n; ++i) set[i] = op_class(b.node(i).kind()) <= cls;
    for (size_t most = 1; most < movable.size(); ++most) variant(with_views(set), most);
  }
}

// The block's candidate options (besides keep): every prefix of its ops ordered by recorded time
// per output byte (views first, as they cost no memory of their own); the op classes cumulatively;
// the sets by what is dropped; with `offload`, variants of those that move saved outputs to host
// memory. Those keeping no less than the block without checkpointing are left out; `undominated`
// filters the rest once the timeline gives their forward peaks.
std::vector<Candidate> block_candidates(const BlockTape& b, int64_t saved_bytes, bool offload) {
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
  std::vector<Candidate> candidates;
  auto add = [&](Candidate c) {
    // Keeping the block beats an option that keeps as much (it saves outputs no backward reads).
    if (c.option.kept_bytes >= saved_bytes) return;
    c.option.name = option_name(b, c.option);  // now: the tape's nodes may be gone when options are chosen
    candidates.push_back(std::move(c));
  };
  auto consider = [&](const std::vector<bool>& set) {
    if (std::count(set.begin(), set.end(), true) > 0) add(option_cost(b, set));
  };
  for (auto& set : sets) consider(set);
  if (offload) add_offload_candidates(b, sets, add);
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
    Candidate at = option_cost(b, dropping(dropped));
    for (size_t round = 0; round < units.size(); ++round) {
      double best_ratio = 0;
      size_t best = units.size();
      Candidate best_option;
      for (size_t u = 0; u < units.size(); ++u) {
        if (dropped[u]) continue;
        dropped[u] = true;
        Candidate c = option_cost(b, dropping(dropped));
        dropped[u] = false;
        const int64_t freed = at.option.kept_bytes - c.option.kept_bytes;
        const double ratio =
            (c.option.recompute_ms - at.option.recompute_ms) / static_cast<double>(std::max<int64_t>(freed, 1));
        if (best == units.size() || ratio < best_ratio) best_ratio = ratio, best = u, best_option = std::move(c);
      }
      if (best == units.size()) break;
      dropped[best] = true;
      at = best_option;
      add(at);
    }
  }
  return candidates;
}

// A block's forward working set when the storages in `releases` go at their event counts: the
// most alive above the block's start (alive[first]) at any point of its events [first, end).
int64_t forward_peak(const std::vector<int64_t>& alive, size_t first, size_t end,
                     std::vector<std::pair<size_t, int64_t>> releases) {
  std::sort(releases.begin(), releases.end());
  int64_t peak = 0, freed = 0;
  size_t r = 0;
  for (size_t i = first; i <= end; ++i) {
    // alive[i] holds between events i - 1 and i: a storage let go of before the poll at count c
    // may still be alive just after event c - 1, so it is off from alive[c + 1] on.
    for (; r < releases.size() && releases[r].first < i; ++r) freed += releases[r].second;
    peak = std::max(peak, alive[i] - alive[first] - freed);
  }
  return peak;
}

// The block's options once each candidate's forward peak is known: keep first, then those no
// other beats in kept bytes, replay peak, forward peak, what offload holds and time.
std::vector<BlockOption> undominated(std::vector<BlockOption> candidates, int64_t saved_bytes,
                                     int64_t forward_peak_bytes) {
  auto beats = [](const BlockOption& a, const BlockOption& c) {
    return a.kept_bytes <= c.kept_bytes &&
           a.kept_bytes + a.rebuilt_bytes + a.prefetch_bytes <= c.kept_bytes + c.rebuilt_bytes + c.prefetch_bytes &&
           a.forward_peak_bytes + a.extra_forward_bytes <= c.forward_peak_bytes + c.extra_forward_bytes &&
           a.prefetch_bytes <= c.prefetch_bytes && a.in_flight_bytes <= c.in_flight_bytes &&
           a.cost_ms() <= c.cost_ms();
  };
  BlockOption keep;
  keep.name = "keep";
  keep.kept_bytes = saved_bytes;
  keep.forward_peak_bytes = forward_peak_bytes;
  std::vector<BlockOption> out{keep};
  for (size_t i = 0; i < candidates.size(); ++i) {
    bool dominated = false;
    for (size_t j = 0; j < candidates.size() && !dominated; ++j)
      dominated = j != i && beats(candidates[j], candidates[i]) && (!beats(candidates[i], candidates[j]) || j < i);
    if (!dominated) out.push_back(std::move(candidates[i]));
  }
  return out;
}

// GPU ops timed under DeviceOpTiming: their kernels' time, from the events around them, in place
// of the host's (their launch). Returns whether any op had them (the step ran under the timing).
bool take_device_times(const std::vector<TapeNode>& tape) {
  bool any = false;
  for (const TapeNode& at : tape) {
    Node& node = *at.graph->nodes[at.index];
    if (node.forward_start_event && node.forward_end_event) {
      node.forward_us = 1000.0f * cuda_elapsed_ms(node.forward_start_event, node.forward_end_event);
      any = true;
    }
    node.forward_start_event.reset();
    node.forward_end_event.reset();
  }
  return any;
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

Policy position_policy(std::vector<bool> recompute, std::string name, std::vector<bool> offload) {
  return {std::move(name),
          [recompute = std::move(recompute), offload = std::move(offload)](const PolicyContext& ctx) {
            // An op past the recorded ones (the tape changed) is saved; the planner replans.
            auto marked = [&](const std::vector<bool>& by_position) {
              return ctx.position >= 0 && static_cast<size_t>(ctx.position) < by_position.size() &&
                     by_position[static_cast<size_t>(ctx.position)];
            };
            if (marked(recompute)) return Decision::prefer_recompute;
            return marked(offload) ? Decision::must_offload : Decision::must_save;
          }};
}

namespace {

// The recorded (or retimed) time of what the blocks' chosen options re-run, and the transfers
// their offloads expose.
double chosen_recompute_ms(const std::vector<PlannedBlock>& blocks) {
  double ms = 0;
  for (const PlannedBlock& b : blocks)
    if (b.choice != 0) ms += b.options[static_cast<size_t>(b.choice)].recompute_ms;
  return ms;
}
double chosen_transfer_ms(const std::vector<PlannedBlock>& blocks) {
  double ms = 0;
  for (const PlannedBlock& b : blocks) ms += b.options[static_cast<size_t>(b.choice)].transfer_ms;
  return ms;
}

}  // namespace

BudgetPlanner::BudgetPlanner(Module& model, int64_t budget_bytes, double percent, BudgetScope scope)
    : model_(model), budget_bytes_(budget_bytes), percent_(percent), scope_(scope) {
  REMAT_CHECK(percent > 0 || budget_bytes > 0, "budget: expected a positive byte count or percentage");
  REMAT_CHECK(percent <= 0 || percent <= 100, "budget: expected a percentage in (0, 100], got ", percent);
  if (const char* env = std::getenv("REMAT_OFFLOAD")) {
    const std::string value = env;
    REMAT_CHECK(value == "0" || value == "1", "REMAT_OFFLOAD: expected 0 (plans never offload) or 1 (they may, ",
                "on a GPU; the default), got '", value, "'");
    offload_.enabled = value == "1";
  }
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
  ProgramReleases releases(alloc);
  // Mark each block's range on the tape and on the allocator's timeline, and time its forward.
  for (Span& s : spans) {
    auto start = std::make_shared<std::chrono::steady_clock::time_point>();
    s.module->add_forward_hook(
        {"planner_probe",
         [&s, start, &alloc, &releases](Module&) {
           releases.poll();
           s.begin = static_cast<int64_t>(next_node_seq());
           s.first_event = alloc.recorded_events();
           *start = std::chrono::steady_clock::now();
         },
         [&s, start, &alloc, &releases](Module&, bool) {
           releases.poll();
           s.end = static_cast<int64_t>(next_node_seq());
           s.end_event = alloc.recorded_events();
           s.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - *start).count();
         }});
  }
  // Copies of an earlier step's offloads hold device memory until a poll after they land: let them
  // go now, or their release would count as the recorded step's.
  if (!params.empty() && params.front().device().is_cuda()) cuda_wait_copies(params.front().device().index, 0);
  alloc.reset_peak();
  int64_t base = alloc.stats()[MemoryCategory::activation].current;
  const uint64_t step_first_storage = next_storage_serial();
  Tensor loss;
  alloc.start_recording();
  try {
    // On a GPU an op's host time is its launch: events on the GPU's stream time its kernels.
    std::optional<DeviceOpTiming> timing;
    if (!params.empty() && params.front().device().is_cuda()) timing.emplace();
    RecordWatchScope watch({[&releases] { releases.poll(); },
                            [&releases](const std::shared_ptr<Graph>& g, int64_t node) { releases.recorded(g, node); }});
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
  // Offload is an option where the parameters live on a GPU (its bandwidth measured after the
  // step, the copies being the only work then).
  const bool offload = offload_.enabled && !params.empty() && params.front().device().is_cuda();
  // The loss stays alive through backward, so through every replay (the forward's own timeline
  // counts it already).
  const std::shared_ptr<Storage>& loss_storage = loss.storage();
  if (loss_storage && loss_storage->serial() >= step_first_storage &&
      loss_storage->category() == MemoryCategory::activation)
    p.step.held = static_cast<int64_t>(loss_storage->bytes());
  // The step's tape (over every graph its forward started), in recording order; a value is known
  // by the graph and value that produced it, whatever graph reads it.
  std::vector<TapeNode> tape = tape_of(loss);
  take_device_times(tape);
  // Values saved at the end of forward, attributed to the block whose node saves them, each
  // storage to the first block that holds it.
  std::set<Key> counted;
  HeldBytes held(step_first_storage);
  std::vector<std::vector<Candidate>> candidates;  // per block, until the timeline gives their forward peaks
  for (const Span& s : spans) {
    REMAT_CHECK(s.begin >= 0 && s.end >= s.begin, "budget planner: block ", s.name, " did not run in the step");
    PlannedBlock b;
    b.name = s.name;
    b.forward_ms = s.ms;
    std::set<Key> saved, inputs;
    std::vector<TapeNode> nodes;  // the block's nodes, in recording order
    for (size_t position = 0; position < tape.size(); ++position) {
      const TapeNode& at = tape[position];
      const Node& node = *at.graph->nodes[at.index];
      if (static_cast<int64_t>(node.seq) < s.begin || static_cast<int64_t>(node.seq) >= s.end) continue;
      nodes.push_back(at);
      b.tape_positions.push_back(position);
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
    BlockTape bt{std::move(nodes), std::move(inputs), std::move(saved), {}, &releases.released(), step_first_storage};
    for (size_t i = 0; i < bt.nodes.size(); ++i)
      for (int64_t v : bt.node(i).outputs) bt.producer_of[{bt.nodes[i].graph, v}] = i;
    for (size_t i = 0; i < bt.nodes.size(); ++i) b.ops_ms += bt.node(i).forward_us / 1000.0;
    candidates.push_back(block_candidates(bt, b.saved_bytes, offload));
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
  if (offload)
    p.offload_gbps = offload_.gbps > 0 ? offload_.gbps : offload_bandwidth_gbps(params.front().device().index);
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
    std::vector<BlockOption> options;
    for (Candidate& c : candidates[j]) {
      c.option.forward_peak_bytes = forward_peak(alive, spans[j].first_event, spans[j].end_event, std::move(c.releases));
      c.option.transfer_ms = offload_exposed_ms(c.option.offloaded_bytes, b.ops_ms, p.offload_gbps);
      options.push_back(std::move(c.option));
    }
    b.options = undominated(std::move(options), b.saved_bytes, b.forward_peak_bytes);
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
    // Each category counts at its own peak, the gradients as if alive from the step's start (as
    // in a later micro-batch): where parameters and optimizer state dwarf the activations, the
    // floor can lie above the peak this step measured, and the message says why.
    REMAT_CHECK(p.floor_bytes <= p.budget_bytes, "budget total ", p.total_budget_bytes,
                " bytes is below the achievable floor of ", p.floor_bytes + p.fixed_bytes,
                " bytes (every block checkpointed as little as memory allows: ",
                p.floor_bytes, " bytes of activations, plus ", p.fixed_bytes,
                " bytes of parameters, gradients, optimizer state and workspace, each counted at its peak; ",
                p.none_total_peak_bytes, " bytes measured without checkpointing",
                p.floor_bytes + p.fixed_bytes >= p.none_total_peak_bytes
                    ? ", where the gradients' and the activations' peaks did not coincide: budget the "
                      "activations alone (budget:act:...) to plan below it"
                    : "",
                ")");
  }

  OptionChoice choice = choose_options(p.blocks, p.step, p.budget_bytes);
  REMAT_ASSERT(choice.fits, "the floor fits the budget but the search found no plan");
  p.search_states = choice.search_states;
  plan_ = std::move(p);
  return place(choice.choice);
}

const BudgetPlan& BudgetPlanner::place(const std::vector<int>& choice) {
  std::vector<Span> spans;
  collect_blocks(model_, spans);
  REMAT_CHECK(!plan_.blocks.empty() && spans.size() == plan_.blocks.size(),
              "budget planner: place() needs a plan of this model's blocks first (plan())");
  REMAT_CHECK(choice.size() == plan_.blocks.size(), "budget planner: expected a choice for each of the ",
              plan_.blocks.size(), " blocks, got ", choice.size());
  for (size_t i = 0; i < choice.size(); ++i) {
    REMAT_CHECK(spans[i].name == plan_.blocks[i].name, "budget planner: the model's blocks changed since plan() (",
                plan_.blocks[i].name, " is now ", spans[i].name, ")");
    REMAT_CHECK(choice[i] >= 0 && static_cast<size_t>(choice[i]) < plan_.blocks[i].options.size(), "budget planner: ",
                plan_.blocks[i].name, " has options 0 to ", plan_.blocks[i].options.size() - 1, ", got ", choice[i]);
  }
  remove_checkpointing(model_);
  for (size_t i = 0; i < plan_.blocks.size(); ++i) {
    PlannedBlock& b = plan_.blocks[i];
    b.choice = choice[i];
    b.checkpointed = b.choice != 0;
    if (b.checkpointed) {
      const BlockOption& o = b.options[static_cast<size_t>(b.choice)];
      CheckpointOptions opts;
      opts.name = b.name;
      opts.policy = position_policy(o.recompute, "planned: " + o.name, o.offload);
      checkpoint(*spans[i].module, opts);
    }
  }
  plan_.predicted_recompute_ms = chosen_recompute_ms(plan_.blocks);
  plan_.predicted_transfer_ms = chosen_transfer_ms(plan_.blocks);
  plan_.predicted_offloaded_bytes = 0;
  for (const PlannedBlock& b : plan_.blocks)
    plan_.predicted_offloaded_bytes += b.options[static_cast<size_t>(b.choice)].offloaded_bytes;
  const SimulatedPeak peak = locate_peak(plan_.blocks, plan_.step);
  plan_.predicted_peak_bytes = peak.bytes;
  plan_.predicted_peak_at = peak.where;
  plan_.measured_peak_bytes = -1;
  plan_.measured_replay_ms = -1;
  return plan_;
}

bool BudgetPlanner::observe(const Tensor& loss, int64_t activation_peak_bytes, double replay_ms) {
  plan_.measured_peak_bytes = activation_peak_bytes;
  plan_.measured_replay_ms = replay_ms;
  if (tape_signature(loss) != plan_.tape_signature) return false;
  if (!plan_.retimed) retime(loss);  // a new choice resets the measured figures: not measured yet
  return true;
}

bool BudgetPlanner::wants_retime() const { return !plan_.blocks.empty() && !plan_.retimed; }

bool BudgetPlanner::retime(const Tensor& loss) {
  if (!wants_retime() || tape_signature(loss) != plan_.tape_signature) return false;
  const std::vector<TapeNode> tape = tape_of(loss);
  std::vector<Tensor> params = model_.parameters();
  // On a GPU an op's host time is its launch: only a step run under DeviceOpTiming can retime.
  if (!take_device_times(tape) && !params.empty() && params.front().device().is_cuda()) return false;
  for (PlannedBlock& b : plan_.blocks) {
    std::vector<double> ms;
    b.ops_ms = 0;
    for (size_t position : b.tape_positions) {
      REMAT_ASSERT(position < tape.size(), "a block's op past the end of a tape of the recorded shape");
      ms.push_back(tape[position].graph->nodes[tape[position].index]->forward_us / 1000.0);
      b.ops_ms += ms.back();
    }
    for (size_t i = 1; i < b.options.size(); ++i) {  // options[0] keeps the block: no recompute
      BlockOption& o = b.options[i];
      o.recompute_ms = 0;
      for (size_t k = 0; k < o.reruns.size() && k < ms.size(); ++k)
        if (o.reruns[k]) o.recompute_ms += ms[k];
      o.transfer_ms = offload_exposed_ms(o.offloaded_bytes, b.ops_ms, plan_.offload_gbps);
    }
  }
  plan_.retimed = true;
  OptionChoice choice = choose_options(plan_.blocks, plan_.step, plan_.budget_bytes);
  REMAT_ASSERT(choice.fits, "the planned choice fits the budget but the search found none after retiming");
  std::vector<int> current;
  for (const PlannedBlock& b : plan_.blocks) current.push_back(b.choice);
  plan_.search_states = choice.search_states;
  if (choice.choice == current) {
    plan_.predicted_recompute_ms = chosen_recompute_ms(plan_.blocks);
    plan_.predicted_transfer_ms = chosen_transfer_ms(plan_.blocks);
    return false;
  }
  place(choice.choice);
  return true;
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
  out << "checkpoint " << n << " of " << blocks.size() << " blocks (each keeps through forward, of what it saves"
      << " without checkpointing)";
  for (const PlannedBlock& b : blocks) {
    const BlockOption& o = b.options[static_cast<size_t>(b.choice)];
    out << "\n  " << b.name << ": ";
    if (b.checkpointed) {
      out << (o.name.rfind("offload", 0) == 0 ? "" : "recompute ") << o.name << "; keeps " << mib(o.kept_bytes)
          << " of " << mib(b.saved_bytes) << " MiB";
      if (o.offloaded_bytes > 0) out << " (" << mib(o.offloaded_bytes) << " MiB to host)";
      out << ", " << o.recompute_ms << " ms";
      if (o.offloaded_bytes > 0) out << " + " << o.transfer_ms << " ms transfer";
    } else
      out << "keep, " << mib(b.saved_bytes) << " MiB";
  }
  out << "\npredicted activation peak " << mib(predicted_peak_bytes) << " MiB";
  if (!predicted_peak_at.empty()) out << " at " << predicted_peak_at;
  out << ", recompute " << predicted_recompute_ms << " ms per step (op times of "
      << (retimed ? "a step under the plan" : "the recorded step") << ")";
  if (predicted_offloaded_bytes > 0)
    out << ", offload " << mib(predicted_offloaded_bytes) << " MiB (" << predicted_transfer_ms
        << " ms of transfer not hidden, at " << offload_gbps << " GB/s)";
  out << "\n";
  if (measured_peak_bytes >= 0)
    out << "measured activation peak " << mib(measured_peak_bytes) << " MiB, replay " << measured_replay_ms << " ms\n";
  return out.str();
}

}  // namespace remat
