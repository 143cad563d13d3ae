// ZeRO-1 AdamW: moments sharded by parameter, updates by their owner, values all-gathered by bucket.
#include "dist/sharded_adamw.h"

#include <cmath>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "kernels/backend.h"
#include "runtime/allocator.h"
#include "runtime/error.h"

namespace remat::dist {

ShardedAdamW::ShardedAdamW(std::vector<std::pair<std::string, Tensor>> params, ShardedAdamWOptions options,
                           ProcessGroup& group, int64_t bucket_bytes)
    : params_(std::move(params)), options_(options), group_(group), layout_(params_, bucket_bytes, group.size()) {
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    REMAT_CHECK(p.dtype() == DType::f32 || p.dtype() == DType::f64, "ShardedAdamW: parameter ", name, " is ",
                p.meta_str(), "; expected f32 or f64");
    bool mine = layout_.owner[i] == group_.rank();
    m_.push_back(mine ? Tensor::zeros(p.shape(), p.dtype(), p.device()) : Tensor());
    v_.push_back(mine ? Tensor::zeros(p.shape(), p.dtype(), p.device()) : Tensor());
  }
}

void ShardedAdamW::step(double lr) {
  NoGradGuard no_grad;
  ++steps_;
  std::vector<Tensor> grads(params_.size());
  std::vector<Backend::AdamWTensors> items;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor& p = params_[i].second;
    grads[i] = p.grad();
    if (layout_.owner[i] != group_.rank() || !grads[i].defined()) continue;
    double decay = p.dim() >= 2 ? options_.weight_decay : 0.0;
    Backend::AdamWStep s{lr, options_.beta1, options_.beta2, options_.eps, decay, steps_};
    items.push_back({&p, &grads[i], &m_[i], &v_[i], s});
  }
  adamw_update_by_device(items);
  // Every bucket's parameters from their owners: each rank's run of the bucket is its chunk.
  MemoryCategoryScope scope(MemoryCategory::workspace);
  for (size_t b = 0; b < layout_.size(); ++b) {
    const Tensor& first = params_[layout_.members[b].front()].second;
    Tensor flat = Tensor::empty({layout_.numel[b]}, first.dtype(), first.device());
    auto slot = [&](size_t i) {
      const Shape& shape = params_[i].second.shape();
      return flat.view(shape, contiguous_strides(shape), layout_.offset[i]);
    };
    for (size_t i : layout_.members[b])
      if (layout_.owner[i] == group_.rank()) slot(i).copy_(params_[i].second);
    group_.all_gather_chunks(flat, layout_.owned[b], /*shapes_checked=*/true);
    for (size_t i : layout_.members[b])
      if (layout_.owner[i] != group_.rank()) params_[i].second.copy_(slot(i));
  }
}

double ShardedAdamW::clip_grad_norm(double max_norm) {
  REMAT_CHECK(max_norm > 0, "clip_grad_norm: expected max_norm > 0, got ", max_norm);
  NoGradGuard no_grad;
  MemoryCategoryScope scope(MemoryCategory::workspace);
  // Each parameter's sum of squares from its owner, zeros elsewhere: the rank-order sum of the
  // all-reduce adds only zeros to each, so every rank gets the owners' values exactly.
  std::vector<Tensor> grads;
  for (size_t i = 0; i < params_.size(); ++i)
    grads.push_back(layout_.owner[i] == group_.rank() ? params_[i].second.grad() : Tensor());
  std::vector<double> squares = sum_squares_by_device(grads);
  Tensor all = Tensor::from_vector(squares, {static_cast<int64_t>(squares.size())});
  group_.all_reduce_sum(all);
  double total = 0;
  for (double s : all.to_vector<double>()) total += s;  // in parameter order, as clip_grad_norm adds
  const double norm = std::sqrt(total);
  if (norm > max_norm) {  // the scaling of clip_grad_norm (models/optim.cpp), for the same bits
    const double scale = max_norm / (norm + 1e-6);
    for (size_t i = 0; i < params_.size(); ++i) {
      Tensor g = params_[i].second.grad();
      if (layout_.owner[i] == group_.rank() && g.defined()) g.copy_(mul_scalar(g, scale));
    }
  }
  return norm;
}

std::vector<std::pair<std::string, Tensor>> ShardedAdamW::gather_state() {
  NoGradGuard no_grad;
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    bool mine = layout_.owner[i] == group_.rank();
    for (const char* slot : {".m", ".v"}) {
      const Tensor& moment = slot[1] == 'm' ? m_[i] : v_[i];
      Tensor t = mine ? moment.clone() : Tensor::empty(p.shape(), p.dtype(), p.device());
      group_.broadcast(t, layout_.owner[i]);
      out.emplace_back(name + slot, std::move(t));
    }
  }
  return out;
}

void ShardedAdamW::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
  std::map<std::string, const Tensor*> given;
  for (const auto& [name, t] : state) given[name] = &t;
  std::vector<std::pair<Tensor, const Tensor*>> copies;
  for (size_t i = 0; i < params_.size(); ++i)
    for (const char* slot : {".m", ".v"}) {
      const auto& [name, p] = params_[i];
      auto found = given.find(name + slot);
      REMAT_CHECK(found != given.end(), "ShardedAdamW state: '", name, slot, "' is missing (", state.size(),
                  " tensors given)");
      REMAT_CHECK(found->second->shape() == p.shape(), "ShardedAdamW state: '", name, slot, "' has shape ",
                  shape_str(found->second->shape()), ", the parameter ", shape_str(p.shape()));
      if (layout_.owner[i] == group_.rank()) copies.emplace_back(slot[1] == 'm' ? m_[i] : v_[i], found->second);
    }
  NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst.copy_(*src);
}

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (size_t i = 0; i < m_.size(); ++i)
    if (m_[i].defined()) bytes += static_cast<int64_t>(m_[i].nbytes() + v_[i].nbytes());
  return bytes;
}

}  // namespace remat::dist
