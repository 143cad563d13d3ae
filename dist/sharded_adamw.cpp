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

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (size_t i = 0; i < m_.size(); ++i)
    if (m_[i].defined()) bytes += static_cast<int64_t>(m_[i].nbytes() + v_[i].nbytes());
  return bytes;
}

}  // namespace remat::dist
