// `remat-bench` policy mode: peak memory and step time for each checkpoint policy on one model,
// with gradients compared bit for bit against `none`, the analytical activation floor, bytes
// saved by op kind, and optional Chrome trace and SVG plot.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "autograd/trace.h"
#include "runtime/allocator.h"

namespace remat::bench {

struct PolicyOptions {
  std::string model = "gpt";  // gpt, dit or unet
  std::string config = "small";
  std::map<std::string, double> overrides;
  std::vector<std::string> policies = {"none", "full", "ops", "block_skip:2", "level:3"};
  std::string device = "cpu";
  std::string dtype = "f32";  // compute dtype: f32 or bf16 (cuda)
  int steps = 5, warmup = 1;
  int rounds = 1;  // every policy in turn, this many times; times pooled per policy
  // Gradient accumulation: each step's batch as this many micro-batches, one forward and backward
  // each (as `remat train --micro-batches`); every policy, `none` included, runs them.
  int64_t micro_batches = 1;
  uint64_t seed = 0;
  std::string json_path, csv_path, trace_path, plot_path;
  // Also the budget planner at ten budgets from its floor to no checkpointing's peak, with a table
  // of step time against activation peak and which runs no other beats in both.
  bool pareto = false;
  // The device's peak in TFLOP/s at the compute dtype, for MFU; 0: the known peak of the GPU
  // (peak_tflops_of), else no MFU.
  double peak_tflops = 0;
  bool tf32 = false;  // cuda: f32 GEMMs on TF32 tensor cores (set_cuda_tf32)
  // One more step per policy, traced: where its time goes, per op and phase (on a GPU the kernels'
  // time from events on the compute stream), the top `profile_rows` printed.
  bool profile = false;
  int profile_rows = 12;
};

struct PolicyResult {
  std::string policy;
  double median_step_ms = 0, min_step_ms = 0, median_replay_ms = 0;
  int64_t peak_bytes = 0, activation_peak_bytes = 0;
  int64_t heap_step_peak_bytes = -1;  // from the LD_PRELOAD heap tracker when present, else -1
  int64_t activation_floor_bytes = -1;  // -1: no formula for this policy
  std::map<std::string, int64_t> saved_bytes_by_op, recomputed_bytes_by_op;
  int64_t ops_replayed = 0;      // per step
  int64_t offloaded_bytes = 0;   // moved to host memory in a timed step (checkpoint_counters)
  double tokens_per_s = 0;
  // Model FLOPs per second (train_flops_per_token x tokens / median step; -1 without a formula for
  // the model) and their fraction of the device's peak (-1 when the peak is unknown).
  double model_tflops = -1, mfu = -1;
  // On a GPU: the most times one step made the host wait for the GPU (cuda_host_syncs), the bench's
  // own wait for the step's end not counted; -1 on the cpu.
  int64_t host_syncs_per_step = -1;
  bool grads_bitwise_equal = true;
  double grads_max_abs_diff = 0;
  // Budget policies: the budget, the planner's prediction and choice.
  int64_t budget_bytes = -1, predicted_peak_bytes = -1;
  double predicted_recompute_ms = -1;  // the plan's, from its retimed op times (a mean over rounds)
  // On a GPU, what the plan offloads and the transfer time it expects not to hide (a mean over rounds).
  int64_t predicted_offloaded_bytes = -1;
  double predicted_transfer_ms = 0;
  std::string planned_blocks;
  std::string predicted_peak_at;  // where the simulation puts that peak (BudgetPlan::predicted_peak_at)
  // With --profile: the traced step's time per op and phase (autograd/trace.h's self_times); the
  // step's host time is timeline_step_us.
  std::vector<OpTime> profile;
  std::vector<MemoryEvent> timeline;  // one traced step (activation events), for the plot
  double timeline_step_us = 0;
};

int run_policies(const PolicyOptions& options);
// The dense peak of a device at a compute dtype in TFLOP/s, where known (H100 and H200 SXM: bf16
// 989.4 on tensor cores, f32 494.7 in TF32 and 66.9 without); 0 otherwise (every CPU).
double peak_tflops_of(const std::string& device_name, const std::string& dtype, bool tf32);

}  // namespace remat::bench
