// remat-bench: peak memory and step time per model x checkpoint policy (default), kernel throughput
// (`remat-bench ops`), a soak test (`soak`), or the f64 step a PyTorch twin checks itself against
// (`twin`). Errors print one line and exit 2.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <sstream>

#include "bench_dist.h"
#include "bench_ops.h"
#include "bench_policies.h"
#include "bench_soak.h"
#include "bench_twin.h"
#include "runtime/error.h"

int main(int argc, char** argv) {
  CLI::App app{"remat-bench: peak memory and step time per model x checkpoint policy, or kernel throughput (ops)"};
  app.require_subcommand(0, 1);
  remat::bench::PolicyOptions p;
  std::string policies = "none,full,ops,block_skip:2,level:3";
  int64_t batch = 0, layers = 0, seq_len = 0;
  double dropout = -1;
  app.add_option("--model", p.model, "gpt, dit or unet")->capture_default_str();
  app.add_option("--config", p.config, "tiny, small (gpt also gpt2)")->capture_default_str();
  app.add_option("--policies", policies, "comma-separated policy strings")->capture_default_str();
  app.add_option("--device", p.device, "cpu or cuda:N")->capture_default_str();
  app.add_option("--dtype", p.dtype, "compute dtype: f32, or bf16 (mixed precision; cuda only)")->capture_default_str();
  app.add_option("--steps", p.steps, "timed steps per policy")->capture_default_str();
  app.add_option("--warmup", p.warmup, "untimed steps before them")->capture_default_str();
  app.add_option("--rounds", p.rounds, "run every policy in turn this many times, pooling the times (a drifting machine "
                                       "then affects all policies alike)")->capture_default_str();
  app.add_option("--seed", p.seed, "seed of weights, data and dropout")->capture_default_str();
  app.add_option("--micro-batches", p.micro_batches,
                 "each step's batch as N micro-batches, a forward and backward each (gradient accumulation), under "
                 "every policy; the planner and the saved-bytes report see the first")->capture_default_str();
  app.add_option("--batch", batch, "override the config's batch size");
  app.add_option("--layers", layers, "override the config's layers");
  app.add_option("--seq-len", seq_len, "override the config's sequence length");
  app.add_option("--dropout", dropout, "override the config's dropout");
  bool fused_loss = false;
  app.add_flag("--fused-loss", fused_loss,
               "gpt: the head and loss as linear_cross_entropy (the logits never whole; one more head GEMM a step)");
  app.add_option("--json", p.json_path, "write the results as JSON (schema in docs/bench.md)");
  app.add_option("--csv", p.csv_path, "write the results as CSV");
  app.add_option("--trace", p.trace_path, "write a Chrome trace (Perfetto, chrome://tracing) of one step per policy");
  app.add_option("--plot", p.plot_path, "write an SVG plot: memory vs time, and memory over one step");
  app.add_flag("--tf32", p.tf32, "cuda: f32 GEMMs on TF32 tensor cores (off by default; parity tests stay strict)");
  app.add_option("--peak-tflops", p.peak_tflops,
                 "the device's peak TFLOP/s at the compute dtype, for the MFU column (default: known for H100/H200)");
  app.add_flag("--profile", p.profile,
               "one more traced step per policy: time per op and phase, replays apart (on a GPU, kernel time from "
               "CUDA events), the largest printed");
  app.add_flag("--pareto", p.pareto,
               "also run the budget planner at ten budgets from its floor to none's peak, and print step time "
               "against activation peak with the Pareto front");

  remat::bench::DataParallelBenchOptions dist;
  CLI::Option* ranks = app.add_option("--ranks", dist.ranks,
                                      "data parallel under mpirun -np N: compute, all-reduce and overlapped times per policy");
  app.add_option("--bucket-mib", dist.bucket_mib, "with --ranks: gradient bucket size in MiB")->capture_default_str();

  remat::bench::OpsOptions ops;
  CLI::App* ops_cmd = app.add_subcommand("ops", "GFLOP/s of matmul/linear and times of the fused ops");
  ops_cmd->add_option("--device", ops.device, "cpu or cuda:N")->capture_default_str();
  ops_cmd->add_option("--repeats", ops.repeats, "timed repeats per op (median reported)")->capture_default_str();
  ops_cmd->add_option("--json", ops.json_path, "also write the figures as JSON to this file");
  ops_cmd
      ->add_option("--attention", ops.attention,
                   "on cuda, the attention paths to time at gpt2's shape, comma-separated (default: all; none: none)")
      ->delimiter(',')
      ->check(CLI::IsMember(remat::bench::attention_variants()));
  remat::bench::SoakOptions soak;
  std::string soak_policies = "none,full,ops,block_skip:2,level:3";
  CLI::App* soak_cmd = app.add_subcommand("soak", "many training steps per policy: is live memory flat?");
  soak_cmd->add_option("--config", soak.config, "gpt config: tiny, small or gpt2")->capture_default_str();
  soak_cmd->add_option("--policies", soak_policies, "comma-separated policy strings")->capture_default_str();
  soak_cmd->add_option("--steps", soak.steps, "training steps per policy")->capture_default_str();
  soak_cmd->add_option("--samples", soak.samples, "memory samples per policy")->capture_default_str();
  soak_cmd->add_option("--json", soak.json_path, "also write the samples as JSON to this file");
  remat::bench::TwinOptions twin;
  CLI::App* twin_cmd = app.add_subcommand(
      "twin", "one f64 step of the model, its weights, inputs, loss and gradients to a safetensors file, for "
              "the PyTorch peer's --check (bench/peer/gpt_peer.py, diffusion_peer.py)");
  twin_cmd->add_option("--model", twin.model, "gpt, dit or unet")->capture_default_str();
  twin_cmd->add_option("--config", twin.config, "tiny or small (gpt also gpt2)")->capture_default_str();
  twin_cmd->add_option("--seed", twin.seed, "seed of the weights and inputs")->capture_default_str();
  twin_cmd->add_option("--out", twin.out, "the safetensors file to write")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "remat-bench: %s (see remat-bench --help)\n", e.what());
    return 2;
  }
  try {
    if (*ops_cmd) return remat::bench::run_ops(ops);
    if (*twin_cmd) return remat::bench::run_twin(twin);
    if (*soak_cmd) {
      soak.policies.clear();
      std::stringstream list(soak_policies);
      for (std::string item; std::getline(list, item, ',');)
        if (!item.empty()) soak.policies.push_back(item);
      return remat::bench::run_soak(soak);
    }
    p.policies.clear();
    std::stringstream list(policies);
    for (std::string item; std::getline(list, item, ',');)
      if (!item.empty()) p.policies.push_back(item);
    REMAT_CHECK(!p.policies.empty(), "--policies: expected at least one policy");
    if (batch) p.overrides["batch"] = static_cast<double>(batch);
    if (layers) p.overrides["layers"] = static_cast<double>(layers);
    if (seq_len) p.overrides["seq_len"] = static_cast<double>(seq_len);
    if (dropout >= 0) p.overrides["dropout"] = dropout;
    if (fused_loss) p.overrides["fused_loss"] = 1;
    if (ranks->count() > 0) return remat::bench::run_data_parallel(p, dist);
    return remat::bench::run_policies(p);
  } catch (const remat::Error& e) {
    std::fprintf(stderr, "remat-bench: %s\n", e.message().c_str());
    return 2;
  }
}
