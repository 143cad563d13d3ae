// The training loop's data parallel group (remat::TrainGroup) on remat::dist: DataParallel for the
// gradients, AdamW or ZeRO-1's ShardedAdamW for the update. The CLI makes one under mpirun.
#pragma once

#include <memory>
#include <string>

#include "dist/data_parallel.h"
#include "dist/process_group.h"
#include "dist/sharded_adamw.h"
#include "models/train.h"

namespace remat {

class DataParallelGroup final : public TrainGroup {
 public:
  // zero: 0 (every rank keeps all of AdamW's state) or 1 (each keeps its share: ZeRO-1).
  explicit DataParallelGroup(int zero = 0, dist::ProcessGroup& group = dist::ProcessGroup::world());
  int rank() const override { return group_.rank(); }
  int size() const override { return group_.size(); }
  void start(Module& model) override;
  void backward(const Tensor& loss) override;
  void average_gradients() override;
  double mean(double value) override;
  std::unique_ptr<Optimizer> make_optimizer(std::vector<std::pair<std::string, Tensor>> params,
                                            AdamWOptions options) override;
  std::string sharding() const override { return zero_ == 1 ? "zero1" : ""; }
  double clip_grad_norm(const std::vector<Tensor>& params, double max_norm) override;
  void report_failure(const std::string& what) override { group_.report_failure(what); }

 private:
  int zero_;
  dist::ProcessGroup& group_;
  std::unique_ptr<dist::DataParallel> data_parallel_;
  dist::ShardedAdamW* sharded_ = nullptr;  // the ZeRO-1 optimizer make_optimizer gave out
};

}  // namespace remat
