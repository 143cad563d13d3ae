// Memory-budget planning in eager mode, op by op within each block. One step is recorded without
// checkpointing while hooks mark where each block of the model's block containers starts and ends
// on the tape and on the allocator's event timeline; every op's forward time is measured as it is
// recorded. For each block the planner builds options, each a set of the block's ops whose outputs
// are dropped (the others' outputs are saved; replay re-runs what rebuilding the dropped slots
// needs): by what is dropped, every subset of the ops whose outputs the block's backward reads (a
// greedy walk, cheapest re-run time per byte freed first, past 12 of them); by op, the ops in
// order of recorded time per byte of output, cheapest first (views and pointwise ops come first on
// their own), every prefix of that order, and the sets by op class (shape and pointwise; + norms
// and reductions; + matrix products; everything). An op whose outputs neither backward nor replay
// reads is dropped in every option. For each option the tape gives what the block keeps through
// forward (kept: its inputs, the outputs of the ops it saves and the saved slots those cover) and
// the most its replay holds above that (rebuilt: the re-run ops in one pass, rebuilt slots kept
// and other outputs freed after their last use there, each allocation counted once: a view costs
// nothing but keeps what it views alive), and the recorded time of those ops. The timeline gives,
// per block, what was alive at its start besides earlier blocks' saved tensors (A) and its forward
// working set under each option (F: the recorded one, less each saved storage the option drops
// from the moment the program let go of it, which a watch on the recording dates), and the peaks
// before the first block and after the last one. The simulated activation peak of a choice is the
// largest of
//   before the blocks:              the measured peak there,
//   block j's forward:              sum_{i<j} kept(i) + A_j + F_j(option) + X_j,
//   block j's replay (if any):      P + sum_{i<j} kept(i) + kept(j) + rebuilt(j),
//   the head, loss and its backward: the measured peak there - sum_j S_j + sum_j kept(j),
// (S_j: what block j saves without checkpointing; X_j: outputs it saves that no backward reads;
// P: what the ops before the blocks save), which
// equals the measured peak when nothing is checkpointed and bounds what per-node replay holds. The
// planner picks the options with the least recompute time whose simulated peak fits the budget, by
// an exact search over Pareto-optimal prefixes (time, kept bytes, worst peak so far, and what
// offloads hold later), and places a
// region on each block that recomputes anything, with a policy that decides by op position. The
// first step under the plan times the ops again, warm, and the search runs again with those times.
//
// On a GPU an option can also offload: the saved outputs of some of the block's matrix products and
// attention go to host memory in forward and come back in backward (Graph::offload). Their device
// bytes leave the kept ones; the simulation adds what the copies hold on the device (one copy in
// flight in forward, at most the largest tensor offloaded so far; in a block's backward the copies
// its replay reads, those its nodes unpack and those prefetch brings back four nodes ahead, into
// the block before it too; the largest such window through the head's and kept blocks' backward),
// and the time counts the transfer the block's compute does not hide: max(0, bytes / bandwidth -
// forward time) in forward and max(0, bytes / bandwidth - 2 x forward time) in backward
// (backward's matrix products do twice forward's work), the bandwidth timed once on the device.
// Each block's options are built in block_options.cpp, the simulation and the search live in
// plan_search.cpp, offload's costs in offload_cost.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../autograd/module.h"
#include "policy.h"

namespace remat {

// One way to treat a block: which of its ops replay re-runs (by position in the block's region;
// empty: keep the block, no region), the bytes it keeps through forward, the most its replay holds
// on top (re-run as one pass; replay per backward node holds less), and the recorded time of the
// ops the replay re-runs; on a GPU, which saved outputs go to host memory, and the transfer time
// forward and backward do not hide.
struct BlockOption {
  std::string name;            // "keep", "all", or what replay re-runs, e.g. "3 of 19 ops: layer_norm, gelu"
  std::vector<bool> recompute;  // by position: dropped in forward (the others' outputs are saved)
  std::vector<bool> offload;    // by position: saved outputs moved to host memory (empty: none)
  int64_t kept_bytes = 0, rebuilt_bytes = 0;
  double recompute_ms = 0;
  int64_t offloaded_bytes = 0;   // moved to host in forward, back in backward
  int64_t in_flight_bytes = 0;   // the largest of them: a copy in flight holds it on the device
  int64_t prefetch_bytes = 0;    // the most their copies back hold at once in backward (5 nodes' slots)
  double transfer_ms = 0;        // the exposed transfer time (offload_exposed_ms)
  double cost_ms() const { return recompute_ms + transfer_ms; }
  int64_t extra_forward_bytes = 0;  // saved outputs no backward reads: held in forward beyond what none holds
  std::vector<bool> reruns;         // by position: what replay re-runs to rebuild the dropped slots
  // The block's forward working set under this option (above what was alive at its start): the
  // recorded one less the dropped saved values, each from when the program let go of it.
  int64_t forward_peak_bytes = 0;
};

// The region policy of an option: the ops at the positions marked recompute are recomputed, those
// marked offload have their outputs moved to host memory (MUST_OFFLOAD), the others' saved.
Policy position_policy(std::vector<bool> recompute, std::string name, std::vector<bool> offload = {});

// The transfer time of `bytes` offloaded by a block whose ops take `forward_ms` that its compute
// does not hide: the copy out overlaps forward, the copy back backward (about twice forward).
double offload_exposed_ms(int64_t bytes, double forward_ms, double gbps);

// Offload as a planner option: only where the model's parameters live on a GPU (REMAT_OFFLOAD=0
// turns it off for every planner). The bandwidth in GB/s between device and pinned host memory: 0
// measures it once per device (64 MiB each way through an 8 MiB buffer, timed on the host;
// REMAT_OFFLOAD_GBPS overrides).
struct OffloadSettings {
  bool enabled = true;
  double gbps = 0;
};
// Device-to-host-and-back bandwidth of GPU `index` in GB/s (REMAT_OFFLOAD_GBPS when set), measured
// on the first call and remembered.
double offload_bandwidth_gbps(int index);

struct PlannedBlock {
  std::string name;  // dotted path of the block
  int64_t saved_bytes = 0, input_bytes = 0;  // no checkpointing: what its nodes save; its inputs
  // Recorded without checkpointing: what was alive at the block's start besides the earlier
  // blocks' saved tensors (A), and the most its forward allocated above that start (F; each
  // option has its own, this one's when kept).
  int64_t alive_before_bytes = 0, forward_peak_bytes = 0;
  double forward_ms = 0;
  double ops_ms = 0;  // its ops' recorded (or retimed) forward times added up: what hides a transfer
  // options[0]: keep; none dominated by another in kept bytes, replay peak, forward peak,
  // offloaded bytes and time
  std::vector<BlockOption> options;
  std::vector<size_t> tape_positions;  // where the block's ops sit on the step's tape, in its order
  int choice = 0;                    // the plan's option
  bool checkpointed = false;         // choice != 0
};

// What the recorded step measured outside the blocks (bytes above the activations alive before
// the step).
struct StepMemory {
  int64_t before_blocks_peak = 0;  // the peak before the first block started
  int64_t pre_saved = 0;           // saved by the ops before the first block (alive through every replay)
  int64_t held = 0;                // the loss, which the program holds through backward (and every replay)
  int64_t after_blocks_peak = 0;   // the peak from the last block's end through backward
};

struct BudgetPlan {
  BudgetScope scope = BudgetScope::activations;
  int64_t budget_bytes = 0;          // for the activations (a total budget less fixed_bytes)
  int64_t total_budget_bytes = -1;   // scope total: the budget as given (or its percentage, in bytes)
  int64_t fixed_bytes = 0;           // scope total: parameters, gradients, optimizer state, workspace
  int64_t none_total_peak_bytes = 0; // measured while recording, every category
  int64_t none_peak_bytes = 0;       // measured while recording (no checkpointing)
  StepMemory step;
  int64_t predicted_peak_bytes = 0;
  std::string predicted_peak_at;     // where the simulation puts that peak (locate_peak)
  int64_t floor_bytes = 0;           // the least simulated peak of any choice (floor_peak)
  size_t search_states = 0;          // the largest Pareto front the search kept
  double predicted_recompute_ms = 0;
  double offload_gbps = 0;              // 0: offload not considered (a CPU model, or turned off)
  int64_t predicted_offloaded_bytes = 0;
  double predicted_transfer_ms = 0;     // exposed transfer time of the chosen offloads
  std::vector<PlannedBlock> blocks;
  uint64_t tape_signature = 0;       // op sequence of the recorded step
  bool retimed = false;              // op times from a step under the plan (BudgetPlanner::retime)
  // Filled after a step under the plan.
  int64_t measured_peak_bytes = -1;
  double measured_replay_ms = -1;
  std::string to_string() const;
};

// Simulated activation peak for the options chosen in `blocks`.
int64_t simulate_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step);
// The same, and which term of the simulation reaches it first: "before the blocks", "<block>'s
// forward", "<block>'s replay" or "the head, the loss and backward". Where a budget's cost comes
// from: the blocks before that point must keep less for a lower budget to fit.
struct SimulatedPeak {
  int64_t bytes = 0;
  std::string where;
};
SimulatedPeak locate_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step);
// The least simulated peak any choice of options reaches.
int64_t floor_peak(const std::vector<PlannedBlock>& blocks, const StepMemory& step);

// The options with the least recompute and exposed transfer time whose simulated peak fits the
// budget (fits = false when none does), and the largest Pareto front the search kept.
struct OptionChoice {
  bool fits = false;
  std::vector<int> choice;  // per block, an index into its options
  double cost_ms = 0;
  size_t search_states = 0;
};
OptionChoice choose_options(const std::vector<PlannedBlock>& blocks, const StepMemory& step, int64_t budget_bytes);

class BudgetPlanner {
 public:
  // budget: bytes, or when percent > 0, that percentage of the recorded no-checkpoint peak, of the
  // activations or (scope total) of every byte: then the bytes the step holds besides activations
  // (the peaks of the other categories while recording, an upper bound) come off the budget first.
  BudgetPlanner(Module& model, int64_t budget_bytes, double percent = 0,
                BudgetScope scope = BudgetScope::activations);
  // Whether (and at what bandwidth) plans may offload on a GPU; takes effect at the next plan().
  void set_offload(OffloadSettings settings) { offload_ = settings; }
  // Runs `loss_fn` once without checkpointing (then backward on its result, or `backward_fn` when
  // given, e.g. data parallel's, so the step's gradients are those of a normal step), solves, and
  // places the regions. Throws when the budget is below the floor, stating the floor.
  const BudgetPlan& plan(const std::function<Tensor()>& loss_fn,
                         const std::function<void(const Tensor&)>& backward_fn = {});
  // Places another choice of the planned options (one index per block into its options, 0 for
  // keep) in place of the one plan() chose, budget or not, and returns the plan with its simulated
  // peak and recompute time: a plan pinned by hand, or each option measured against its prediction.
  const BudgetPlan& place(const std::vector<int>& choice);
  // After a step under the plan (its backward done, `loss` still held): records its measured peak
  // and replay time, and the first time also retimes; returns false when the tape no longer has
  // the recorded shape (call plan() again).
  bool observe(const Tensor& loss, int64_t activation_peak_bytes, double replay_ms);
  // Takes the ops' times from a step under the plan (`loss`'s tape) in place of the recording
  // step's, and chooses again among the planned options with them. The recording step is the
  // run's first, cold (fresh pages behind every new allocation, cold caches): on gpt small it timed
  // a block's layer norm and GELU 2.6x their later times, and those with its linears 1.6x, so the
  // ranking it gave favoured pointwise ops less than it should. Memory figures stay the recorded
  // ones, so the new choice fits the budget as the old one did (a choice placed by hand is
  // replaced by the search's too). On a GPU an op's host time is its launch, not its kernels: the
  // step's forward must run under DeviceOpTiming (autograd/graph.h), whose events then give the
  // times. Returns whether the choice changed (then placed); false also when the tape differs from
  // the recorded one, on a GPU without events, or when the plan was retimed already.
  bool retime(const Tensor& loss);
  // Whether a plan waits to be retimed (a GPU step's forward then wants DeviceOpTiming).
  bool wants_retime() const;
  const BudgetPlan& current() const { return plan_; }

 private:
  Module& model_;
  int64_t budget_bytes_;
  double percent_;
  BudgetScope scope_;
  OffloadSettings offload_;
  BudgetPlan plan_;
};

// Op-sequence hash of the tape that produced `t` (0 without a tape).
uint64_t tape_signature(const Tensor& t);

}  // namespace remat
