// The training loop and its snapshots.
#include "models/train.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "checkpoint/apply.h"
#include "autograd/autocast.h"
#include "checkpoint/planner.h"
#include "checkpoint/region.h"
#include "models/tasks.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "runtime/random.h"

namespace remat {

namespace {

std::string metrics_line(const StepMetrics& m, const char* items) {
  return nlohmann::json{{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"step_ms", m.step_ms},
                        {"peak_bytes", m.peak_bytes}, {"activation_peak_bytes", m.activation_peak_bytes},
                        {std::string(items) + "_per_s", m.tokens_per_s}}
             .dump();
}

struct RunState {
  int64_t step = 0;  // steps completed
  std::string metrics;  // metrics.jsonl so far
};

void save_snapshot(const std::string& dir, TrainTask& task, Optimizer& opt, const TrainOptions& o, const RunState& run) {
  std::vector<std::pair<std::string, Tensor>> weights = task.model().named_parameters();
  save_safetensors(dir + "/model.safetensors", weights,
                   {{"format", "remat"}, {"model", o.model}, {"config", task.config().dump()}});
  std::vector<std::pair<std::string, Tensor>> state;
  for (auto& [name, t] : weights) state.emplace_back("param." + name, t);
  for (auto& [name, t] : opt.state()) state.emplace_back("optim." + name, t);
  RngState rng = rng_state(), data_rng = task.data_state();
  nlohmann::json meta = {{"model", o.model}, {"config", task.config()}, {"policy", o.policy},
                         {"steps", o.steps}, {"step", run.step}, {"seed", o.seed},
                         {"rng_seed", rng.seed}, {"rng_offset", rng.offset},
                         {"data_seed", data_rng.seed}, {"data_offset", data_rng.offset},
                         {"optimizer_steps", opt.steps()}, {"lr", o.lr}, {"min_lr", o.min_lr},
                         {"warmup", o.warmup}, {"weight_decay", o.weight_decay}, {"clip", o.clip}};
  save_safetensors(dir + "/state.safetensors", state, {{"training_state", meta.dump()}});
  write_file_atomically(dir + "/metrics.jsonl", run.metrics);
}

}  // namespace

TrainResult train(const TrainOptions& options, const StepCallback& on_step) {
  TrainOptions o = options;
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
      o.lr = resumed.at("lr"), o.min_lr = resumed.at("min_lr"), o.warmup = resumed.at("warmup");
      o.weight_decay = resumed.at("weight_decay"), o.clip = resumed.at("clip"), o.seed = resumed.at("seed");
    } catch (const nlohmann::json::exception& e) {
      REMAT_FAIL(path, ": corrupted training state: ", e.what());
    }
    if (o.out.empty()) o.out = o.resume;
  }
  if (o.policy.empty()) o.policy = "none";
  REMAT_CHECK(o.steps > 0, "expected --steps >= 1, got ", o.steps);
  Device device = parse_device(o.device);
  DType compute = parse_compute_dtype(o.dtype, device);
  PolicySpec policy = parse_policy(o.policy);
  if (!o.out.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.out, ec);
    REMAT_CHECK(!ec && std::filesystem::is_directory(o.out), "--out ", o.out, ": cannot create the directory (",
                ec ? ec.message() : "not a directory", ")");
    std::string probe = o.out + "/.write_test";
    std::ofstream test(probe);
    REMAT_CHECK(test.good(), "--out ", o.out, ": the directory is not writable");
    test.close();
    std::filesystem::remove(probe, ec);
  }

  std::unique_ptr<TrainTask> task = resumed.is_null() ? make_task(o.model, o.config, o.overrides, o.seed)
                                                      : make_task_from_json(o.model, resumed.at("config"), o.seed);
  task->to(device);
  Module& model = task->model();
  model.train();
  // A budget is planned on the first step of this run (a normal training step, recorded).
  std::unique_ptr<BudgetPlanner> planner;
  bool planned = false;
  if (policy.kind == PolicySpec::Kind::budget) planner = std::make_unique<BudgetPlanner>(model, policy.budget_bytes, policy.budget_percent);
  else apply_policy(model, policy);
  std::vector<Tensor> params = model.parameters();
  AdamW opt(params, {.beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = o.weight_decay});
  RunState run;
  if (!resumed.is_null()) {
    NoGradGuard no_grad;
    for (auto& [name, p] : model.named_parameters()) {
      const Tensor& saved = state_file.at("param." + name);
      REMAT_CHECK(saved.shape() == p.shape(), "resume: parameter ", name, " has shape ", shape_str(saved.shape()),
                  " in the state but ", shape_str(p.shape()), " in the model");
      p.copy_(saved);
    }
    for (auto& [name, t] : opt.state()) t.copy_(state_file.at("optim." + name));
    opt.set_steps(resumed.at("optimizer_steps"));
    run.step = resumed.at("step");
    set_rng_state({resumed.at("rng_seed"), resumed.at("rng_offset")});
    task->set_data_state({resumed.at("data_seed"), resumed.at("data_offset")});
    std::ifstream metrics(o.resume + "/metrics.jsonl");
    std::stringstream buffer;
    buffer << metrics.rdbuf();
    run.metrics = buffer.str();
  }

  TrainResult result;
  result.reference_loss = task->reference_loss();
  result.uniform_loss = task->uniform_loss();
  result.reference_text = task->reference_text();
  result.item_name = task->item_name();
  for (const Tensor& p : params) result.parameters += p.numel();
  int64_t last = o.stop_at >= 0 ? std::min(o.stop_at, o.steps) : o.steps;
  Allocator& alloc = allocator_for(device);
  double tokens = task->items_per_step();
  auto run_start = std::chrono::steady_clock::now();
  for (int64_t step = run.step; step < last; ++step) {
    auto start = std::chrono::steady_clock::now();
    alloc.reset_peak();
    double lr = cosine_lr(step, o.warmup, o.steps, o.lr, o.min_lr);
    double loss_value = 0;
    AutocastScope autocast(compute);  // casts are recorded on the tape, so replays need no scope
    if (planner && !planned) {
      planner->plan([&] {
        Tensor l = task->next_loss();
        loss_value = l.item();
        return l;
      });
      planned = true;
    } else {
      reset_checkpoint_counters();
      Tensor loss = task->next_loss();
      loss_value = loss.item();
      backward(loss);
      if (planner) {
        MemoryStats after = alloc.stats();
        planned = planner->observe(loss, after[MemoryCategory::activation].peak, checkpoint_counters().replay_ns / 1e6);
      }
    }
    REMAT_CHECK(std::isfinite(loss_value), "training diverged: loss is ", loss_value, " at step ", step + 1);
    clip_grad_norm(params, o.clip);
    opt.step(lr);
    opt.zero_grad();
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    MemoryStats s = alloc.stats();
    StepMetrics m{step + 1, loss_value, lr, ms, s.total.peak, s[MemoryCategory::activation].peak, s.total.current,
                  tokens / (ms / 1000.0)};
    result.steps.push_back(m);
    run.step = step + 1;
    run.metrics += metrics_line(m, task->item_name()) + "\n";
    result.peak_bytes = std::max(result.peak_bytes, m.peak_bytes);
    result.activation_peak_bytes = std::max(result.activation_peak_bytes, m.activation_peak_bytes);
    if (on_step) on_step(m, o.steps);
    if (!o.out.empty() && (run.step % o.save_every == 0 || run.step == last))
      save_snapshot(o.out, *task, opt, o, run);
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  if (planner) result.plan_report = planner->current().to_string();
  if (!result.steps.empty()) {
    result.final_loss = result.steps.back().loss;
    result.tokens_per_s = tokens * static_cast<double>(result.steps.size()) / seconds;
  }
  return result;
}

}  // namespace remat
