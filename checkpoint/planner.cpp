// The budget planner: record a step, build each block's options (block_options.cpp), search (plan_search.cpp), place.
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
#include "checkpoint/block_options.h"
#include "runtime/cuda_backend.h"

namespace remat {

namespace {

using planning::block_candidates;
using planning::BlockTape;
using planning::Candidate;
using planning::counts;
using planning::forward_peak;
using planning::HeldBytes;
using planning::Key;
using planning::undominated;
using planning::value_bytes;

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

int64_t seq_of(const Key& k) {
  int64_t producer = k.first->values[k.second].producer;
  return producer < 0 ? int64_t{-1} : static_cast<int64_t>(k.first->nodes[producer]->seq);
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
  if (offload_gbps > 0)  // offload was an option: what the plan moves, or that it moves nothing
    out << ", offload " << mib(predicted_offloaded_bytes) << " MiB (" << predicted_transfer_ms
        << " ms of transfer not hidden, at " << offload_gbps << " GB/s)";
  out << "\n";
  if (measured_peak_bytes >= 0)
    out << "measured activation peak " << mib(measured_peak_bytes) << " MiB, replay " << measured_replay_ms << " ms\n";
  return out.str();
}

}  // namespace remat
