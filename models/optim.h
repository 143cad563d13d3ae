// Optimizers (AdamW, SGD with momentum), gradient clipping by global norm, and the cosine
// learning-rate schedule with linear warmup. Updates run in place under no-grad.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../runtime/tensor.h"

namespace remat {

class Optimizer {
 public:
  explicit Optimizer(std::vector<Tensor> params) : params_(std::move(params)) {}
  virtual ~Optimizer() = default;
  virtual void step(double lr) = 0;  // uses each parameter's .grad; parameters without one are skipped
  void zero_grad();                  // drops the gradients (frees them)
  // Named state tensors (for checkpoints): "<param index>.<name>" -> tensor.
  virtual std::vector<std::pair<std::string, Tensor>> state() = 0;
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }

 protected:
  std::vector<Tensor> params_;
  int64_t steps_ = 0;
};

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

class AdamW final : public Optimizer {
 public:
  AdamW(std::vector<Tensor> params, AdamWOptions options = {});
  void step(double lr) override;
  std::vector<std::pair<std::string, Tensor>> state() override;

 private:
  AdamWOptions options_;
  std::vector<Tensor> m_, v_;  // first and second moments, optimizer memory
};

class Sgd final : public Optimizer {
 public:
  Sgd(std::vector<Tensor> params, double momentum = 0.9, double weight_decay = 0.0);
  void step(double lr) override;
  std::vector<std::pair<std::string, Tensor>> state() override;

 private:
  double momentum_, weight_decay_;
  std::vector<Tensor> velocity_;
};

// Exponential moving average of the parameters, the weights diffusion models are sampled with.
// The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates (n = updates so far)
// so that a short run's average is not dominated by its random initialisation.
class WeightAverage {
 public:
  WeightAverage(std::vector<Tensor> params, double decay);  // starts as a copy of the parameters
  void update();                                            // after each optimizer step
  double decay() const { return decay_; }
  int64_t updates() const { return updates_; }
  void set_updates(int64_t n) { updates_ = n; }
  double current_decay() const;                             // the decay the next update uses
  const std::vector<Tensor>& averages() const { return averages_; }

 private:
  std::vector<Tensor> params_, averages_;
  double decay_;
  int64_t updates_ = 0;
};

// Scales all gradients so their global L2 norm is at most max_norm; returns the norm before.
double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);

// Linear warmup to max_lr over `warmup` steps, then cosine decay to min_lr at `total` steps.
double cosine_lr(int64_t step, int64_t warmup, int64_t total, double max_lr, double min_lr);

}  // namespace remat
