// Data parallel bench. Each rank steps the config's batch (its own rows of a global batch of
// ranks x batch) under every policy, and each timed step is measured three ways, interleaved:
//   compute:    forward and backward alone, no communication;
//   all-reduce: average_gradients() after that backward, nothing left to overlap with;
//   overlapped: forward and DataParallel::backward, buckets sent as backward finishes them.
// The exposed communication is overlapped - compute; the hidden part 1 - exposed / all-reduce.
// Then, without checkpointing, the optimizer step of plain data parallel (all-reduce, clipping,
// AdamW) against ZeRO-1's (reduce-scatter, sharded clipping, ShardedAdamW with its all-gather):
// time and optimizer state per rank, from the allocator's optimizer category.
// Ranks meet at a barrier before each measurement, so that one rank's lead is not counted as
// another's communication.
#include "bench_dist.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench_output.h"
#include "bench_subject.h"
#include "dist/data_parallel.h"
#include "dist/sharded_adamw.h"
#include "remat.h"

namespace remat::bench {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

std::vector<std::vector<char>> grad_bytes(const std::vector<Tensor>& params) {
  std::vector<std::vector<char>> out;
  for (const Tensor& p : params) {
    Tensor g = p.grad().as_contiguous();
    out.emplace_back(static_cast<const char*>(g.raw_data()), static_cast<const char*>(g.raw_data()) + g.nbytes());
  }
  return out;
}

struct DataParallelResult {
  std::string policy;
  double compute_ms = 0, all_reduce_ms = 0, overlapped_ms = 0;
  double hidden = 0;  // fraction of the all-reduce hidden behind backward, [0, 1]
  int64_t buckets = 0, buckets_sent_during_backward = 0;
  bool grads_bitwise_equal = true;  // the averaged gradients against none's
};

struct OptimizerResult {
  std::string name;
  double step_ms = 0;           // averaging (or reduce-scatter), clipping and the update
  int64_t state_bytes = 0;      // this rank's optimizer category after the first step
};

// Plain data parallel's optimizer step against ZeRO-1's, each from the same parameters.
std::vector<OptimizerResult> compare_optimizers(Subject& subject, dist::ProcessGroup& world, int64_t bucket_bytes,
                                                const PolicyOptions& o) {
  Module& model = subject.model();
  remove_checkpointing(model);
  std::vector<Tensor> params = model.parameters();
  std::vector<Tensor> start;
  for (const Tensor& p : params) start.push_back(p.clone());
  Allocator& alloc = allocator_for(Device::cpu());
  std::vector<OptimizerResult> out;
  for (bool zero1 : {false, true}) {
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(start[i]);
    const int64_t before = alloc.stats()[MemoryCategory::optimizer].current;
    dist::DataParallel dp(model.named_parameters(), world, bucket_bytes, zero1);
    std::unique_ptr<AdamW> plain;
    std::unique_ptr<dist::ShardedAdamW> sharded;
    if (zero1) sharded = std::make_unique<dist::ShardedAdamW>(model.named_parameters(), dist::ShardedAdamWOptions{},
                                                              world, bucket_bytes);
    else plain = std::make_unique<AdamW>(model.named_parameters());
    OptimizerResult r{zero1 ? "ZeRO-1" : "AdamW", 0, 0};
    std::vector<double> times;
    for (int i = 0; i < o.warmup + o.steps; ++i) {
      for (Tensor& p : params) p.zero_grad();
      backward(subject.loss());
      world.barrier();
      auto t0 = std::chrono::steady_clock::now();
      dp.average_gradients();
      if (zero1) {
        sharded->clip_grad_norm(1.0);
        sharded->step(1e-4);
      } else {
        clip_grad_norm(params, 1.0);
        plain->step(1e-4);
      }
      double ms = ms_since(t0);
      if (i == 0) r.state_bytes = alloc.stats()[MemoryCategory::optimizer].current - before;
      if (i >= o.warmup) times.push_back(ms);
    }
    r.step_ms = median(times);
    out.push_back(r);
  }
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(start[i]);
  for (Tensor& p : params) p.zero_grad();
  return out;
}

}  // namespace

int run_data_parallel(const PolicyOptions& o, const DataParallelBenchOptions& d) {
  dist::ProcessGroup& world = dist::ProcessGroup::world();
  REMAT_CHECK(dist::mpi_built(), "--ranks: this build has no MPI (remat::dist was built without it)");
  REMAT_CHECK(world.size() == d.ranks, "--ranks ", d.ranks, ": expected to run under mpirun -np ", d.ranks, ", found ",
              world.size(), " process", world.size() == 1 ? "" : "es");
  REMAT_CHECK(d.bucket_mib > 0, "--bucket-mib: expected > 0, got ", d.bucket_mib);
  REMAT_CHECK(o.micro_batches == 1, "--ranks times one backward per step (its overlap with the all-reduce); "
              "--micro-batches applies without --ranks");
  REMAT_CHECK(o.steps >= 1 && o.warmup >= 0, "remat-bench: expected --steps >= 1 and --warmup >= 0");
  Device device = parse_device(o.device);
  REMAT_CHECK(device.is_cpu(), "--ranks: the data parallel bench runs on the host (MPI) for now, not on ", device.str());
  const bool lead = world.rank() == 0;
  Subject subject(o);
  Module& model = subject.model();
  std::vector<Tensor> params = model.parameters();
  auto bucket_bytes = static_cast<int64_t>(d.bucket_mib * (1 << 20));
  dist::DataParallel dp(model.named_parameters(), world, bucket_bytes);
  if (lead)
    fmt::print("remat-bench: {} x {} ranks (data parallel over MPI), {} threads per rank, {} buckets of at most {} MiB, "
               "{} timed steps after {} warm-up\n",
               subject.describe(), world.size(), omp_get_max_threads(), dp.buckets(), d.bucket_mib, o.steps, o.warmup);
  auto zero_grads = [&] {
    for (Tensor& p : params) p.zero_grad();
  };
  std::vector<DataParallelResult> results;
  std::vector<std::vector<char>> reference;
  for (const std::string& text : o.policies) {
    PolicySpec spec = parse_policy(text);
    REMAT_CHECK(spec.kind != PolicySpec::Kind::budget, "--ranks: budget policies are not benched under data parallel yet");
    remove_checkpointing(model);
    model.train();
    apply_policy(model, spec);
    DataParallelResult r;
    r.policy = text;
    std::vector<double> compute, all_reduce, overlapped;
    for (int i = 0; i < o.warmup + o.steps; ++i) {
      zero_grads();
      world.barrier();
      auto start = std::chrono::steady_clock::now();
      backward(subject.loss());
      double c = ms_since(start);
      start = std::chrono::steady_clock::now();
      dp.average_gradients();
      double a = ms_since(start);
      zero_grads();
      world.barrier();
      start = std::chrono::steady_clock::now();
      dp.backward(subject.loss());
      double t = ms_since(start);
      if (i < o.warmup) continue;
      compute.push_back(c), all_reduce.push_back(a), overlapped.push_back(t);
    }
    r.compute_ms = median(compute), r.all_reduce_ms = median(all_reduce), r.overlapped_ms = median(overlapped);
    double exposed = std::max(0.0, r.overlapped_ms - r.compute_ms);
    r.hidden = r.all_reduce_ms > 0 ? std::clamp(1.0 - exposed / r.all_reduce_ms, 0.0, 1.0) : 1.0;
    r.buckets = dp.buckets();
    r.buckets_sent_during_backward = dp.buckets_sent_during_backward();
    auto grads = grad_bytes(params);
    if (reference.empty()) reference = grads;
    r.grads_bitwise_equal = grads == reference;
    results.push_back(r);
  }
  std::vector<OptimizerResult> optimizers = compare_optimizers(subject, world, bucket_bytes, o);
  if (!lead) return 0;
  fmt::print("{:<14} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9}  {}\n", "policy", "compute ms", "allreduce", "overlapped",
             "exposed", "hidden", "buckets", "grads vs first");
  for (const auto& r : results)
    fmt::print("{:<14} {:>11.1f} {:>11.1f} {:>11.1f} {:>9.1f} {:>7.0f}% {:>5}/{:<3}  {}\n", r.policy, r.compute_ms,
               r.all_reduce_ms, r.overlapped_ms, std::max(0.0, r.overlapped_ms - r.compute_ms), 100 * r.hidden,
               r.buckets_sent_during_backward, r.buckets, r.grads_bitwise_equal ? "bitwise" : "DIFFER");
  fmt::print("(rank 0's medians; buckets: sent during backward / all; hidden = 1 - (overlapped - compute) / allreduce)\n");
  fmt::print("\n{:<10} {:>28} {:>22}\n", "optimizer", "average, clip, update ms", "state MiB on rank 0");
  for (const auto& r : optimizers)
    fmt::print("{:<10} {:>28.1f} {:>22.2f}\n", r.name, r.step_ms, r.state_bytes / 1048576.0);
  fmt::print("(AdamW: gradients all-reduced; ZeRO-1: reduce-scattered, each rank updates its share, then an "
             "all-gather of the parameters)\n");
  if (!o.json_path.empty()) {
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& r : results)
      rows.push_back({{"policy", r.policy}, {"compute_ms", r.compute_ms}, {"all_reduce_ms", r.all_reduce_ms},
                      {"overlapped_ms", r.overlapped_ms}, {"hidden_fraction", r.hidden}, {"buckets", r.buckets},
                      {"buckets_sent_during_backward", r.buckets_sent_during_backward},
                      {"grads_bitwise_equal", r.grads_bitwise_equal}});
    nlohmann::json doc = {{"machine", machine_info()},
                          {"run", {{"model", o.model}, {"config", subject.config()}, {"ranks", world.size()},
                                   {"bucket_mib", d.bucket_mib}, {"steps", o.steps}, {"warmup", o.warmup}}},
                          {"data_parallel", rows}};
    for (const auto& r : optimizers)
      doc["optimizers"].push_back({{"optimizer", r.name}, {"step_ms", r.step_ms}, {"state_bytes", r.state_bytes}});
    std::ofstream(o.json_path) << doc.dump(2) << "\n";
  }
  for (const auto& r : results)
    if (!r.grads_bitwise_equal) {
      fmt::print(stderr, "remat-bench: averaged gradients under {} differ from {}'s\n", r.policy, results.front().policy);
      return 1;
    }
  return 0;
}

}  // namespace remat::bench
