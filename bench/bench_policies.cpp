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
#include <optional>

#include "autograd/graph.h"
#include "autograd/trace.h"
#include "bench_output.h"
#include "bench_subject.h"
#include "checkpoint/planner.h"
#include "checkpoint/report.h"
#include "kernels/cpu/attention_heads.h"
#include "kernels/cpu/gemm.h"
#include "remat.h"

namespace remat::bench {

namespace {

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
  REMAT_CHECK(!o.tf32 || device.is_cuda(), "--tf32 applies to f32 GEMMs on cuda; this run is on ", device.str());
  set_cuda_tf32(o.tf32);
  REMAT_CHECK(o.steps >= 1 && o.warmup >= 0 && o.rounds >= 1,
              "remat-bench: expected --steps >= 1, --warmup >= 0 and --rounds >= 1");
  std::vector<PolicySpec> specs;
  for (const auto& p : o.policies) specs.push_back(parse_policy(p));
  // One model for every policy: initialising GPT-2's 124M parameters on the host takes long, so
  // it happens once, and each policy starts from the same initial weights, kept as plain bytes
  // outside the allocators (they would count in every policy's peak).
  Subject subject(o);
  Module& model = subject.model();
  std::vector<Tensor> params = model.parameters();
  int64_t parameter_count = 0;
  for (const Tensor& p : params) parameter_count += p.numel();
  std::vector<std::vector<char>> initial = grad_bytes(params, /*of_grad=*/false);
  subject.to(device);
  auto micro_loss = [&](int64_t micro) {
    AutocastScope autocast(compute);
    return subject.loss(micro);
  };
  // What the planner records and the saved-bytes report looks at: the first micro-batch (the whole
  // step with one), as `remat train` plans one micro-batch.
  auto loss_of_step = [&] { return micro_loss(0); };
  if (o.pareto) {
    // The planner's range on this model: ten budgets from its floor to no checkpointing's peak.
    model.train();
    BudgetPlanner probe(model, 0, 100);
    BudgetPlan range = probe.plan(loss_of_step);
    remove_checkpointing(model);
    for (int k = 0; k < 10; ++k) {
      int64_t budget = range.floor_bytes + (range.none_peak_bytes - range.floor_bytes) * k / 9;
      specs.push_back(parse_policy("budget:" + std::to_string(budget)));
    }
  }
  fmt::print("remat-bench: {} on {} in {}{}, {} threads, {} round(s) of {} timed steps after {} warm-up{}\n",
             subject.describe(), device.str(), o.dtype, o.tf32 ? " (f32 GEMMs in TF32)" : "", omp_get_max_threads(),
             o.rounds, o.steps, o.warmup,
             device.is_cpu() ? ", GEMM " + cpu::gemm_library() + ", attention " + cpu::attention_path()
                             : std::string(", attention ") + cuda_attention_name(cuda_attention()) +
                                   " (REMAT_CUDA_ATTENTION=auto|flash|gemm|mma|cudnn), linear's bias " +
                                   (cuda_bias_epilogue() ? "in cuBLASLt's epilogue" : "by its own kernel") +
                                   " (REMAT_CUDA_BIAS_EPILOGUE=1|0), its gradient " +
                                   (cuda_bias_grad_epilogue() ? "from dW's GEMM (BGRADB)" : "by a column sum") +
                                   " (REMAT_CUDA_BIAS_GRAD_EPILOGUE=1|0)" +
                                   (o.dtype == "bf16" ? std::string(", weights' bf16 copies ") +
                                                            (autocast_cache_enabled() ? "kept" : "cast at every use") +
                                                            " (REMAT_AUTOCAST_CACHE=1|0)"
                                                      : std::string()));

  const double peak = o.peak_tflops > 0 ? o.peak_tflops
                      : device.is_cuda() ? peak_tflops_of(cuda_device_name(device.index), o.dtype, o.tf32)
                                         : 0.0;
  if (subject.model_flops_per_step() > 0)
    fmt::print("model FLOPs: {:.3g} per step (6 per matmul weight and 12 L T C for attention, per token; replays "
               "not counted); MFU against {}\n",
               subject.model_flops_per_step(),
               peak > 0 ? fmt::format("a peak of {:.4g} TFLOP/s", peak) : std::string("no known peak (--peak-tflops)"));
  Allocator& alloc = allocator_for(device);
  HeapTracker heap = heap_tracker();
  // Loads remat's CUDA part where the build has one (its first query does, with CUDA's libraries):
  // in the first timed step its heap (5.5 MiB on a machine without a GPU) counted as that policy's.
  (void)cuda_host_syncs();
  std::vector<std::vector<char>> reference;  // gradients under none
  std::vector<PolicyResult> results;
  std::vector<std::pair<std::string, Tracer>> traces;
  std::vector<std::vector<MemoryEvent>> trace_memory;
  // `none` runs first (silently if not asked for) to give the reference gradients.
  std::vector<PolicySpec> order = specs;
  bool none_listed = std::any_of(specs.begin(), specs.end(), [](auto& s) { return s.kind == PolicySpec::Kind::none; });
  if (!none_listed) order.insert(order.begin(), parse_policy("none"));
  std::stable_partition(order.begin(), order.end(), [](auto& s) { return s.kind == PolicySpec::Kind::none; });

  // Rounds run every policy in turn, so that a machine that slows down or speeds up during the run
  // affects all of them alike; each policy's times are pooled over the rounds.
  std::vector<PolicyResult> all(order.size());
  std::vector<std::vector<double>> times_of(order.size()), replays_of(order.size());
  for (int round = 0; round < o.rounds; ++round) {
    for (size_t index = 0; index < order.size(); ++index) {
      const PolicySpec& spec = order[index];
      PolicyResult& r = all[index];
      remove_checkpointing(model);
      for (size_t i = 0; i < params.size(); ++i) {
        copy_bytes(params[i].raw_data(), device, initial[i].data(), Device::cpu(), initial[i].size());
        params[i].storage()->bump_version();
      }
      model.train();
      r.policy = spec.text;
      bool budget = spec.kind == PolicySpec::Kind::budget;
      if (!budget && round == 0) {
        SaveReport saved = what_is_saved(model, spec.text, loss_of_step);
        r.saved_bytes_by_op = saved.saved_by_op;
        r.recomputed_bytes_by_op = saved.recomputed_by_op;
      }
      if (!budget) apply_policy(model, spec);
      // Gradients are dropped before each step and before its baselines are taken.
      auto zero_grads = [&] {
        for (Tensor& p : params) p.zero_grad();
      };
      auto step = [&] {
        for (int64_t micro = 0; micro < subject.micro_batches(); ++micro) backward(micro_loss(micro));
        if (device.is_cuda()) cuda_synchronize(device.index);  // step time covers the queued kernels
      };
      if (budget) {  // the planner's recording step stands in for one warm-up step (it plans each round)
        BudgetPlanner planner(model, spec.budget_bytes, spec.budget_percent, spec.budget_scope);
        zero_grads();
        planner.plan(loss_of_step);
        // The rest of that step's micro-batches, under the plan: the warm-up step is then whole.
        for (int64_t micro = 1; micro < subject.micro_batches(); ++micro) backward(micro_loss(micro));
        // One more step, under the plan, whose op times the planner chooses again with (as a
        // training run's second step does): the recording step's are the first of a cold model.
        zero_grads();
        std::optional<DeviceOpTiming> timing;  // on a GPU, events time the ops' kernels
        if (device.is_cuda()) timing.emplace();
        Tensor retimed_loss = micro_loss(0);
        timing.reset();
        backward(retimed_loss);
        planner.retime(retimed_loss);
        retimed_loss = Tensor();
        for (int64_t micro = 1; micro < subject.micro_batches(); ++micro) backward(micro_loss(micro));
        const BudgetPlan& plan = planner.current();
        r.budget_bytes = plan.budget_bytes;
        r.planned_blocks.clear();
        if (plan.predicted_peak_bytes >= r.predicted_peak_bytes) {  // rounds replan: the highest of their peaks
          r.predicted_peak_bytes = plan.predicted_peak_bytes;
          r.predicted_peak_at = plan.predicted_peak_at;
        }
        r.predicted_recompute_ms =  // running means over the rounds
            (r.predicted_recompute_ms * round + plan.predicted_recompute_ms) / (round + 1);
        r.predicted_transfer_ms = (r.predicted_transfer_ms * round + plan.predicted_transfer_ms) / (round + 1);
        r.predicted_offloaded_bytes = plan.predicted_offloaded_bytes;
        for (const auto& b : plan.blocks)
          if (b.checkpointed) {  // name:re-run/ops
            const auto& rec = b.options[static_cast<size_t>(b.choice)].reruns;
            r.planned_blocks += fmt::format("{}{}:{}/{}", r.planned_blocks.empty() ? "" : " ", b.name,
                                            std::count(rec.begin(), rec.end(), true), rec.size());
          }
      }
      for (int i = budget ? 1 : 0; i < o.warmup; ++i) {
        zero_grads();
        step();
      }
      std::vector<double>& times = times_of[index];
      std::vector<double>& replays = replays_of[index];
      for (int i = 0; i < o.steps; ++i) {
        zero_grads();
        alloc.reset_peak();
        int64_t base_act = alloc.stats()[MemoryCategory::activation].current;
        reset_checkpoint_counters();
        const bool heap_now = heap && !device.is_cpu();  // on the CPU, in the step after these
        long long heap_base = 0;
        if (heap_now) {
          heap.reset_peak();
          heap_base = heap.current();
        }
        long long syncs_before = cuda_host_syncs();
        auto start = std::chrono::steady_clock::now();
        step();
        if (device.is_cuda())  // less the step's own cuda_synchronize
          r.host_syncs_per_step = std::max<int64_t>(r.host_syncs_per_step, cuda_host_syncs() - syncs_before - 1);
        if (heap_now) r.heap_step_peak_bytes = std::max<int64_t>(r.heap_step_peak_bytes, heap.peak() - heap_base);
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
        MemoryStats s = alloc.stats();
        // Totals include parameters and the gradients left after backward; activations start at zero.
        r.peak_bytes = std::max(r.peak_bytes, s.total.peak);
        r.activation_peak_bytes = std::max(r.activation_peak_bytes, s[MemoryCategory::activation].peak - base_act);
        replays.push_back(checkpoint_counters().replay_ns / 1e6);
        r.ops_replayed = checkpoint_counters().ops_replayed;
        r.offloaded_bytes = checkpoint_counters().bytes_offloaded;
      }
      if (heap && device.is_cpu()) {
        // The heap figure (the peers' measure: the most malloc handed out during a step) in one more
        // step, untimed, with the CPU allocator's cache off: cached blocks came from malloc before
        // the step, so a step served from the cache would show almost no heap.
        const bool caching = cpu_caching();
        set_cpu_caching(false);  // gives the cache back
        zero_grads();
        heap.reset_peak();
        const long long heap_base = heap.current();
        step();
        r.heap_step_peak_bytes = std::max<int64_t>(r.heap_step_peak_bytes, heap.peak() - heap_base);
        set_cpu_caching(caching);
      }
      r.median_step_ms = median(times);
      r.min_step_ms = *std::min_element(times.begin(), times.end());
      r.median_replay_ms = median(replays);
      r.tokens_per_s = subject.items_per_step() / (r.median_step_ms / 1000.0);
      if (subject.model_flops_per_step() > 0) {
        r.model_tflops = subject.model_flops_per_step() / (r.median_step_ms / 1000.0) / 1e12;
        if (peak > 0) r.mfu = r.model_tflops / peak;
      }
      r.activation_floor_bytes = subject.activation_floor(spec);
      auto grads = grad_bytes(params);
      if (spec.kind == PolicySpec::Kind::none && reference.empty()) reference = grads;
      bool equal = grads == reference;  // in every round
      r.grads_bitwise_equal = (round == 0 || r.grads_bitwise_equal) && equal;
      if (!equal) r.grads_max_abs_diff = std::max(r.grads_max_abs_diff, max_abs_diff(grads, reference));
      if (round == 0 && (!o.trace_path.empty() || !o.plot_path.empty() || o.profile)) {
        Tracer tracer;
        if (o.profile && device.is_cuda()) tracer.time_gpu(device.index);
        {
          TracerScope active(&tracer);
          zero_grads();
          alloc.start_recording(tracer.epoch());
          double t0 = tracer.now_us();
          step();
          r.timeline_step_us = tracer.now_us() - t0;
          r.timeline = alloc.stop_recording();
        }
        if (o.profile) {
          tracer.resolve_gpu_times();
          r.profile = self_times(tracer);
        }
        traces.emplace_back(spec.text, std::move(tracer));
        trace_memory.push_back(r.timeline);
      }
    }
  }
  for (size_t index = 0; index < order.size(); ++index) {
    bool asked = std::any_of(specs.begin(), specs.end(), [&](auto& s) { return s.text == order[index].text; });
    if (asked) results.push_back(std::move(all[index]));
  }

  print_table(results, subject.item_name());
  if (device.is_cuda()) {
    fmt::print("host waits for the GPU per step (most over the timed steps):");
    for (const auto& r : results) fmt::print(" {} {}", r.policy, r.host_syncs_per_step);
    fmt::print("\n");
  }
  print_budgets(results);
  if (o.profile) print_profiles(results, o.profile_rows, device.is_cuda());
  nlohmann::json machine = machine_info();
  if (o.pareto) print_pareto(results);
  nlohmann::json run = {{"model", o.model}, {"config", subject.config()}, {"device", device.str()}, {"dtype", o.dtype},
                        {"steps", o.steps}, {"warmup", o.warmup}, {"rounds", o.rounds}, {"seed", o.seed},
                        {"micro_batches", o.micro_batches}, {"parameters", parameter_count}};
  if (device.is_cuda()) {
    run["cuda_attention"] = cuda_attention_name(cuda_attention());
    run["cuda_bias_epilogue"] = cuda_bias_epilogue();
    run["cuda_bias_grad_epilogue"] = cuda_bias_grad_epilogue();
  }
  if (o.dtype == "bf16") run["autocast_cache"] = autocast_cache_enabled();
  if (!o.json_path.empty()) write_json(o.json_path, machine, run, results);
  if (!o.csv_path.empty()) write_csv(o.csv_path, results);
  if (!o.trace_path.empty()) write_trace(o.trace_path, traces, trace_memory);
  if (!o.plot_path.empty()) write_plot(o.plot_path, results, o.model + " " + o.config);
  for (const auto& r : results)
    if (!r.grads_bitwise_equal) {
      fmt::print(stderr, "remat-bench: gradients under {} differ from none (max abs diff {:.3g})\n", r.policy,
                 r.grads_max_abs_diff);
      return 1;
    }
  return 0;
}

double peak_tflops_of(const std::string& device_name, const std::string& dtype, bool tf32) {
  const bool hopper = device_name.find("H100") != std::string::npos || device_name.find("H200") != std::string::npos;
  if (!hopper) return 0;
  return dtype == "bf16" ? 989.4 : tf32 ? 494.7 : 66.9;
}

}  // namespace remat::bench
