// Training loop shared by the `remat train` command and the tests: model from a named config,
// checkpoint policy, AdamW with cosine schedule and clipping, metrics per step, atomic snapshots
// (weights, optimizer moments, step, RNG and data state) that `--resume` continues bit for bit,
// and an optional moving average of the weights (what diffusion models are sampled with).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "optim.h"

namespace remat {

class Module;

// Data parallel training: the loop runs on every process of a group, each computing its rows of
// the batch. remat::dist provides the group (the CLI under mpirun); the loop itself links no MPI.
// Every call is collective: every rank makes it, in the same order.
class TrainGroup {
 public:
  virtual ~TrainGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Once the model is built (and resumed): rank 0's parameters on every rank.
  virtual void start(Module& model) = 0;
  // Backward of this rank's loss; then every gradient is the mean over ranks.
  virtual void backward(const Tensor& loss) = 0;
  // After plain remat::backward on each micro-batch of a step: every gradient the mean over ranks.
  virtual void average_gradients() = 0;
  // The mean over ranks of a per-rank value (the loss), the same bits on every rank.
  virtual double mean(double value) = 0;
  // The optimizer of the run: AdamW, or one whose state is sharded over the ranks (ZeRO-1). Its
  // state() is collective and gives every parameter's state on every rank.
  virtual std::unique_ptr<Optimizer> make_optimizer(std::vector<std::pair<std::string, Tensor>> params,
                                                    AdamWOptions options) = 0;
  // "zero1" when the optimizer state is sharded, "" otherwise (recorded in the run's state).
  virtual std::string sharding() const = 0;
  // clip_grad_norm over every rank's gradients (models/optim.h), after backward. A group whose
  // ranks hold only their share of the gradients (ZeRO-1) computes the norm they would give on
  // one rank; by default, the gradients are all here.
  virtual double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);
  // This rank leaves on an exception: the others fail with its message instead of waiting.
  virtual void report_failure(const std::string& what) = 0;
};

struct TrainOptions {
  std::string model = "gpt";  // gpt, dit or unet
  std::string config = "small";
  std::map<std::string, double> overrides;  // config fields by name (models/tasks.cpp lists them per model)
  std::string policy;         // "" = none (or, when resuming, the policy of the run)
  // The schedule. Unset fields take the defaults below, or when resuming the run's own values;
  // fields set on a resume change the schedule from the resumed step on (e.g. extend a run).
  std::optional<int64_t> steps;     // length of the schedule (300)
  int64_t stop_at = -1;       // stop after this step (an interrupted run); -1: run to `steps`
  std::string device = "cpu";
  std::string dtype = "f32";  // compute dtype: f32, or bf16 (mixed precision with f32 master weights; cuda only)
  uint64_t seed = 0;
  std::string out;            // run directory ("" = write nothing)
  std::string resume;         // run directory to continue from
  std::optional<double> lr, min_lr;  // peak and final learning rate (1e-3, 1e-4)
  std::optional<int64_t> warmup;     // linear warmup steps (20)
  // Decay of the weight average written to model.safetensors (0 = none: the raw weights).
  // Unset when resuming: the run's own.
  std::optional<double> ema;
  // dit, unet: probability of dropping a step's class label, so that the model also learns the
  // unconditional velocity that `remat sample --guidance` needs (default 0). Unset when resuming: the run's own.
  std::optional<double> label_dropout;
  // dit, unet: how the flow time t is drawn, "uniform" (default) or "logit-normal". Unset when resuming: the run's own.
  std::optional<std::string> time_sampling;
  // With resume: start the schedule again at the resumed step (warmup, then the cosine from lr down to
  // min_lr at `steps`): a warm restart, to continue a run that has finished its decay at a useful rate.
  // Without it the cosine stays the one over the run's whole length, only stretched to a new `steps`.
  bool restart = false;
  // Gradient accumulation: each step's batch in this many micro-batches, one after the other,
  // their gradients summed before the update; the activations of one micro-batch at a time. The
  // same data, dropout masks and noise as one pass; the sums in another order (within rounding).
  // Unset: 1, or when resuming the run's own.
  std::optional<int64_t> micro_batches;
  double weight_decay = 0.1, clip = 1.0;
  int64_t save_every = 100;   // snapshot period in steps (and at the end)
  // An --out that holds a run already is refused unless resumed into or replaced on purpose.
  bool overwrite = false;
  // Keep every step's metrics in TrainResult::steps (a long run from the CLI keeps none: they go
  // to metrics.jsonl and the progress callback).
  bool keep_step_metrics = true;
  // Data parallel (not owned): every rank calls train() with the same options; rank 0 alone checks
  // and writes the run directory, which every rank must be able to read on --resume. A resumed run
  // needs the world size it was trained with (its global batch is ranks x batch).
  TrainGroup* group = nullptr;
};

inline constexpr int64_t kMaxSteps = 1'000'000'000;  // a schedule longer than this is a typo

struct StepMetrics {
  int64_t step;
  double loss, lr, step_ms;
  int64_t peak_bytes, activation_peak_bytes, current_bytes;
  double tokens_per_s;
};

struct TrainResult {
  std::vector<StepMetrics> steps;  // steps run by this call (when TrainOptions::keep_step_metrics)
  int64_t steps_run = 0;
  StepMetrics last_step{};
  double first_loss = 0, final_loss = 0;
  double reference_loss = 0, uniform_loss = 0;
  int64_t peak_bytes = 0, activation_peak_bytes = 0;
  double tokens_per_s = 0;
  int64_t parameters = 0;
  std::string plan_report;  // budget policies: the planner's choice, predicted and measured
  std::string reference_text;  // what the loss compares with (task reference, ...)
  std::string item_name = "tokens";
  std::string schedule_note;  // resumed with a changed schedule: what changed
};

// Called after every step (progress display).
using StepCallback = std::function<void(const StepMetrics&, int64_t total_steps)>;

// Called once before the first step with a line worth telling the user (a changed schedule).
using NoteCallback = std::function<void(const std::string&)>;

TrainResult train(const TrainOptions& options, const StepCallback& on_step = {}, const NoteCallback& on_note = {});

}  // namespace remat
