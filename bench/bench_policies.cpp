// `remat-bench` policy mode. A step is one forward and backward of the model on a fixed batch with
// a fixed dropout stream; the optimizer update is the same for every policy and is left out.
#include "bench_policies.h"
#include "runtime/cuda_backend.h"

#include <fmt/format.h>
#include <omp.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "autograd/trace.h"
#include "bench_output.h"
#include "checkpoint/planner.h"
#include "checkpoint/report.h"
#include "models/data.h"
#include "models/gpt.h"
#include "remat.h"

namespace remat::bench {

namespace {

GptConfig bench_config(const PolicyOptions& o) {
  REMAT_CHECK(o.model == "gpt", "unknown model '", o.model, "': expected gpt");
  GptConfig c = gpt_config(o.config);
  for (const auto& [key, value] : o.overrides) {
    if (key == "batch") c.batch = static_cast<int64_t>(value);
    else if (key == "layers") c.layers = static_cast<int64_t>(value);
    else if (key == "seq_len") c.seq_len = static_cast<int64_t>(value);
    else if (key == "dropout") c.dropout = value;
    else REMAT_FAIL("unknown config override '", key, "': expected batch, layers, seq_len or dropout");
  }
  return c;
}

// The activation bytes that must be alive together for this policy if every tensor is freed as
// soon as possible (docs/bench.md derives it). -1 where no formula exists (level, ops, sac).
int64_t gpt_activation_floor(const GptConfig& c, const PolicySpec& spec) {
  const int64_t f = 4, E = c.batch * c.seq_len * c.channels * f, st = c.batch * c.seq_len * f;
  const int64_t lse = c.batch * c.heads * c.seq_len * f;
  const int64_t S = 17 * E + 4 * st + lse;                                   // what backward saves of one block
  const int64_t head = 2 * E + 3 * st + c.batch * c.seq_len * c.vocab * f;  // ln_f in/out, stats, logits, lse
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

// The bytes of each parameter's gradient (or of the parameter itself), on the host.
std::vector<std::vector<char>> grad_bytes(const std::vector<Tensor>& params, bool of_grad = true) {
  std::vector<std::vector<char>> out;
  for (const Tensor& p : params) {
    Tensor g = (of_grad ? p.grad() : p).as_contiguous().to(Device::cpu());
    std::vector<char> bytes(g.nbytes());
    std::memcpy(bytes.data(), g.raw_data(), g.nbytes());
    out.push_back(std::move(bytes));
  }
  return out;
}

double max_abs_diff(const std::vector<std::vector<char>>& a, const std::vector<std::vector<char>>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const float* x = reinterpret_cast<const float*>(a[i].data());
    const float* y = reinterpret_cast<const float*>(b[i].data());
    for (size_t k = 0; k < a[i].size() / 4; ++k) worst = std::max(worst, static_cast<double>(std::abs(x[k] - y[k])));
  }
  return worst;
}

// The heap tracker's functions when it is preloaded (bench/peer/heap_tracker.c).
struct HeapTracker {
  long long (*peak)() = nullptr;
  long long (*current)() = nullptr;
  void (*reset_peak)() = nullptr;
  explicit operator bool() const { return peak && current && reset_peak; }
};

HeapTracker heap_tracker() {
  HeapTracker h;
  h.peak = reinterpret_cast<long long (*)()>(dlsym(RTLD_DEFAULT, "heap_tracker_peak"));
  h.current = reinterpret_cast<long long (*)()>(dlsym(RTLD_DEFAULT, "heap_tracker_current"));
  h.reset_peak = reinterpret_cast<void (*)()>(dlsym(RTLD_DEFAULT, "heap_tracker_reset_peak"));
  return h;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int run_policies(const PolicyOptions& o) {
  Device device = parse_device(o.device);
  DType compute = parse_compute_dtype(o.dtype, device);
  REMAT_CHECK(o.steps >= 1 && o.warmup >= 0, "remat-bench: expected --steps >= 1 and --warmup >= 0");
  GptConfig config = bench_config(o);
  std::vector<PolicySpec> specs;
  for (const auto& p : o.policies) specs.push_back(parse_policy(p));
  Tensor x, y;
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);  // the batch is input data, not activations
    AdditionTask data(config.vocab, o.seed + 1);
    std::tie(x, y) = data.batch(config.batch, config.seq_len);
    x = x.to(device), y = y.to(device);
  }
  fmt::print("remat-bench: {} {} (B {}, T {}, C {}, layers {}, dropout {}) on {} in {}, {} threads, {} timed steps after {} warm-up\n",
             o.model, config.name, config.batch, config.seq_len, config.channels, config.layers, config.dropout,
             device.str(), o.dtype, omp_get_max_threads(), o.steps, o.warmup);

  Allocator& alloc = allocator_for(device);
  HeapTracker heap = heap_tracker();
  std::vector<std::vector<char>> reference;  // gradients under none
  std::vector<PolicyResult> results;
  std::vector<std::pair<std::string, Tracer>> traces;
  std::vector<std::vector<MemoryEvent>> trace_memory;
  // `none` runs first (silently if not asked for) to give the reference gradients.
  std::vector<PolicySpec> order = specs;
  bool none_listed = std::any_of(specs.begin(), specs.end(), [](auto& s) { return s.kind == PolicySpec::Kind::none; });
  if (!none_listed) order.insert(order.begin(), parse_policy("none"));
  std::stable_partition(order.begin(), order.end(), [](auto& s) { return s.kind == PolicySpec::Kind::none; });

  // One model for every policy: initialising GPT-2's 124M parameters on the host takes long, so
  // it happens once, and each policy starts from the same initial weights, kept as plain bytes
  // outside the allocators (they would count in every policy's peak).
  manual_seed(o.seed);
  Gpt model(config);
  std::vector<Tensor> params = model.parameters();
  std::vector<std::vector<char>> initial = grad_bytes(params, /*of_grad=*/false);
  model.to(device);
  for (const PolicySpec& spec : order) {
    remove_checkpointing(model);
    for (size_t i = 0; i < params.size(); ++i) {
      copy_bytes(params[i].raw_data(), device, initial[i].data(), Device::cpu(), initial[i].size());
      params[i].storage()->bump_version();
    }
    model.train();
    PolicyResult r;
    r.policy = spec.text;
    bool budget = spec.kind == PolicySpec::Kind::budget;
    if (!budget) {
      SaveReport saved = what_is_saved(model, spec.text, [&] {
        AutocastScope autocast(compute);
        return model.loss(x, y);
      });
      r.saved_bytes_by_op = saved.saved_by_op;
      r.recomputed_bytes_by_op = saved.recomputed_by_op;
      apply_policy(model, spec);
    }
    // Gradients are dropped before each step and before its baselines are taken.
    auto zero_grads = [&] {
      for (Tensor& p : params) p.zero_grad();
    };
    auto step = [&] {
      set_rng_state({o.seed + 7, 0});  // the same dropout masks every step and every policy
      AutocastScope autocast(compute);
      Tensor loss = model.loss(x, y);
      backward(loss);
      if (device.is_cuda()) cuda_synchronize(device.index);  // step time covers the queued kernels
    };
    if (budget) {  // the planner's recording step stands in for one warm-up step
      BudgetPlanner planner(model, spec.budget_bytes, spec.budget_percent);
      zero_grads();
      const BudgetPlan& plan = planner.plan([&] {
        set_rng_state({o.seed + 7, 0});
        AutocastScope autocast(compute);
        return model.loss(x, y);
      });
      r.budget_bytes = plan.budget_bytes;
      r.predicted_peak_bytes = plan.predicted_peak_bytes;
      for (const auto& b : plan.blocks)
        if (b.checkpointed) r.planned_blocks += (r.planned_blocks.empty() ? "" : " ") + b.name;
    }
    for (int i = budget ? 1 : 0; i < o.warmup; ++i) {
      zero_grads();
      step();
    }
    std::vector<double> times, replays;
    for (int i = 0; i < o.steps; ++i) {
      zero_grads();
      alloc.reset_peak();
      int64_t base_act = alloc.stats()[MemoryCategory::activation].current;
      reset_checkpoint_counters();
      long long heap_base = 0;
      if (heap) {
        heap.reset_peak();
        heap_base = heap.current();
      }
      auto start = std::chrono::steady_clock::now();
      step();
      if (heap) r.heap_step_peak_bytes = std::max<int64_t>(r.heap_step_peak_bytes, heap.peak() - heap_base);
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      MemoryStats s = alloc.stats();
      // Totals include parameters and the gradients left after backward; activations start at zero.
      r.peak_bytes = std::max(r.peak_bytes, s.total.peak);
      r.activation_peak_bytes = std::max(r.activation_peak_bytes, s[MemoryCategory::activation].peak - base_act);
      replays.push_back(checkpoint_counters().replay_ns / 1e6);
      r.ops_replayed = checkpoint_counters().ops_replayed;
    }
    r.median_step_ms = median(times);
    r.min_step_ms = *std::min_element(times.begin(), times.end());
    r.median_replay_ms = median(replays);
    r.tokens_per_s = static_cast<double>(config.batch * config.seq_len) / (r.median_step_ms / 1000.0);
    r.activation_floor_bytes = gpt_activation_floor(config, spec);
    auto grads = grad_bytes(params);
    if (spec.kind == PolicySpec::Kind::none && reference.empty()) reference = grads;
    r.grads_bitwise_equal = grads == reference;
    r.grads_max_abs_diff = r.grads_bitwise_equal ? 0.0 : max_abs_diff(grads, reference);
    if (!o.trace_path.empty() || !o.plot_path.empty()) {
      Tracer tracer;
      {
        TracerScope active(&tracer);
        zero_grads();
        alloc.start_recording(tracer.epoch());
        double t0 = tracer.now_us();
        step();
        r.timeline_step_us = tracer.now_us() - t0;
        r.timeline = alloc.stop_recording();
      }
      traces.emplace_back(spec.text, std::move(tracer));
      trace_memory.push_back(r.timeline);
    }
    bool asked = std::any_of(specs.begin(), specs.end(), [&](auto& s) { return s.text == spec.text; });
    if (asked) results.push_back(std::move(r));
  }

  print_table(results);
  print_budgets(results);
  nlohmann::json machine = machine_info();
  nlohmann::json run = {{"model", o.model},
                        {"config", {{"name", config.name}, {"batch", config.batch}, {"seq_len", config.seq_len},
                                    {"channels", config.channels}, {"heads", config.heads}, {"layers", config.layers},
                                    {"vocab", config.vocab}, {"dropout", config.dropout}}},
                        {"device", device.str()}, {"dtype", o.dtype}, {"steps", o.steps}, {"warmup", o.warmup}, {"seed", o.seed}};
  if (!o.json_path.empty()) write_json(o.json_path, machine, run, results);
  if (!o.csv_path.empty()) write_csv(o.csv_path, results);
  if (!o.trace_path.empty()) write_trace(o.trace_path, traces, trace_memory);
  if (!o.plot_path.empty()) write_plot(o.plot_path, results, config.name);
  for (const auto& r : results)
    if (!r.grads_bitwise_equal) {
      fmt::print(stderr, "remat-bench: gradients under {} differ from none (max abs diff {:.3g})\n", r.policy,
                 r.grads_max_abs_diff);
      return 1;
    }
  return 0;
}

}  // namespace remat::bench
