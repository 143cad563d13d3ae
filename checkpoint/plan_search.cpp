// The budget planner's simulation of a choice of block options and its exact search over them.
#include <algorithm>
#include <tuple>

#include "checkpoint/planner.h"

namespace remat {

namespace {

int64_t saved_by_blocks(const std::vector<PlannedBlock>& blocks) {
  int64_t saved = 0;
  for (const PlannedBlock& b : blocks) saved += b.saved_bytes;
  return saved;
}

// Where the simulation stands after some blocks: what they keep, the worst peak so far, and what
// their offloads still hold on the device later: the copy that may be in flight until backward
// starts (at most the largest tensor of the last block that offloaded), the last block's prefetch
// window (its copies back during the next block's backward) and the largest block's (during the
// backward of a block that keeps everything, or of the head).
struct SimState {
  int64_t prefix = 0, worst = 0;
  int64_t in_flight = 0, last_prefetch = 0, most_prefetch = 0;
  bool no_worse_than(const SimState& o) const {
    return prefix <= o.prefix && worst <= o.worst && in_flight <= o.in_flight &&
           last_prefetch <= o.last_prefetch && most_prefetch <= o.most_prefetch;
  }
};

// The simulation's terms (planner.h) for block `b` under option `o` after the blocks in `s`: its
// forward, and its backward with replay (for an option that recomputes or offloads anything).
int64_t forward_term(const PlannedBlock& b, const BlockOption& o, const SimState& s) {
  return s.prefix + b.alive_before_bytes + o.forward_peak_bytes + o.extra_forward_bytes +
         std::max(s.in_flight, o.in_flight_bytes);
}
int64_t replay_term(const BlockOption& o, const StepMemory& step, const SimState& s) {
  return step.pre_saved + step.held + s.prefix + o.kept_bytes + o.rebuilt_bytes + o.prefetch_bytes + s.last_prefetch;
}
// The head's forward may still have forward's last copy in flight; its backward and that of kept
// blocks have prefetched copies (RegionManager::before_backward waits for the first to land).
int64_t tail_term(const std::vector<PlannedBlock>& blocks, const StepMemory& step, const SimState& s) {
  return step.after_blocks_peak - saved_by_blocks(blocks) + s.prefix + std::max(s.in_flight, s.most_prefetch);
}

// One block of the simulation: the state after block `b` under option `i`.
SimState advance(const PlannedBlock& b, size_t i, const StepMemory& step, SimState s) {
  const BlockOption& o = b.options[i];
  s.worst = std::max(s.worst, forward_term(b, o, s));
  if (i > 0) s.worst = std::max(s.worst, replay_term(o, step, s));
  s.prefix += o.kept_bytes;
  if (o.in_flight_bytes > 0) s.in_flight = o.in_flight_bytes;
  s.last_prefetch = o.prefetch_bytes;
  s.most_prefetch = std::max(s.most_prefetch, o.prefetch_bytes);
  return s;
}

}  // namespace

SimulatedPeak locate_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step) {
  SimulatedPeak peak{step.before_blocks_peak, "before the blocks"};
  auto consider = [&](int64_t bytes, const std::string& where) {
    if (bytes > peak.bytes) peak = {bytes, where};
  };
  SimState s;
  for (const PlannedBlock& b : blocks) {
    const BlockOption& o = b.options[static_cast<size_t>(b.choice)];
    consider(forward_term(b, o, s), b.name + "'s forward");
    if (b.choice > 0) consider(replay_term(o, step, s), b.name + "'s replay");
    s = advance(b, static_cast<size_t>(b.choice), step, s);
  }
  consider(tail_term(blocks, step, s), "the head, the loss and backward");
  return peak;
}

int64_t simulate_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step) {
  return locate_peak(blocks, step).bytes;
}

int64_t floor_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step) {
  // The search below without the time: the states no other beats in any of their figures.
  std::vector<SimState> states{SimState{0, step.before_blocks_peak}};
  for (const PlannedBlock& b : blocks) {
    std::vector<SimState> next;
    for (const SimState& s : states)
      for (size_t i = 0; i < b.options.size(); ++i) next.push_back(advance(b, i, step, s));
    std::sort(next.begin(), next.end(), [](const SimState& a, const SimState& c) {
      return std::tie(a.prefix, a.worst, a.in_flight, a.last_prefetch, a.most_prefetch) <
             std::tie(c.prefix, c.worst, c.in_flight, c.last_prefetch, c.most_prefetch);
    });
    states.clear();
    for (const SimState& c : next)
      if (std::none_of(states.begin(), states.end(), [&](const SimState& o) { return o.no_worse_than(c); }))
        states.push_back(c);
  }
  int64_t best = -1;
  for (const SimState& s : states) {
    int64_t peak = std::max(s.worst, tail_term(blocks, step, s));
    if (best < 0 || peak < best) best = peak;
  }
  return best;
}

OptionChoice choose_options(const std::vector<PlannedBlock>& blocks, const StepMemory& step, int64_t budget_bytes) {
  // Walk the blocks in order, trying every option of each, keeping the states no other beats in
  // all of time and the simulation's figures (bytes kept so far, worst peak so far, what offloads
  // hold later): a state dropped this way has a state at least as good in every later comparison,
  // so the search is exact.
  struct State {
    SimState sim;
    double cost;
    std::vector<int> choice;
  };
  OptionChoice out;
  if (step.before_blocks_peak > budget_bytes) return out;
  std::vector<State> states{{SimState{0, step.before_blocks_peak}, 0.0, {}}};
  for (const PlannedBlock& b : blocks) {
    std::vector<State> next;
    for (const State& s : states) {
      for (size_t i = 0; i < b.options.size(); ++i) {
        State t{advance(b, i, step, s.sim), s.cost, s.choice};
        if (i > 0) t.cost += b.options[i].cost_ms();
        t.choice.push_back(static_cast<int>(i));
        // Kept bytes only grow, so a prefix past the tail's share of the budget never fits.
        if (t.sim.worst <= budget_bytes && tail_term(blocks, step, t.sim) <= budget_bytes)
          next.push_back(std::move(t));
      }
    }
    std::sort(next.begin(), next.end(), [](const State& a, const State& c) {
      return std::tie(a.cost, a.sim.prefix, a.sim.worst) < std::tie(c.cost, c.sim.prefix, c.sim.worst);
    });
    states.clear();
    for (State& c : next) {
      bool dominated = std::any_of(states.begin(), states.end(), [&](const State& o) {
        return o.cost <= c.cost && o.sim.no_worse_than(c.sim);
      });
      if (!dominated) states.push_back(std::move(c));
    }
    out.search_states = std::max(out.search_states, states.size());
  }
  const State* best = nullptr;
  for (const State& s : states)
    if (std::max(s.sim.worst, tail_term(blocks, step, s.sim)) <= budget_bytes && (!best || s.cost < best->cost))
      best = &s;
  if (!best) return out;
  out.fits = true;
  out.cost_ms = best->cost;
  out.choice = best->choice;
  return out;
}

}  // namespace remat
