// What each way of treating a block costs the budget planner (block_options.h).
#include "checkpoint/block_options.h"

#include <algorithm>
#include <string>

namespace remat::planning {

bool counts(const Key& k) {
  const ValueInfo& v = k.first->values[k.second];
  return v.producer >= 0 || !v.leaf;
}

const Storage* storage_of(const Key& k) {
  const Tensor& data = k.first->values[k.second].data;
  return data.defined() ? data.storage().get() : nullptr;
}

namespace {

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

// The bytes of node `i`'s outputs.
int64_t output_bytes(const BlockTape& b, size_t i) {
  int64_t bytes = 0;
  for (int64_t v : b.node(i).outputs) bytes += value_bytes(b.nodes[i].graph->values[v]);
  return bytes;
}

// By position: the block's ops of class `cls` or cheaper (op_class).
std::vector<bool> ops_up_to_class(const BlockTape& b, int cls) {
  std::vector<bool> set(b.nodes.size());
  for (size_t i = 0; i < set.size(); ++i) set[i] = op_class(b.node(i).kind()) <= cls;
  return set;
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
    bytes[i] = output_bytes(b, i);
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
  for (int cls = 0; cls <= 2; ++cls)
    for (size_t most = 1; most < movable.size(); ++most) variant(with_views(ops_up_to_class(b, cls)), most);
}

}  // namespace

std::vector<Candidate> block_candidates(const BlockTape& b, int64_t saved_bytes, bool offload) {
  const size_t n = b.nodes.size();
  std::vector<std::vector<bool>> sets;
  std::vector<double> score(n);
  for (size_t i = 0; i < n; ++i) {
    const Node& node = b.node(i);
    score[i] = is_view(node.kind()) ? -1.0
                                    : node.forward_us / static_cast<double>(std::max<int64_t>(output_bytes(b, i), 1));
  }
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t c) { return score[a] < score[c]; });
  std::vector<bool> prefix(n, false);
  for (size_t k = 0; k < n; ++k) {
    prefix[order[k]] = true;
    sets.push_back(prefix);
  }
  for (int cls = 1; cls <= 3; ++cls) sets.push_back(ops_up_to_class(b, cls));
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

}  // namespace remat::planning
