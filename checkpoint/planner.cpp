// The budget planner: record, measure per block, search, place.
#include "checkpoint/planner.h"

#include <algorithm>
#include <set>
#include <chrono>
#include <sstream>
#include <unordered_set>

#include "autograd/engine.h"
#include "autograd/graph.h"
#include "checkpoint/apply.h"

namespace remat {

namespace {

int64_t value_bytes(const ValueInfo& v) { return numel_of(v.shape) * static_cast<int64_t>(dtype_size(v.dtype)); }

struct Span {
  std::string name;
  Module* module;
  int64_t begin = -1, end = -1;
  double ms = 0;
};

// Block containers and their blocks, in tree order (the order a chain model runs them).
void collect_blocks(Module& m, std::vector<Span>& out) {
  for (auto& [path, container] : find_named_block_containers(m))
    for (auto& [index, block] : container->children()) out.push_back({path + "." + index, block.get()});
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

int64_t simulate_peak(const std::vector<PlannedBlock>& blocks, int64_t other_saved_bytes) {
  int64_t kept = 0, peak = 0;
  for (const PlannedBlock& b : blocks) {
    if (b.checkpointed) peak = std::max(peak, kept + b.saved_bytes);
    kept += b.checkpointed ? b.input_bytes : b.saved_bytes;
  }
  return std::max(peak, kept + other_saved_bytes);
}

BudgetPlanner::BudgetPlanner(Module& model, int64_t budget_bytes, double percent)
    : model_(model), budget_bytes_(budget_bytes), percent_(percent) {
  REMAT_CHECK(percent > 0 || budget_bytes > 0, "budget: expected a positive byte count or percentage");
  REMAT_CHECK(percent <= 0 || percent <= 100, "budget: expected a percentage in (0, 100], got ", percent);
}

const BudgetPlan& BudgetPlanner::plan(const std::function<Tensor()>& loss_fn) {
  remove_checkpointing(model_);
  std::vector<Span> spans;
  collect_blocks(model_, spans);
  REMAT_CHECK(!spans.empty(), "budget planner: no block container found in ", model_.type_name(),
              "; the planner places regions on the children of containers named like blocks, double_blocks, ...");
  // Mark each block's range on the tape, and time its forward.
  std::vector<int> hook_ids;
  for (Span& s : spans) {
    auto start = std::make_shared<std::chrono::steady_clock::time_point>();
    hook_ids.push_back(s.module->add_forward_hook(
        {"planner_probe",
         [&s, start](Module&) {
           s.begin = static_cast<int64_t>(next_node_seq());
           *start = std::chrono::steady_clock::now();
         },
         [&s, start](Module&, bool) {
           s.end = static_cast<int64_t>(next_node_seq());
           s.ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - *start).count();
         }}));
  }
  // Measured on the device that holds the model's parameters.
  std::vector<Tensor> params = model_.parameters();
  Allocator& alloc = allocator_for(params.empty() ? Device::cpu() : params.front().device());
  alloc.reset_peak();
  int64_t base = alloc.stats()[MemoryCategory::activation].current;
  Tensor loss;
  try {
    loss = loss_fn();
  } catch (...) {
    for (Span& s : spans) s.module->remove_hooks("planner_probe");
    throw;
  }
  for (Span& s : spans) s.module->remove_hooks("planner_probe");
  REMAT_CHECK(loss.defined() && graph_of(loss) != nullptr,
              "budget planner: the step function must return a tensor with a graph (the loss)");

  BudgetPlan p;
  p.tape_signature = tape_signature(loss);
  // The step's tape (over every graph its forward started), in recording order; a value is known
  // by the graph and value that produced it, whatever graph reads it.
  std::vector<TapeNode> tape = tape_of(loss);
  using Key = std::pair<Graph*, int64_t>;
  auto seq_of = [](const Key& k) {
    int64_t producer = k.first->values[k.second].producer;
    return producer < 0 ? int64_t{-1} : static_cast<int64_t>(k.first->nodes[producer]->seq);
  };
  auto counts = [](const Key& k) {  // what a step's activations are: not the parameters
    const ValueInfo& v = k.first->values[k.second];
    return v.producer >= 0 || !v.leaf;
  };
  // Values saved at the end of forward, attributed to the block whose node saves them.
  std::set<Key> counted;
  for (const Span& s : spans) {
    REMAT_CHECK(s.begin >= 0 && s.end >= s.begin, "budget planner: block ", s.name, " did not run in the step");
    PlannedBlock b;
    b.name = s.name;
    b.forward_ms = s.ms;
    std::set<Key> saved, inputs;
    for (const TapeNode& at : tape) {
      const Node& node = *at.graph->nodes[at.index];
      if (static_cast<int64_t>(node.seq) < s.begin || static_cast<int64_t>(node.seq) >= s.end) continue;
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
      if (counted.insert(k).second) b.saved_bytes += value_bytes(k.first->values[k.second]);
    for (const Key& k : inputs) b.input_bytes += value_bytes(k.first->values[k.second]);
    p.blocks.push_back(b);
  }
  for (const TapeNode& at : tape)
    for (const SavedSlot& slot : at.graph->nodes[at.index]->saved) {
      Key k = resolve_value(at.graph, slot.value);
      if (counts(k) && counted.insert(k).second) p.other_saved_bytes += value_bytes(k.first->values[k.second]);
    }
  backward(loss);  // the recording step is a normal training step
  loss = Tensor();
  p.none_peak_bytes = alloc.stats()[MemoryCategory::activation].peak - base;
  p.budget_bytes = percent_ > 0 ? static_cast<int64_t>(static_cast<double>(p.none_peak_bytes) * percent_ / 100.0)
                                 : budget_bytes_;
  for (PlannedBlock& b : p.blocks) b.checkpointed = true;
  p.floor_bytes = simulate_peak(p.blocks, p.other_saved_bytes);
  REMAT_CHECK(p.floor_bytes <= p.budget_bytes, "budget ", p.budget_bytes, " bytes is below the achievable floor of ",
              p.floor_bytes, " bytes (every block checkpointed; ", p.none_peak_bytes, " bytes without checkpointing)");

  // Exact search: walk the blocks in order keeping Pareto-optimal (prefix kept, worst replay, cost).
  struct State {
    int64_t prefix, worst;
    double cost;
    std::vector<bool> chosen;
  };
  std::vector<State> states{{0, 0, 0.0, {}}};
  for (const PlannedBlock& b : p.blocks) {
    std::vector<State> next;
    for (const State& s : states) {
      State keep = s, ckpt = s;
      keep.prefix += b.saved_bytes;
      keep.chosen.push_back(false);
      ckpt.worst = std::max(ckpt.worst, s.prefix + b.saved_bytes);
      ckpt.prefix += b.input_bytes;
      ckpt.cost += b.forward_ms;
      ckpt.chosen.push_back(true);
      for (State* c : {&keep, &ckpt})
        if (c->prefix <= p.budget_bytes && c->worst <= p.budget_bytes) next.push_back(std::move(*c));
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
  }
  const State* best = nullptr;
  for (const State& s : states)
    if (std::max(s.worst, s.prefix + p.other_saved_bytes) <= p.budget_bytes && (!best || s.cost < best->cost)) best = &s;
  REMAT_ASSERT(best != nullptr, "the all-checkpointed plan fits but the search found none");
  for (size_t i = 0; i < p.blocks.size(); ++i) {
    p.blocks[i].checkpointed = best->chosen[i];
    if (best->chosen[i]) {
      CheckpointOptions o;
      o.name = p.blocks[i].name;
      checkpoint(*spans[i].module, o);
    }
  }
  p.predicted_peak_bytes = simulate_peak(p.blocks, p.other_saved_bytes);
  p.predicted_recompute_ms = best->cost;
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
  out << "budget " << mib(budget_bytes) << " MiB (no checkpointing: " << mib(none_peak_bytes) << " MiB, floor "
      << mib(floor_bytes) << " MiB)\n";
  int n = 0;
  for (const PlannedBlock& b : blocks) n += b.checkpointed;
  out << "checkpoint " << n << " of " << blocks.size() << " blocks:";
  for (const PlannedBlock& b : blocks)
    if (b.checkpointed) out << " " << b.name;
  out << "\npredicted activation peak " << mib(predicted_peak_bytes) << " MiB, recompute " << predicted_recompute_ms
      << " ms per step\n";
  if (measured_peak_bytes >= 0)
    out << "measured activation peak " << mib(measured_peak_bytes) << " MiB, replay " << measured_replay_ms << " ms\n";
  return out.str();
}

}  // namespace remat
