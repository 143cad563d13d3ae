// CheckpointScope and checkpoint_sequential.
#include "checkpoint/checkpoint.h"

#include <cstdio>

#include "autograd/grad_mode.h"
#include "checkpoint/region.h"

namespace remat {

CheckpointScope::CheckpointScope(CheckpointOptions options) : uncaught_(std::uncaught_exceptions()) {
  if (!grad_enabled()) return;  // nothing is recorded, so there is nothing to drop
  graph_ = current_graph();
  region_ = RegionManager::of(*graph_).open(*graph_, std::move(options));
}

CheckpointScope::~CheckpointScope() noexcept(false) {
  if (!graph_) return;
  try {
    RegionManager::of(*graph_).close(*graph_, region_);
  } catch (...) {
    if (std::uncaught_exceptions() > uncaught_) return;  // already unwinding: the first error wins
    throw;
  }
}

Tensor checkpoint_sequential(const std::vector<TensorFn>& fns, int segments, const Tensor& x,
                             const CheckpointOptions& options) {
  int count = static_cast<int>(fns.size());
  REMAT_CHECK(segments > 0 && segments <= count, "checkpoint_sequential: expected 1 <= segments <= ", count,
              " (the number of functions), got ", segments);
  int size = count / segments;
  Tensor h = x;
  int start = 0;
  for (int s = 0; s < segments; ++s) {
    int stop = s == segments - 1 ? count : start + size;
    auto run = [&] {
      for (int i = start; i < stop; ++i) h = fns[i](h);
    };
    if (s < segments - 1) {
      CheckpointOptions segment_options = options;
      if (!segment_options.name.empty()) segment_options.name += "." + std::to_string(s);
      CheckpointScope scope(segment_options);
      run();
    } else {
      run();
    }
    start = stop;
  }
  return h;
}

}  // namespace remat
