// The training loop and its snapshots.
#include "models/train.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <cmath>
#include <filesystem>
#include <fmt/format.h>
#include <map>
#include <optional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/graph.h"
#include "autograd/ops.h"
#include "checkpoint/apply.h"
#include "autograd/autocast.h"
#include "checkpoint/planner.h"
#include "checkpoint/region.h"
#include "models/tasks.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "runtime/random.h"

namespace remat {

double TrainGroup::clip_grad_norm(const std::vector<Tensor>& params, double max_norm) {
  return remat::clip_grad_norm(params, max_norm);
}

namespace {

std::string metrics_line(const StepMetrics& m, const char* items) {
  return nlohmann::json{{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"step_ms", m.step_ms},
                        {"peak_bytes", m.peak_bytes}, {"activation_peak_bytes", m.activation_peak_bytes},
                        {std::string(items) + "_per_s", m.tokens_per_s}}
             .dump();
}

struct RunState {
  int64_t step = 0;  // steps completed
  std::string pending_metrics;  // metrics.jsonl lines since the last snapshot (appended with it)
};

// metrics.jsonl holds what the snapshot holds: a resumed run drops the lines of steps after it
// (they are run again), reading the file once, line by line.
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in.good()) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) continue;
    if (j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  in.close();
  write_file_atomically(path, kept);
}

void append_metrics(const std::string& path, const std::string& lines) {
  if (lines.empty()) return;
  std::ofstream out(path, std::ios::app | std::ios::binary);
  out << lines;
  out.flush();
  REMAT_CHECK(out.good(), "cannot append to ", path, ": ", std::strerror(errno));
}

// The run directory's lock: a second `remat train` into the same folder is refused while this one
// runs (flock: released by the system if the process dies).
class RunLock {
 public:
  explicit RunLock(const std::string& dir) {
    std::string path = dir + "/.lock";
    fd_ = ::open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    REMAT_CHECK(fd_ >= 0, "--out ", dir, ": cannot create the lock file ", path, ": ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      REMAT_FAIL("--out ", dir, ": another remat train is writing to this run (", path, " is locked)");
    }
  }
  ~RunLock() { ::close(fd_); }
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

// Checks that `dir` can become a run directory without creating anything.
void check_out_dir(const std::string& dir, bool continuing, bool overwrite) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    REMAT_CHECK(fs::is_directory(dir, ec), "--out ", dir, ": exists and is not a directory");
    bool holds_run = fs::exists(fs::path(dir) / "state.safetensors", ec) || fs::exists(fs::path(dir) / "metrics.jsonl", ec);
    REMAT_CHECK(continuing || overwrite || !holds_run, "--out ", dir, ": holds a run already; pass --resume ", dir,
                " to continue it, or --overwrite to replace it");
    REMAT_CHECK(::access(dir.c_str(), W_OK) == 0, "--out ", dir, ": the directory is not writable");
  } else {
    fs::path parent = fs::absolute(fs::path(dir)).parent_path();
    REMAT_CHECK(fs::is_directory(parent, ec), "--out ", dir, ": its parent folder ", parent.string(), " does not exist");
    REMAT_CHECK(::access(parent.c_str(), W_OK) == 0, "--out ", dir, ": cannot create it in ", parent.string(),
                " (not writable)");
  }
}

// The schedule of a run with every field resolved (defaults, the resumed run's, or given).
struct Schedule {
  int64_t steps = 300;
  double lr = 1e-3, min_lr = 1e-4;
  int64_t warmup = 20;
  double ema = 0;  // 0: no weight average
  double label_dropout = 0;
  std::string time_sampling = "uniform";
  int64_t start = 0;  // the step the schedule (warmup, then cosine) begins at: 0, or a restart's

  double lr_at(int64_t step) const { return cosine_lr(step - start, warmup, steps - start, lr, min_lr); }

  std::string changes_from(const Schedule& was) const {
    std::string out;
    auto note = [&](const char* name, auto before, auto after) {
      if (before != after) out += fmt::format("{}{} {} -> {}", out.empty() ? "" : ", ", name, before, after);
    };
    note("steps", was.steps, steps), note("lr", was.lr, lr), note("min_lr", was.min_lr, min_lr);
    note("warmup", was.warmup, warmup), note("ema", was.ema, ema);
    note("label_dropout", was.label_dropout, label_dropout);
    note("time_sampling", was.time_sampling, time_sampling);
    if (start != was.start) out += fmt::format("{}restarted at step {}", out.empty() ? "" : ", ", start);
    return out;
  }
};

// Under data parallel every rank calls it (the optimizer's state may be sharded) and rank 0 writes.
void save_snapshot(const std::string& dir, TrainTask& task, Optimizer& opt, const WeightAverage* average,
                   const TrainOptions& o, const Schedule& sched, RunState& run, bool write) {
  std::vector<std::pair<std::string, Tensor>> optimizer_state = opt.state();
  if (!write) return;
  std::vector<std::pair<std::string, Tensor>> weights = task.model().named_parameters();
  std::map<std::string, std::string> model_meta = {{"format", "remat"}, {"model", o.model}, {"config", task.config().dump()}};
  std::vector<std::pair<std::string, Tensor>> state;
  for (auto& [name, t] : weights) state.emplace_back("param." + name, t);
  for (auto& [name, t] : optimizer_state) state.emplace_back("optim." + name, t);
  if (average) {
    // model.safetensors holds what is used for inference: the average; the raw weights stay in the state.
    for (size_t i = 0; i < weights.size(); ++i) {
      state.emplace_back("ema." + weights[i].first, average->averages()[i]);
      weights[i].second = average->averages()[i];
    }
    model_meta["weights"] = fmt::format("moving average, decay {}, {} updates", average->decay(), average->updates());
  }
  // Tells `remat sample --guidance` that the model has learned the unconditional velocity too.
  if (sched.label_dropout > 0) model_meta["label_dropout"] = fmt::format("{}", sched.label_dropout);
  save_safetensors(dir + "/model.safetensors", weights, model_meta);
  RngState rng = rng_state(), data_rng = task.data_state();
  nlohmann::json meta = {{"model", o.model}, {"config", task.config()}, {"policy", o.policy},
                         {"steps", sched.steps}, {"step", run.step}, {"seed", o.seed},
                         {"rng_seed", rng.seed}, {"rng_offset", rng.offset},
                         {"data_seed", data_rng.seed}, {"data_offset", data_rng.offset},
                         {"optimizer_steps", opt.steps()}, {"lr", sched.lr}, {"min_lr", sched.min_lr},
                         {"warmup", sched.warmup}, {"weight_decay", o.weight_decay}, {"clip", o.clip},
                         {"ema", sched.ema}, {"ema_updates", average ? average->updates() : 0},
                         {"label_dropout", sched.label_dropout}, {"time_sampling", sched.time_sampling},
                         {"schedule_start", sched.start}, {"ranks", task.ranks()},
                         {"micro_batches", o.micro_batches.value_or(1)},
                         {"optimizer_sharding", o.group ? o.group->sharding() : std::string()}};
  save_safetensors(dir + "/state.safetensors", state, {{"training_state", meta.dump()}});
  append_metrics(dir + "/metrics.jsonl", run.pending_metrics);
  run.pending_metrics.clear();
}

}  // namespace

TrainResult train(const TrainOptions& options, const StepCallback& on_step, const NoteCallback& on_note) {
  TrainOptions o = options;
  TrainGroup* group = o.group;
  const bool lead = group == nullptr || group->rank() == 0;  // the rank that checks and writes the run folder
  const int ranks = group ? group->size() : 1;
  Schedule sched, resumed_sched;
  nlohmann::json resumed;
  SafetensorsFile state_file;
  if (!o.resume.empty()) {
    std::string path = o.resume + "/state.safetensors";
    REMAT_CHECK(std::filesystem::exists(path), "--resume ", o.resume, ": no training state (", path, " is missing)");
    state_file = load_safetensors(path);
    auto found = state_file.metadata.find("training_state");
    REMAT_CHECK(found != state_file.metadata.end(), path, ": not a remat training state (no training_state metadata)");
    try {
      resumed = nlohmann::json::parse(found->second);
      o.model = resumed.at("model");
      if (o.policy.empty()) o.policy = resumed.at("policy").get<std::string>();
      resumed_sched.steps = resumed.at("steps"), resumed_sched.lr = resumed.at("lr");
      resumed_sched.min_lr = resumed.at("min_lr"), resumed_sched.warmup = resumed.at("warmup");
      resumed_sched.ema = resumed.value("ema", 0.0);  // states written before the average had none
      resumed_sched.label_dropout = resumed.value("label_dropout", 0.0);
      resumed_sched.time_sampling = resumed.value("time_sampling", std::string("uniform"));
      resumed_sched.start = resumed.value("schedule_start", int64_t{0});
      sched = resumed_sched;
      o.weight_decay = resumed.at("weight_decay"), o.clip = resumed.at("clip"), o.seed = resumed.at("seed");
      int64_t trained_ranks = resumed.value("ranks", int64_t{1});
      REMAT_CHECK(trained_ranks == ranks, "--resume ", o.resume, ": the run trained on ", trained_ranks,
                  " process", trained_ranks == 1 ? "" : "es", " (a global batch of ", trained_ranks, " x its batch); this launch has ",
                  ranks, ": resume it with mpirun -np ", trained_ranks, trained_ranks == 1 ? " or without mpirun" : "");
    } catch (const nlohmann::json::exception& e) {
      REMAT_FAIL(path, ": corrupted training state: ", e.what());
    }
    if (o.out.empty()) o.out = o.resume;
  }
  if (o.policy.empty()) o.policy = "none";
  if (!o.micro_batches) o.micro_batches = resumed.is_null() ? 1 : resumed.value("micro_batches", int64_t{1});
  if (o.steps) sched.steps = *o.steps;
  if (o.lr) sched.lr = *o.lr;
  if (o.min_lr) sched.min_lr = *o.min_lr;
  if (o.warmup) sched.warmup = *o.warmup;
  if (o.ema) sched.ema = *o.ema;
  if (o.label_dropout) sched.label_dropout = *o.label_dropout;
  if (o.time_sampling) sched.time_sampling = *o.time_sampling;
  REMAT_CHECK(!o.restart || !resumed.is_null(), "--restart starts the schedule again at a resumed step; it needs --resume");
  if (o.restart) {
    sched.start = resumed.at("step").get<int64_t>();
    REMAT_CHECK(sched.steps > sched.start, "--restart at step ", sched.start, ": expected --steps beyond it, got ",
                sched.steps);
  }
  TimeSampling time_sampling = parse_time_sampling(sched.time_sampling);
  REMAT_CHECK(sched.steps > 0, "expected --steps >= 1, got ", sched.steps);
  REMAT_CHECK(sched.lr > 0 && sched.min_lr >= 0 && sched.min_lr <= sched.lr,
              "expected 0 <= --min-lr <= --lr and --lr > 0, got lr ", sched.lr, " and min_lr ", sched.min_lr);
  REMAT_CHECK(sched.warmup >= 0, "expected --warmup >= 0, got ", sched.warmup);
  REMAT_CHECK(sched.ema == 0 || (sched.ema > 0 && sched.ema < 1), "expected --ema 0 (off) or a decay in (0, 1), got ",
              sched.ema);
  REMAT_CHECK(sched.label_dropout >= 0 && sched.label_dropout < 1, "expected --label-dropout in [0, 1), got ",
              sched.label_dropout);
  REMAT_CHECK(o.save_every >= 1, "expected --save-every >= 1, got ", o.save_every);
  REMAT_CHECK(sched.steps <= kMaxSteps, "expected --steps <= ", kMaxSteps, ", got ", sched.steps);
  REMAT_CHECK(o.stop_at >= -1, "expected --stop-at >= 0 (or -1: none), got ", o.stop_at);
  REMAT_CHECK(std::isfinite(o.clip) && o.clip > 0, "expected --clip > 0, got ", o.clip);
  REMAT_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "expected a weight decay >= 0, got ", o.weight_decay);
  REMAT_CHECK(std::isfinite(sched.lr) && std::isfinite(sched.min_lr), "expected finite learning rates");
  Device device = parse_device(o.device);
  DType compute = parse_compute_dtype(o.dtype, device);
  PolicySpec policy = parse_policy(o.policy);
  // Nothing is created on disk before every check has passed: the run folder, then the model.
  if (!o.out.empty() && lead) check_out_dir(o.out, !o.resume.empty(), o.overwrite);
  std::unique_ptr<TrainTask> task = resumed.is_null() ? make_task(o.model, o.config, o.overrides, o.seed)
                                                      : make_task_from_json(o.model, resumed.at("config"), o.seed);
  if (group) task->set_batch_shard(group->rank(), ranks);
  const int64_t micro_batches = *o.micro_batches;
  task->set_micro_batch(0, micro_batches);  // checks that they divide the batch
  if (!resumed.is_null() && on_note && micro_batches != resumed.value("micro_batches", int64_t{1}))
    on_note(fmt::format("micro-batches changed from {} to {}: the same data and masks, the gradients summed in "
                        "another order", resumed.value("micro_batches", int64_t{1}), micro_batches));
  std::unique_ptr<RunLock> lock;
  if (!o.out.empty() && lead) {
    std::error_code ec;
    std::filesystem::create_directories(o.out, ec);
    REMAT_CHECK(!ec && std::filesystem::is_directory(o.out), "--out ", o.out, ": cannot create the directory (",
                ec ? ec.message() : "not a directory", ")");
    lock = std::make_unique<RunLock>(o.out);
    if (resumed.is_null()) std::filesystem::remove(o.out + "/metrics.jsonl", ec);  // --overwrite: a new run
  }
  task->set_label_dropout(sched.label_dropout);
  task->set_time_sampling(time_sampling);
  task->to(device);
  Module& model = task->model();
  model.train();
  // A budget is planned on the first step of this run (a normal training step, recorded).
  std::unique_ptr<BudgetPlanner> planner;
  bool planned = false;
  if (policy.kind == PolicySpec::Kind::budget)
    planner = std::make_unique<BudgetPlanner>(model, policy.budget_bytes, policy.budget_percent, policy.budget_scope);
  else apply_policy(model, policy);
  std::vector<Tensor> params = model.parameters();
  AdamWOptions adamw{.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = o.weight_decay};
  std::unique_ptr<Optimizer> optimizer = group ? group->make_optimizer(model.named_parameters(), adamw)
                                               : std::make_unique<AdamW>(model.named_parameters(), adamw);
  Optimizer& opt = *optimizer;
  RunState run;
  TrainResult result;
  if (!resumed.is_null()) {
    NoGradGuard no_grad;
    for (auto& [name, p] : model.named_parameters()) {
      const Tensor& saved = state_file.at("param." + name);
      REMAT_CHECK(saved.shape() == p.shape(), "resume: parameter ", name, " has shape ", shape_str(saved.shape()),
                  " in the state but ", shape_str(p.shape()), " in the model");
      p.copy_(saved);
    }
    // The moments by parameter name; states written before 0.2 keyed them by parameter index.
    std::vector<std::pair<std::string, Tensor>> moments;
    auto named = model.named_parameters();
    for (size_t i = 0; i < named.size(); ++i)
      for (const char* slot : {".m", ".v"}) {
        std::string key = "optim." + named[i].first + slot, legacy = "optim." + std::to_string(i) + slot;
        moments.emplace_back(named[i].first + slot, state_file.at(state_file.contains(key) ? key : legacy));
      }
    opt.load_state(moments);
    opt.set_steps(resumed.at("optimizer_steps"));
    result.schedule_note = sched.changes_from(resumed_sched);
    if (!result.schedule_note.empty() && on_note)
      on_note(fmt::format("schedule changed from step {}: {}", resumed.at("step").get<int64_t>(), result.schedule_note));
    run.step = resumed.at("step");
    set_rng_state({resumed.at("rng_seed"), resumed.at("rng_offset")});
    task->set_data_state({resumed.at("data_seed"), resumed.at("data_offset")});
    if (!lead) {
      // rank 0 keeps the run's files
    } else if (o.out == o.resume) {
      truncate_metrics(o.out + "/metrics.jsonl", run.step);
    } else if (!o.out.empty()) {
      // Continued into another folder: the run's history so far comes along.
      std::error_code ec;
      std::filesystem::copy_file(o.resume + "/metrics.jsonl", o.out + "/metrics.jsonl",
                                 std::filesystem::copy_options::overwrite_existing, ec);
      truncate_metrics(o.out + "/metrics.jsonl", run.step);
    }
  }
  if (group) group->start(model);
  // The average starts from the current weights, or continues a resumed run's.
  std::unique_ptr<WeightAverage> average;
  if (sched.ema > 0) {
    average = std::make_unique<WeightAverage>(params, sched.ema);
    auto named = model.named_parameters();
    if (!resumed.is_null() && state_file.contains("ema." + named.front().first)) {
      NoGradGuard no_grad;
      for (size_t i = 0; i < named.size(); ++i) {
        Tensor avg = average->averages()[i];
        avg.copy_(state_file.at("ema." + named[i].first));
      }
      average->set_updates(resumed.value("ema_updates", int64_t{0}));
    }
  }
  state_file = {};  // everything is loaded: do not hold a second copy of the weights through the run

  result.reference_loss = task->reference_loss();
  result.uniform_loss = task->uniform_loss();
  result.reference_text = task->reference_text();
  result.item_name = task->item_name();
  for (const Tensor& p : params) result.parameters += p.numel();
  int64_t last = o.stop_at >= 0 ? std::min(o.stop_at, sched.steps) : sched.steps;
  Allocator& alloc = allocator_for(device);
  double tokens = task->items_per_step() * ranks;  // the global batch's
  auto run_start = std::chrono::steady_clock::now();
  for (int64_t step = run.step; step < last; ++step) {
    auto start = std::chrono::steady_clock::now();
    alloc.reset_peak();
    double lr = sched.lr_at(step);
    double loss_value = 0;
    AutocastScope autocast(compute);  // casts are recorded on the tape, so replays need no scope
    // Each micro-batch draws the step's batch again from the same data and random state and
    // computes its rows; the streams end where one pass over the batch leaves them. Its loss counts
    // 1 / micro_batches (the batch's mean), and its gradients add to the earlier ones'. Under data
    // parallel, one backward is overlapped with the gradients' averaging; several are averaged once.
    const RngState rng_at_start = rng_state(), data_at_start = task->data_state();
    const bool overlapped = group && micro_batches == 1;
    auto micro_loss = [&](const Tensor& l) { return micro_batches == 1 ? l : mul_scalar(l, 1.0 / micro_batches); };
    auto micro_backward = [&](const Tensor& l) { overlapped ? group->backward(l) : backward(l); };
    for (int64_t micro = 0; micro < micro_batches; ++micro) {
      if (micro > 0) set_rng_state(rng_at_start), task->set_data_state(data_at_start);
      task->set_micro_batch(micro, micro_batches);
      if (planner && !planned) {
        // The planner records one micro-batch: its budget is a micro-batch's peak.
        planner->plan(
            [&] {
              Tensor l = micro_loss(task->next_loss());
              loss_value += l.item();
              return l;
            },
            micro_backward);
        planned = true;
      } else {
        reset_checkpoint_counters();
        // The step that retimes the plan: on a GPU, events time its ops' kernels (BudgetPlanner::retime).
        std::optional<DeviceOpTiming> timing;
        if (planner && planner->wants_retime() && device.is_cuda()) timing.emplace();
        Tensor loss = micro_loss(task->next_loss());
        timing.reset();
        // Backward is queued before the loss is read: on a GPU, reading it first would make the host
        // wait for the forward before it could queue a single backward kernel.
        micro_backward(loss);
        loss_value += loss.item();
        if (planner) {
          MemoryStats after = alloc.stats();
          planned = planner->observe(loss, after[MemoryCategory::activation].peak, checkpoint_counters().replay_ns / 1e6);
        }
      }
    }
    if (group && !overlapped) group->average_gradients();
    if (group) loss_value = group->mean(loss_value);
    REMAT_CHECK(std::isfinite(loss_value), "training diverged: loss is ", loss_value, " at step ", step + 1);
    if (group) group->clip_grad_norm(params, o.clip);
    else clip_grad_norm_(params, o.clip);  // the norm is not read: no wait for the GPU here
    opt.step(lr);
    opt.zero_grad();
    if (average) average->update();
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    MemoryStats s = alloc.stats();
    StepMetrics m{step + 1, loss_value, lr, ms, s.total.peak, s[MemoryCategory::activation].peak, s.total.current,
                  tokens / (ms / 1000.0)};
    if (result.steps_run == 0) result.first_loss = m.loss;
    if (o.keep_step_metrics) result.steps.push_back(m);
    result.last_step = m;
    ++result.steps_run;
    run.step = step + 1;
    if (!o.out.empty() && lead) run.pending_metrics += metrics_line(m, task->item_name()) + "\n";
    result.peak_bytes = std::max(result.peak_bytes, m.peak_bytes);
    result.activation_peak_bytes = std::max(result.activation_peak_bytes, m.activation_peak_bytes);
    if (on_step) on_step(m, sched.steps);
    if (!o.out.empty() && (run.step % o.save_every == 0 || run.step == last))
      save_snapshot(o.out, *task, opt, average.get(), o, sched, run, lead);
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  if (planner) result.plan_report = planner->current().to_string();
  if (result.steps_run > 0) {
    result.final_loss = result.last_step.loss;
    result.tokens_per_s = tokens * static_cast<double>(result.steps_run) / seconds;
  }
  return result;
}

}  // namespace remat
