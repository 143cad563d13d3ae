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
  // The loss of micro-batch `micro` of the step (the whole batch with one micro-batch), scaled by
  // 1 / micro_batches: data and the random stream reset first, each sample's dropout mask, noise
  // and time the same whichever micro-batch computes it.
  Tensor loss(int64_t micro = 0);
  int64_t micro_batches() const { return micro_batches_; }
  double items_per_step() const;
  const char* item_name() const;  // what items_per_step counts: "tokens" or "images"
  // Model FLOPs of one training step (models/gpt.h: train_flops_per_token); -1 for dit and unet,
  // which have no formula here.
  double model_flops_per_step() const;
  std::string describe() const;  // e.g. "gpt small (B 8, T 128, C 256, layers 6, dropout 0.1)"
  nlohmann::json config() const;
  // The analytical activation floor of a policy (docs/bench.md), -1 where there is no formula.
  int64_t activation_floor(const PolicySpec& spec) const;

 private:
  std::string micro_description() const;  // "" or " in N micro-batches of R rows"

  std::string model_name_, config_name_;
  uint64_t seed_;
  int64_t micro_batches_ = 1;
  // gpt
  GptConfig gpt_config_;
  std::unique_ptr<Gpt> gpt_;
  Tensor x_, y_;
  // dit, unet
  std::unique_ptr<TrainTask> task_;
  RngState data_state_;
};

}  // namespace remat::bench
