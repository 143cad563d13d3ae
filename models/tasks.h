// What the training loop trains: a model with its data and loss, built from a named config (or the
// config JSON stored with a run). gpt: next-token cross-entropy on the addition task; dit and
// unet: rectified flow on the shape images.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "../autograd/module.h"
#include "images.h"
#include "../runtime/random.h"

namespace remat {

class TrainTask {
 public:
  virtual ~TrainTask() = default;
  virtual Module& model() = 0;
  virtual Tensor next_loss() = 0;              // draws the next batch and returns its loss
  virtual double items_per_step() const = 0;   // tokens (gpt) or images (diffusion)
  virtual const char* item_name() const = 0;   // "tokens" or "images"
  virtual nlohmann::json config() const = 0;   // enough to rebuild the model
  virtual RngState data_state() const = 0;
  virtual void set_data_state(RngState s) = 0;
  // One line for the end of a run, e.g. the task's reference loss.
  virtual std::string reference_text() const = 0;
  // Diffusion models: the predicted velocity for x_t [B, 3, S, S] at times t [B] with labels [B].
  virtual Tensor velocity(const Tensor& x_t, const Tensor& t, const Tensor& labels);
  virtual int64_t image_size() const { return 0; }
  // Diffusion models: the probability of training a step's image without its class label (for
  // classifier-free guidance when sampling). Models without labels accept only 0.
  virtual void set_label_dropout(double p);
  // Diffusion models: how training draws the flow time t. Models without one accept only uniform.
  virtual void set_time_sampling(TimeSampling s);
  virtual double reference_loss() const { return 0; }
  // Data parallel: each step draws the batch of all `ranks` processes (ranks x the config's batch
  // rows, the same data on each) and this process computes its rows, rank x batch onwards, with
  // random ops in a batch shard (sample i sees the same data, dropout and noise on any rank).
  void set_batch_shard(int rank, int ranks) {
    REMAT_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "set_batch_shard: expected 0 <= rank < ranks, got rank ",
                rank, " of ", ranks);
    rank_ = rank, ranks_ = ranks;
  }
  int ranks() const { return ranks_; }
  // Gradient accumulation: this process's rows of a step computed in `count` micro-batches of
  // batch / count rows, micro-batch `index` by the next next_loss() (which draws the step's whole
  // batch again: the caller restores the data and random state before each micro-batch after the
  // first), with random ops in a batch shard, so that each sample sees what it would in one pass.
  void set_micro_batch(int64_t index, int64_t count) {
    REMAT_CHECK(count >= 1 && count <= batch() && batch() % count == 0, "expected a number of micro-batches that divides ",
                "the batch of ", batch(), " rows, got ", count);
    REMAT_CHECK(index >= 0 && index < count, "set_micro_batch: expected 0 <= index < ", count, ", got ", index);
    micro_index_ = index, micro_count_ = count;
  }
  virtual int64_t batch() const = 0;  // rows a process computes in a step (the config's batch)
  virtual double uniform_loss() const { return 0; }

  // Moves the model's parameters to `device`; batches are drawn on the host (the same data on
  // every device) and moved there.
  void to(Device device) {
    model().to(device);
    device_ = device;
  }
  Device device() const { return device_; }

 protected:
  // The rows of the drawn batch (ranks x batch rows) that the next loss computes.
  struct StepRows {
    int64_t begin = 0, rows = 0, total = 0;
  };
  StepRows step_rows() const {
    const int64_t b = batch(), micro = b / micro_count_;
    return {rank_ * b + micro_index_ * micro, micro, ranks_ * b};
  }

  int rank_ = 0, ranks_ = 1;
  int64_t micro_index_ = 0, micro_count_ = 1;

 private:
  Device device_ = Device::cpu();
};

// model: gpt, dit or unet. overrides: config fields by name (see `remat train --help`).
std::unique_ptr<TrainTask> make_task(const std::string& model, const std::string& config,
                                     const std::map<std::string, double>& overrides, uint64_t seed);
std::unique_ptr<TrainTask> make_task_from_json(const std::string& model, const nlohmann::json& config, uint64_t seed);
// The parameters the task's model would have (its config checked), without building it.
int64_t task_parameter_count(const std::string& model, const std::string& config,
                             const std::map<std::string, double>& overrides);

}  // namespace remat
