// Data parallel training as users know it from DDP: parameters broadcast from rank 0, gradients
// averaged over ranks after backward, in buckets of contiguous memory, deterministically (the same
// bits on every run for a given number of ranks).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "process_group.h"

namespace remat::dist {

class DataParallel {
 public:
  // params: the model's parameters, in the same order on every rank (Module::named_parameters).
  // Copies rank 0's values to every rank at once.
  DataParallel(std::vector<std::pair<std::string, Tensor>> params, ProcessGroup& group = ProcessGroup::world(),
               int64_t bucket_bytes = int64_t{25} << 20);
  // After backward on every rank: every parameter's gradient becomes the mean over ranks (a
  // parameter without a gradient on some rank counts as zeros there; on every rank it then has one).
  void average_gradients();
  ProcessGroup& group() { return group_; }
  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  std::vector<std::pair<std::string, Tensor>> params_;
  ProcessGroup& group_;
  std::vector<std::vector<size_t>> buckets_;  // parameter indices, by dtype, at most bucket_bytes each
};

}  // namespace remat::dist
