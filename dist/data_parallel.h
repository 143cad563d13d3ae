// Data parallel training as users know it from DDP: parameters broadcast from rank 0, gradients
// averaged over ranks after backward, in buckets of contiguous memory, deterministically (the same
// bits on every run for a given number of ranks); for ZeRO-1, each rank gets only the gradients of
// the parameters it updates.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "buckets.h"
#include "process_group.h"

namespace remat::dist {

class DataParallel {
 public:
  // params: the model's parameters, in the same order on every rank (Module::named_parameters).
  // Copies rank 0's values to every rank at once. zero1: each rank receives the averaged gradients
  // of the parameters it owns only (Buckets::owner; a reduce-scatter, half an all-reduce's
  // traffic), for ShardedAdamW to update them; every other parameter is left without a gradient.
  DataParallel(std::vector<std::pair<std::string, Tensor>> params, ProcessGroup& group = ProcessGroup::world(),
               int64_t bucket_bytes = kDefaultBucketBytes, bool zero1 = false);
  // After backward on every rank: every parameter's gradient becomes the mean over ranks (a
  // parameter without a gradient on some rank counts as zeros there; on every rank it then has one;
  // with zero1, the parameters this rank owns have one, the others none).
  void average_gradients();
  // backward(loss) and average_gradients() in one, overlapped: each bucket starts travelling as
  // soon as backward has finished its parameters' gradients, while backward goes on. The same bits
  // as the two calls. The gradients must be zero (undefined) before; to accumulate over
  // micro-batches, call remat::backward on each and average_gradients() once.
  void backward(const Tensor& loss);
  // Buckets the last backward(loss) sent before backward had finished.
  int64_t buckets_sent_during_backward() const { return sent_during_backward_; }
  ProcessGroup& group() { return group_; }
  int64_t buckets() const { return static_cast<int64_t>(layout_.size()); }
  const Buckets& layout() const { return layout_; }

 private:
  std::vector<std::pair<std::string, Tensor>> params_;
  ProcessGroup& group_;
  Buckets layout_;
  bool zero1_;
  std::unordered_map<const AutogradMeta*, size_t> index_of_;
  int64_t sent_during_backward_ = 0;

  Tensor pack(size_t bucket, const std::vector<Tensor>& grads) const;  // zeros where undefined
  ProcessGroup::PendingSum start(size_t bucket, Tensor& sum);           // all-reduce or reduce-scatter
  void set_means(size_t bucket, const Tensor& sum);
};

}  // namespace remat::dist
