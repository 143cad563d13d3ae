// Memory-budget planning in eager mode. One step is recorded without checkpointing while hooks
// mark where each block of the model's block containers starts and ends on the tape; from it,
// per block: S (bytes its nodes save), E (bytes of its non-parameter inputs) and its forward time.
// The simulated activation peak of checkpointing a set C of blocks is
//   max( sum_j kept(j) + H,  max over j in C of [ sum_{i<j} kept(i) + S_j ] ),  kept(j) = E_j if j in C else S_j
// (H: what the rest of the model saves), the formula that remat-bench's floors check against the
// allocator. The planner picks C with the least recompute time whose simulated peak fits the
// budget (an exact search over Pareto-optimal prefixes), and places one region per chosen block.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../autograd/module.h"

namespace remat {

struct PlannedBlock {
  std::string name;  // dotted path of the block
  int64_t saved_bytes = 0, input_bytes = 0;
  double forward_ms = 0;
  bool checkpointed = false;
};

struct BudgetPlan {
  int64_t budget_bytes = 0;
  int64_t none_peak_bytes = 0;       // measured while recording (no checkpointing)
  int64_t other_saved_bytes = 0;     // H
  int64_t predicted_peak_bytes = 0;
  int64_t floor_bytes = 0;           // every block checkpointed
  double predicted_recompute_ms = 0;
  std::vector<PlannedBlock> blocks;
  uint64_t tape_signature = 0;       // op sequence of the recorded step
  // Filled after a step under the plan.
  int64_t measured_peak_bytes = -1;
  double measured_replay_ms = -1;
  std::string to_string() const;
};

// Simulated activation peak for the checkpointed set given in `blocks`.
int64_t simulate_peak(const std::vector<PlannedBlock>& blocks, int64_t other_saved_bytes);

class BudgetPlanner {
 public:
  // budget: bytes, or when percent > 0, that percentage of the recorded no-checkpoint peak.
  BudgetPlanner(Module& model, int64_t budget_bytes, double percent = 0);
  // Runs `loss_fn` once without checkpointing (then backward on its result, so the step's
  // gradients are those of a normal step), solves, and places the regions. Throws when the budget
  // is below the floor, stating the floor.
  const BudgetPlan& plan(const std::function<Tensor()>& loss_fn);
  // After a step under the plan: records its measured peak and replay time; returns false when the
  // tape no longer has the recorded shape (call plan() again).
  bool observe(const Tensor& loss, int64_t activation_peak_bytes, double replay_ms);
  const BudgetPlan& current() const { return plan_; }

 private:
  Module& model_;
  int64_t budget_bytes_;
  double percent_;
  BudgetPlan plan_;
};

// Op-sequence hash of the tape that produced `t` (0 without a tape).
uint64_t tape_signature(const Tensor& t);

}  // namespace remat
