// What `remat-bench` steps: a model with a fixed batch and its loss, the same data and random stream
// every step and every policy. gpt: next-token loss on one batch of the addition task (the batch
// counts as workspace, so activations start at zero); dit and unet: the rectified-flow loss on one
// batch of shape images (drawn inside the step, so the batch counts among the activations, the
// same bytes under every policy).
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "bench_policies.h"
#include "checkpoint/apply.h"
#include "models/gpt.h"
#include "models/tasks.h"

namespace remat::bench {

class Subject {
 public:
  explicit Subject(const PolicyOptions& o);
  Module& model();
  void to(Device device);
  // The step's loss: data and the random stream reset first.
  Tensor loss();
  double items_per_step() const;
  // Model FLOPs of one training step (models/gpt.h: train_flops_per_token); -1 for dit and unet,
  // which have no formula here.
  double model_flops_per_step() const;
  std::string describe() const;  // e.g. "gpt small (B 8, T 128, C 256, layers 6, dropout 0.1)"
  nlohmann::json config() const;
  // The analytical activation floor of a policy (docs/bench.md), -1 where there is no formula.
  int64_t activation_floor(const PolicySpec& spec) const;

 private:
  std::string model_name_, config_name_;
  uint64_t seed_;
  // gpt
  GptConfig gpt_config_;
  std::unique_ptr<Gpt> gpt_;
  Tensor x_, y_;
  // dit, unet
  std::unique_ptr<TrainTask> task_;
  RngState data_state_;
};

}  // namespace remat::bench
