// ZeRO-1 AdamW: moments sharded by parameter, updates by their owner, values broadcast from it.
#include "dist/sharded_adamw.h"

#include "autograd/grad_mode.h"
#include "kernels/backend.h"
#include "runtime/allocator.h"
#include "runtime/error.h"

namespace remat::dist {

ShardedAdamW::ShardedAdamW(std::vector<std::pair<std::string, Tensor>> params, ShardedAdamWOptions options,
                           ProcessGroup& group)
    : params_(std::move(params)), options_(options), group_(group) {
  std::vector<int64_t> load(static_cast<size_t>(group_.size()), 0);
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  for (auto& [name, p] : params_) {
    REMAT_CHECK(p.dtype() == DType::f32 || p.dtype() == DType::f64, "ShardedAdamW: parameter ", name,
                " is ", p.meta_str(), "; expected f32 or f64");
    int r = 0;
    for (int k = 1; k < group_.size(); ++k)
      if (load[k] < load[r]) r = k;
    load[r] += p.numel();
    owner_.push_back(r);
    bool mine = r == group_.rank();
    m_.push_back(mine ? Tensor::zeros(p.shape(), p.dtype(), p.device()) : Tensor());
    v_.push_back(mine ? Tensor::zeros(p.shape(), p.dtype(), p.device()) : Tensor());
  }
}

void ShardedAdamW::step(double lr) {
  NoGradGuard no_grad;
  ++steps_;
  for (size_t i = 0; i < params_.size(); ++i) {
    Tensor& p = params_[i].second;
    Tensor g = p.grad();
    // Whether the parameter has a gradient is the same on every rank after DataParallel.
    if (!g.defined()) continue;
    if (owner_[i] == group_.rank()) {
      double decay = p.dim() >= 2 ? options_.weight_decay : 0.0;
      Backend::AdamWStep s{lr, options_.beta1, options_.beta2, options_.eps, decay, steps_};
      backend_for(p.device()).adamw_update(p, g, m_[i], v_[i], s);
    }
    group_.broadcast(p, owner_[i]);
  }
}

std::vector<std::pair<std::string, Tensor>> ShardedAdamW::gather_state() {
  NoGradGuard no_grad;
  MemoryCategoryScope scope(MemoryCategory::optimizer);
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    bool mine = owner_[i] == group_.rank();
    for (const char* slot : {".m", ".v"}) {
      const Tensor& moment = slot[1] == 'm' ? m_[i] : v_[i];
      Tensor t = mine ? moment.clone() : Tensor::empty(p.shape(), p.dtype(), p.device());
      group_.broadcast(t, owner_[i]);
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
      if (owner_[i] == group_.rank()) copies.emplace_back(slot[1] == 'm' ? m_[i] : v_[i], found->second);
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
