// ZeRO stage 1 for AdamW: each rank keeps the moments of its share of the parameters only, and
// updates those parameters; their new values then go to every rank (an all-gather per bucket).
// With the gradients averaged first by DataParallel (with zero1: reduce-scattered, so each rank
// receives only its share), the parameters are bitwise those of every rank running remat's AdamW
// on all of them, while each rank holds about 1/N of the optimizer state.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "buckets.h"
#include "process_group.h"

namespace remat::dist {

struct ShardedAdamWOptions {
  // As remat's AdamW: decoupled weight decay on parameters of two or more dimensions only.
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

class ShardedAdamW {
 public:
  // params: the same parameters in the same order on every rank. Each goes to one rank, as
  // DataParallel's zero1 mode gives it its gradient (Buckets::owner: by position in the
  // parameters' bytes, whatever the bucket sizes); bucket_bytes groups the all-gather of the
  // updated parameters.
  ShardedAdamW(std::vector<std::pair<std::string, Tensor>> params, ShardedAdamWOptions options = {},
               ProcessGroup& group = ProcessGroup::world(), int64_t bucket_bytes = kDefaultBucketBytes);
  // After DataParallel has averaged the gradients (of this rank's parameters at least): updates
  // this rank's parameters, then gathers every bucket's parameters from their owners (the same
  // values on every rank). A parameter without a gradient is left as it is, as AdamW does.
  void step(double lr);
  // clip_grad_norm (models/optim.h) over the gradients of every rank's parameters, each rank
  // scaling its own: the norm has the bits clip_grad_norm gives with every gradient on one rank
  // (each parameter's sum of squares from its owner, added in parameter order). Collective.
  double clip_grad_norm(double max_norm);
  int owner(size_t param) const { return layout_.owner[param]; }
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
  Buckets layout_;
  std::vector<Tensor> m_, v_;  // defined for this rank's parameters only
  int64_t steps_ = 0;
};

}  // namespace remat::dist
