// Optimizers (AdamW, SGD with momentum) over named parameter groups, with state keyed by parameter
// name and saved to safetensors; gradient clipping by global norm, and the cosine learning-rate
// schedule with linear warmup. Updates run in place under no-grad.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../runtime/tensor.h"

namespace remat {

// Parameters that share hyperparameters. Each has a name, and the names key the optimizer's state
// (so a saved state loads into a model built again, whatever the order of its parameters).
struct ParamGroup {
  std::vector<std::pair<std::string, Tensor>> params;
  double lr_scale = 1.0;               // the group's learning rate is lr * lr_scale
  std::optional<double> weight_decay;  // unset: the optimizer's own rule

  ParamGroup() = default;
  // Named parameters (Module::named_parameters()).
  ParamGroup(std::vector<std::pair<std::string, Tensor>> named) : params(std::move(named)) {}
  // Unnamed parameters: named by their position, "0", "1", ...
  ParamGroup(const std::vector<Tensor>& unnamed);
  ParamGroup(std::initializer_list<Tensor> unnamed) : ParamGroup(std::vector<Tensor>(unnamed)) {}
};

class Optimizer {
 public:
  // Every parameter must require grad (one that does not would never be trained) and appear once.
  explicit Optimizer(std::vector<ParamGroup> groups);
  virtual ~Optimizer() = default;
  virtual const char* name() const = 0;
  virtual void step(double lr) = 0;  // uses each parameter's .grad; parameters without one are skipped
  void zero_grad();                  // drops the gradients (frees them)
  // The state tensors (the optimizer's own) named "<parameter name>.<slot>", e.g.
  // "blocks.0.attn.qkv.weight.m".
  virtual std::vector<std::pair<std::string, Tensor>> state() = 0;
  // Copies `state` (as state() names it) into this optimizer: every name must be there, with its
  // shape. Throws before changing anything otherwise.
  virtual void load_state(const std::vector<std::pair<std::string, Tensor>>& state);
  // The state and the step count in a safetensors file (written atomically), and back.
  void save(const std::string& path);
  void load(const std::string& path);
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }
  const std::vector<ParamGroup>& groups() const { return groups_; }

 protected:
  std::vector<ParamGroup> groups_;
  // Flattened over the groups, in order.
  std::vector<Tensor> params_;
  std::vector<std::string> names_;
  std::vector<size_t> group_of_;
  int64_t steps_ = 0;
};

struct AdamWOptions {
  // weight_decay applies, decoupled, to parameters of two or more dimensions, and not to biases
  // and norm weights (GPT-2 practice), unless a group sets its own.
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

class AdamW final : public Optimizer {
 public:
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options = {});
  AdamW(ParamGroup params, AdamWOptions options = {}) : AdamW(std::vector<ParamGroup>{std::move(params)}, options) {}
  const char* name() const override { return "adamw"; }
  void step(double lr) override;
  std::vector<std::pair<std::string, Tensor>> state() override;

 private:
  AdamWOptions options_;
  std::vector<Tensor> m_, v_;  // first and second moments, optimizer memory
};

class Sgd final : public Optimizer {
 public:
  // weight_decay: L2, added to the gradient, for every parameter (unless a group sets its own).
  Sgd(std::vector<ParamGroup> groups, double momentum = 0.9, double weight_decay = 0.0);
  Sgd(ParamGroup params, double momentum = 0.9, double weight_decay = 0.0)
      : Sgd(std::vector<ParamGroup>{std::move(params)}, momentum, weight_decay) {}
  const char* name() const override { return "sgd"; }
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
// The same, returning the norm as a 0-d f64 tensor without reading it: where every gradient is on
// one GPU, the sums, the norm and the scaling stay on it (no host synchronisation; read the norm
// with item() when it is logged). The same bits as clip_grad_norm.
Tensor clip_grad_norm_(const std::vector<Tensor>& params, double max_norm);

// Linear warmup to max_lr over `warmup` steps, then cosine decay to min_lr at `total` steps.
double cosine_lr(int64_t step, int64_t warmup, int64_t total, double max_lr, double min_lr);

}  // namespace remat
