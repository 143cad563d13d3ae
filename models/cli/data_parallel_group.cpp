// DataParallelGroup: the training loop's collectives on remat::dist.
#include "models/cli/data_parallel_group.h"

#include "autograd/module.h"
#include "dist/sharded_adamw.h"
#include "runtime/error.h"

namespace remat {

namespace {

// ZeRO-1 behind the Optimizer interface the loop and its snapshots use: the state it saves and
// loads is every parameter's, named as AdamW names it, so a run's files do not depend on sharding.
class ShardedAdamWOptimizer final : public Optimizer {
 public:
  ShardedAdamWOptimizer(std::vector<std::pair<std::string, Tensor>> params, AdamWOptions o, dist::ProcessGroup& group)
      : Optimizer({ParamGroup(params)}),
        sharded_(std::move(params), {.beta1 = o.beta1, .beta2 = o.beta2, .eps = o.eps, .weight_decay = o.weight_decay},
                 group) {}
  const char* name() const override { return "adamw"; }
  void step(double lr) override {
    sharded_.set_steps(steps_);
    sharded_.step(lr);
    steps_ = sharded_.steps();
  }
  std::vector<std::pair<std::string, Tensor>> state() override { return sharded_.gather_state(); }
  void load_state(const std::vector<std::pair<std::string, Tensor>>& state) override { sharded_.load_state(state); }
  dist::ShardedAdamW& sharded() { return sharded_; }

 private:
  dist::ShardedAdamW sharded_;
};

}  // namespace

DataParallelGroup::DataParallelGroup(int zero, dist::ProcessGroup& group) : zero_(zero), group_(group) {
  REMAT_CHECK(zero == 0 || zero == 1, "--zero: expected 0 (no sharding) or 1 (optimizer state sharded), got ", zero);
}

void DataParallelGroup::start(Module& model) {
  // With ZeRO-1, each rank receives the averaged gradients of the parameters its optimizer
  // updates (the two agree on the owners: dist/buckets.h).
  data_parallel_ = std::make_unique<dist::DataParallel>(model.named_parameters(), group_, dist::kDefaultBucketBytes,
                                                        /*zero1=*/zero_ == 1);
}

void DataParallelGroup::backward(const Tensor& loss) {
  REMAT_CHECK(data_parallel_ != nullptr, "DataParallelGroup: start(model) must come before backward");
  data_parallel_->backward(loss);
}

void DataParallelGroup::average_gradients() {
  REMAT_CHECK(data_parallel_ != nullptr, "DataParallelGroup: start(model) must come before average_gradients");
  data_parallel_->average_gradients();
}

double DataParallelGroup::mean(double value) {
  Tensor t = Tensor::full({1}, value, DType::f64);
  group_.all_reduce_sum(t);
  return t.item() / group_.size();
}

std::unique_ptr<Optimizer> DataParallelGroup::make_optimizer(std::vector<std::pair<std::string, Tensor>> params,
                                                             AdamWOptions options) {
  if (zero_ == 1) {
    auto optimizer = std::make_unique<ShardedAdamWOptimizer>(std::move(params), options, group_);
    sharded_ = &optimizer->sharded();
    return optimizer;
  }
  return std::make_unique<AdamW>(std::move(params), options);
}

double DataParallelGroup::clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  if (zero_ != 1) return TrainGroup::clip_grad_norm(params, max_norm);
  REMAT_CHECK(sharded_ != nullptr, "DataParallelGroup: with --zero 1, make_optimizer must come before clipping");
  return sharded_->clip_grad_norm(max_norm);
}

}  // namespace remat
