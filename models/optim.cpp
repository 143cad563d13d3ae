// Optimizer implementations; the per-element updates are backend kernels.
#include "models/optim.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <set>

#include "autograd/cast_cache.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "kernels/backend.h"
#include "models/safetensors.h"

namespace remat {

ParamGroup::ParamGroup(const std::vector<Tensor>& unnamed) {
  for (size_t i = 0; i < unnamed.size(); ++i) params.emplace_back(std::to_string(i), unnamed[i]);
}

Optimizer::Optimizer(std::vector<ParamGroup> groups) : groups_(std::move(groups)) {
  std::set<std::string> names;
  std::set<const void*> seen;
  for (size_t g = 0; g < groups_.size(); ++g) {
    REMAT_CHECK(groups_[g].lr_scale >= 0, "optimizer: group ", g, " has lr_scale ", groups_[g].lr_scale,
                ", expected >= 0");
    for (const auto& [name, p] : groups_[g].params) {
      REMAT_CHECK(p.defined() && p.requires_grad() && p.is_leaf(), "optimizer: parameter '", name,
                  "' is not a leaf that requires grad, so it would never be trained (got ",
                  p.defined() ? p.meta_str() : std::string("an undefined tensor"),
                  "; Module::set_parameter makes a tensor a parameter)");
      REMAT_CHECK(names.insert(name).second, "optimizer: the parameter name '", name, "' appears twice");
      REMAT_CHECK(seen.insert(p.autograd_meta_ptr().get()).second, "optimizer: parameter '", name,
                  "' is the same tensor as another one (in two groups?)");
      params_.push_back(p);
      names_.push_back(name);
      group_of_.push_back(g);
    }
  }
}

void Optimizer::zero_grad() {
  for (Tensor& p : params_) p.zero_grad();
}

void Optimizer::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  std::map<std::string, const Tensor*> given;
  for (const auto& [name, t] : state) given[name] = &t;
  std::vector<std::pair<Tensor, const Tensor*>> copies;
  for (auto& [key, t] : this->state()) {
    auto found = given.find(key);
    REMAT_CHECK(found != given.end(), name(), " state: '", key, "' is missing (", state.size(), " tensors given)");
    REMAT_CHECK(found->second->shape() == t.shape(), name(), " state: '", key, "' has shape ",
                shape_str(found->second->shape()), ", the optimizer's ", shape_str(t.shape()));
    copies.emplace_back(t, found->second);
  }
  NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst.copy_(*src);
}

void Optimizer::save(const std::string& path) {
  save_safetensors(path, state(), {{"format", "remat optimizer"}, {"optimizer", name()}, {"steps", std::to_string(steps_)}});
}

void Optimizer::load(const std::string& path) {
  SafetensorsFile file = load_safetensors(path);
  auto meta = [&](const char* key) {
    auto found = file.metadata.find(key);
    return found == file.metadata.end() ? std::string() : found->second;
  };
  REMAT_CHECK(meta("format") == "remat optimizer", path, ": not a remat optimizer state (no format metadata)");
  REMAT_CHECK(meta("optimizer") == name(), path, ": holds the state of ", meta("optimizer"), ", not of ", name());
  std::string steps = meta("steps");
  int64_t count = -1;
  auto [stop, error] = std::from_chars(steps.data(), steps.data() + steps.size(), count);
  REMAT_CHECK(error == std::errc() && stop == steps.data() + steps.size() && count >= 0, path,
              ": expected a step count (a whole number >= 0) in its metadata, got '", steps, "'");
  load_state(file.tensors);
  steps_ = count;
}

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options) : Optimizer(std::move(groups)), options_(options) {
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  for (const Tensor& p : params_) {
    m_.push_back(Tensor::zeros(p.shape(), p.dtype(), p.device()));
    v_.push_back(Tensor::zeros(p.shape(), p.dtype(), p.device()));
  }
}

void AdamW::step(double lr) {
  NoGradGuard no_grad;
  ++steps_;
  std::vector<Tensor> grads(params_.size()), copies(params_.size());
  std::vector<Backend::AdamWTensors> items;
  for (size_t i = 0; i < params_.size(); ++i) {
    grads[i] = params_[i].grad();
    if (!grads[i].defined()) continue;
    const ParamGroup& group = groups_[group_of_[i]];
    double decay = group.weight_decay ? *group.weight_decay : params_[i].dim() >= 2 ? options_.weight_decay : 0.0;
    Backend::AdamWStep s{lr * group.lr_scale, options_.beta1, options_.beta2, options_.eps, decay, steps_};
    // The parameter's bf16 copy under autocast is rewritten in the update's pass, not cast again.
    copies[i] = detail::compute_copy_for_update(params_[i]);
    items.push_back({&params_[i], &grads[i], &m_[i], &v_[i], s, copies[i].defined() ? &copies[i] : nullptr});
  }
  adamw_update_by_device(items);
  for (size_t i = 0; i < params_.size(); ++i)
    if (copies[i].defined()) detail::compute_copy_updated(params_[i]);
}

std::vector<std::pair<std::string, Tensor>> AdamW::state() {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back(names_[i] + ".m", m_[i]);
    out.emplace_back(names_[i] + ".v", v_[i]);
  }
  return out;
}

Sgd::Sgd(std::vector<ParamGroup> groups, double momentum, double weight_decay)
    : Optimizer(std::move(groups)), momentum_(momentum), weight_decay_(weight_decay) {
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  for (const Tensor& p : params_) velocity_.push_back(Tensor::zeros(p.shape(), p.dtype(), p.device()));
}

void Sgd::step(double lr) {
  NoGradGuard no_grad;
  ++steps_;
  MemoryCategoryScope scope(MemoryCategory::workspace);  // temporaries of the update
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor g = params_[i].grad();
    if (!g.defined()) continue;
    const ParamGroup& group = groups_[group_of_[i]];
    double decay = group.weight_decay ? *group.weight_decay : weight_decay_;
    if (decay != 0) g = add(g, mul_scalar(params_[i], decay));
    // v = momentum * v + g;  p = p - lr * v
    velocity_[i].copy_(add(mul_scalar(velocity_[i], momentum_), g));
    params_[i].copy_(sub(params_[i], mul_scalar(velocity_[i], lr * group.lr_scale)));
  }
}

std::vector<std::pair<std::string, Tensor>> Sgd::state() {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) out.emplace_back(names_[i] + ".velocity", velocity_[i]);
  return out;
}

WeightAverage::WeightAverage(std::vector<Tensor> params, double decay) : params_(std::move(params)), decay_(decay) {
  REMAT_CHECK(decay > 0 && decay < 1, "weight average: expected a decay in (0, 1), got ", decay);
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  for (const Tensor& p : params_) averages_.push_back(p.clone());
}

double WeightAverage::current_decay() const {
  double n = static_cast<double>(updates_);
  return std::min(decay_, (1.0 + n) / (10.0 + n));
}

void WeightAverage::update() {
  NoGradGuard no_grad;
  MemoryCategoryScope scope(MemoryCategory::workspace);  // temporaries of the update
  double d = current_decay();
  ++updates_;
  // average = d * average + (1 - d) * parameter
  for (size_t i = 0; i < params_.size(); ++i)
    averages_[i].copy_(add(mul_scalar(averages_[i], d), mul_scalar(params_[i], 1.0 - d)));
}

Tensor clip_grad_norm_(const std::vector<Tensor>& params, double max_norm) {
  REMAT_CHECK(max_norm > 0, "clip_grad_norm: expected max_norm > 0, got ", max_norm);
  std::vector<Tensor> grads;
  for (const Tensor& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  bool one_device = !grads.empty() && std::all_of(grads.begin(), grads.end(), [&](const Tensor& g) {
    return g.device() == grads.front().device();
  });
  if (one_device) {
    NoGradGuard no_grad;
    MemoryCategoryScope scope(MemoryCategory::workspace);
    Tensor norm;
    if (backend_for(grads.front().device()).clip_by_total_norm(grads, max_norm, norm)) return norm;
  }
  return Tensor::scalar(clip_grad_norm(params, max_norm), DType::f64);  // on the host: the norm is read
}

double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  REMAT_CHECK(max_norm > 0, "clip_grad_norm: expected max_norm > 0, got ", max_norm);
  NoGradGuard no_grad;
  MemoryCategoryScope scope(MemoryCategory::workspace);
  double total = 0;
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(p.grad());
  for (double s : sum_squares_by_device(grads)) total += s;  // in parameter order (no gradient: 0)
  double norm = std::sqrt(total);
  if (norm > max_norm) {
    double scale = max_norm / (norm + 1e-6);
    for (const Tensor& p : params) {
      Tensor g = p.grad();
      if (g.defined()) g.copy_(mul_scalar(g, scale));
    }
  }
  return norm;
}

double cosine_lr(int64_t step, int64_t warmup, int64_t total, double max_lr, double min_lr) {
  if (warmup > 0 && step < warmup) return max_lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (step >= total) return min_lr;
  double progress = static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
  return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace remat
