// ZeRO stage 1 for AdamW: each rank keeps the moments of its share of the parameters only, and
// updates those parameters; their new values then go from their owner to every rank. With the
// gradients averaged first (DataParallel), the parameters are bitwise those of every rank running
// remat's AdamW on all of them, while each rank holds about 1/N of the optimizer state.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "process_group.h"

namespace remat::dist {

struct ShardedAdamWOptions {
  // As remat's AdamW: decoupled weight decay on parameters of two or more dimensions only.
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

class ShardedAdamW {
 public:
  // params: the same parameters in the same order on every rank. Each goes to one rank: the one
  // with the fewest elements so far, in order (so the shares are balanced and the same everywhere).
  ShardedAdamW(std::vector<std::pair<std::string, Tensor>> params, ShardedAdamWOptions options = {},
               ProcessGroup& group = ProcessGroup::world());
  // After the gradients are averaged on every rank: updates this rank's parameters, then every
  // parameter from its owner (the same values on every rank). A parameter without a gradient is
  // left as it is, as AdamW does.
  void step(double lr);
  int owner(size_t param) const { return owner_[param]; }
  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) { steps_ = steps; }
  // Every parameter's moments, named "<parameter>.m" and "<parameter>.v" as AdamW names them, on
  // every rank (each from its owner): what a snapshot saves. Collective; the copies are temporary.
  std::vector<std::pair<std::string, Tensor>> gather_state();
  // Takes this rank's moments from a state named as gather_state() names it (every name there, with
  // its parameter's shape; checked before anything changes).
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state);
  int64_t state_bytes() const;  // this rank's moments

 private:
  std::vector<std::pair<std::string, Tensor>> params_;
  ShardedAdamWOptions options_;
  ProcessGroup& group_;
  std::vector<int> owner_;
  std::vector<Tensor> m_, v_;  // defined for this rank's parameters only
  int64_t steps_ = 0;
};

}  // namespace remat::dist
