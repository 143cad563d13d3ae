// The bench's model, batch and loss for gpt, dit and unet.
#include "bench_subject.h"

#include <fmt/format.h>

#include <algorithm>
#include <tuple>

#include "autograd/ops.h"
#include "kernels/backend.h"
#include "models/data.h"
#include "runtime/random.h"

namespace remat::bench {

namespace {

GptConfig gpt_bench_config(const PolicyOptions& o) {
  GptConfig c = gpt_config(o.config);
  for (const auto& [key, value] : o.overrides) {
    if (key == "batch") c.batch = static_cast<int64_t>(value);
    else if (key == "layers") c.layers = static_cast<int64_t>(value);
    else if (key == "seq_len") c.seq_len = static_cast<int64_t>(value);
    else if (key == "dropout") c.dropout = value;
    else if (key == "fused_loss") c.fused_loss = value != 0;
    else REMAT_FAIL("unknown config override '", key, "': expected batch, layers, seq_len, dropout or fused_loss");
  }
  return c;
}

}  // namespace

Subject::Subject(const PolicyOptions& o)
    : model_name_(o.model), config_name_(o.config), seed_(o.seed), micro_batches_(o.micro_batches) {
  REMAT_CHECK(o.model == "gpt" || o.model == "dit" || o.model == "unet", "unknown model '", o.model,
              "': expected gpt, dit or unet");
  if (o.model == "gpt") {
    gpt_config_ = gpt_bench_config(o);
    REMAT_CHECK(micro_batches_ >= 1 && gpt_config_.batch % micro_batches_ == 0, "--micro-batches: expected a number ",
                "that divides the batch of ", gpt_config_.batch, " rows, got ", micro_batches_);
    {
      MemoryCategoryScope scope(MemoryCategory::workspace);  // the batch is input data, not activations
      AdditionTask data(gpt_config_.vocab, o.seed + 1);
      std::tie(x_, y_) = data.batch(gpt_config_.batch, gpt_config_.seq_len);
    }
    manual_seed(o.seed);
    gpt_ = std::make_unique<Gpt>(gpt_config_);
    return;
  }
  REMAT_CHECK(!o.overrides.count("seq_len"), "--seq-len: only gpt has a sequence length");
  task_ = make_task(o.model, o.config, o.overrides, o.seed);
  task_->set_micro_batch(0, micro_batches_);  // checks that they divide the batch
  data_state_ = task_->data_state();
}

Module& Subject::model() { return gpt_ ? static_cast<Module&>(*gpt_) : task_->model(); }

void Subject::to(Device device) {
  if (gpt_) {
    gpt_->to(device);
    MemoryCategoryScope scope(MemoryCategory::workspace);
    x_ = x_.to(device), y_ = y_.to(device);
  } else {
    task_->to(device);
  }
}

Tensor Subject::loss(int64_t micro) {
  REMAT_CHECK(micro >= 0 && micro < micro_batches_, "Subject::loss: expected a micro-batch below ", micro_batches_,
              ", got ", micro);
  set_rng_state({seed_ + 7, 0});  // the same dropout masks, noise and times every step and every policy
  Tensor loss;
  if (gpt_ && micro_batches_ == 1) {
    loss = gpt_->loss(x_, y_);
  } else if (gpt_) {
    const int64_t rows = gpt_config_.batch / micro_batches_, begin = micro * rows;
    Tensor x, y;
    {
      MemoryCategoryScope scope(MemoryCategory::workspace);  // input data, as the whole batch is
      x = contiguous(slice(x_, 0, begin, begin + rows)), y = contiguous(slice(y_, 0, begin, begin + rows));
    }
    RngBatchShardScope shard(begin, rows, gpt_config_.batch);
    loss = gpt_->loss(x, y);
  } else {
    task_->set_data_state(data_state_);
    task_->set_micro_batch(micro, micro_batches_);
    loss = task_->next_loss();
  }
  return micro_batches_ == 1 ? loss : mul_scalar(loss, 1.0 / static_cast<double>(micro_batches_));
}

std::string Subject::micro_description() const {
  if (micro_batches_ == 1) return "";
  const int64_t batch = gpt_ ? gpt_config_.batch : task_->batch();
  return fmt::format(" in {} micro-batches of {} rows", micro_batches_, batch / micro_batches_);
}

double Subject::model_flops_per_step() const {
  return gpt_ ? train_flops_per_token(gpt_config_) * static_cast<double>(gpt_config_.batch * gpt_config_.seq_len) : -1;
}

double Subject::items_per_step() const {
  return gpt_ ? static_cast<double>(gpt_config_.batch * gpt_config_.seq_len) : task_->items_per_step();
}

const char* Subject::item_name() const { return gpt_ ? "tokens" : task_->item_name(); }

std::string Subject::describe() const {
  if (gpt_)
    return fmt::format("gpt {} (B {}, T {}, C {}, layers {}, dropout {}{}){}", gpt_config_.name, gpt_config_.batch,
                       gpt_config_.seq_len, gpt_config_.channels, gpt_config_.layers, gpt_config_.dropout,
                       gpt_config_.fused_loss ? ", fused loss" : "", micro_description());
  return fmt::format("{} {} ({}){}", model_name_, config_name_, task_->config().dump(), micro_description());
}

nlohmann::json Subject::config() const {
  if (!gpt_) return task_->config();
  const GptConfig& c = gpt_config_;
  return {{"name", c.name},       {"batch", c.batch},   {"seq_len", c.seq_len}, {"channels", c.channels},
          {"heads", c.heads},     {"layers", c.layers}, {"vocab", c.vocab},     {"dropout", c.dropout},
          {"fused_loss", c.fused_loss}};
}

int64_t Subject::activation_floor(const PolicySpec& spec) const {
  if (!gpt_) return -1;
  const GptConfig& c = gpt_config_;
  // A micro-batch's rows: each is a forward and backward of its own.
  const int64_t rows = c.batch / micro_batches_;
  const int64_t f = 4, E = rows * c.seq_len * c.channels * f, st = rows * c.seq_len * f;
  const int64_t lse = rows * c.heads * c.seq_len * f;
  // What backward saves of one block; where the projection reads attention's output as a view (no
  // re-laid-out copy), one E less: the CPU kernel, and on CUDA only the bf16 tensor-core kernels,
  // which f = 4 does not describe (f32 takes the GEMM path, which writes [B, H, T, D]).
  const bool shared_output = x_.device().is_cpu();
  const int64_t S = (shared_output ? 16 : 17) * E + 4 * st + lse;
  // ln_f in/out, stats, lse, and the logits, which the fused loss does not keep.
  const int64_t logits = rows * c.seq_len * c.vocab * f;
  const int64_t head = 2 * E + 3 * st + (c.fused_loss ? 0 : logits);
  int n = 0;
  switch (spec.kind) {
    case PolicySpec::Kind::none: n = 0; break;
    case PolicySpec::Kind::full: n = 1; break;
    case PolicySpec::Kind::block_skip: n = spec.n; break;
    default: return -1;
  }
  // End of forward: every block's kept bytes plus the head. Replay of checkpointed block j: the
  // blocks before it, plus its whole saved set rebuilt (its input among them).
  int64_t kept = 0, peak = 0;
  for (int64_t j = 0; j < c.layers; ++j) {
    bool checkpointed = n > 0 && j % n == 0;
    if (checkpointed) peak = std::max(peak, kept + S);
    kept += checkpointed ? E : S;
  }
  return std::max(peak, kept + head);
}

}  // namespace remat::bench
