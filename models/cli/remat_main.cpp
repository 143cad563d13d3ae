// The `remat` command: train the reference models, list ops. Errors print one line and exit 2.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <map>
#include <fmt/format.h>

#include "dist/process_group.h"
#include "kernels/backend.h"
#include "models/cli/data_parallel_group.h"
#include "models/images.h"
#include "models/sample.h"
#include "models/train.h"
#include "runtime/cuda_backend.h"
#include "runtime/allocator.h"
#include "runtime/error.h"
#include "remat_version.h"

namespace {

std::string mib(int64_t bytes) { return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1024.0 * 1024.0)); }

void print_progress(const remat::StepMetrics& m, int64_t total) {
  static const bool tty = isatty(fileno(stderr));
  static bool first = true;  // the first step of this invocation (a resumed run starts mid-schedule)
  const int width = 24;
  int filled = static_cast<int>(width * m.step / std::max<int64_t>(total, 1));
  std::string bar = std::string(filled, '#') + std::string(width - filled, '.');
  std::string line = fmt::format("[{}] step {}/{}  loss {:.4f}  lr {:.2e}  {:.1f} items/s  mem {} (peak {}, act {})", bar,
                                 m.step, total, m.loss, m.lr, m.tokens_per_s, mib(m.current_bytes), mib(m.peak_bytes),
                                 mib(m.activation_peak_bytes));
  if (tty) {
    std::fprintf(stderr, "\r%s\033[K", line.c_str());
    if (m.step == total) std::fprintf(stderr, "\n");
  } else if (first || m.step % std::max<int64_t>(1, total / 20) == 0 || m.step == total) {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
  first = false;
}

int list_ops() {
  fmt::print("{:<20} {:>6} {:>7}  {:<4} {:<4}\n", "op", "inputs", "outputs", "cpu", "cuda");
  for (int i = 0; i < remat::kOpCount; ++i) {
    const auto& info = remat::kOpInfo[i];
    auto arity = [](int n) { return n < 0 ? std::string("n") : std::to_string(n); };
    remat::Backend* cuda = remat::cuda_kernels();
    auto op = static_cast<remat::OpKind>(i);
    fmt::print("{:<20} {:>6} {:>7}  {:<4} {:<4}\n", info.name, arity(info.inputs), arity(info.outputs), "yes",
               cuda ? (cuda->supports(op) ? "yes" : "no") : remat::cuda_built() ? "no (not loaded)" : "no (not built)");
  }
  return 0;
}

// One line, exit 2; under mpirun the other ranks learn of it and fail too instead of waiting.
int fail(remat::dist::ProcessGroup* world, const std::string& message) {
  if (world && world->size() > 1) {
    std::fprintf(stderr, "remat: rank %d: %s\n", world->rank(), message.c_str());
    try {
      world->report_failure(message);
    } catch (const std::exception&) {
      // the group is already broken: the others time out
    }
  } else {
    std::fprintf(stderr, "remat: %s\n", message.c_str());
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"remat: train reference models with activation checkpointing built into the tape"};
  app.set_version_flag("--version", std::string("remat ") + remat::version() +
                                        (remat::cuda_built() ? " (with the CUDA backend)" : " (cpu only)"));
  app.require_subcommand(1);
  remat::TrainOptions t;
  int64_t vocab = 0, channels = 0, heads = 0, layers = 0, seq_len = 0, batch = 0;
  double dropout = -1;
  CLI::App* train = app.add_subcommand("train", "train a reference model");
  train->add_option("--model", t.model, "gpt, dit or unet")->capture_default_str();
  train->add_option("--config", t.config, "named configuration: tiny, small (gpt also gpt2)")->capture_default_str();
  train->add_option("--policy", t.policy, "none, full, ops, block_skip:N, level:L, sac:<op>,<op>..., sqrt, revolve:S, "
                    "budget:[act:|total:]<bytes|P%> (default none)");
  train->add_option("--steps", t.steps, "steps in the schedule (default 300; on --resume the run's, or a new length)");
  train->add_option("--stop-at", t.stop_at, "stop after this step, keeping the schedule of --steps");
  train->add_option("--device", t.device, "cpu, cuda:N, or cuda (under mpirun: each rank the GPU of its rank on its machine)")
      ->capture_default_str();
  train->add_option("--dtype", t.dtype, "compute dtype: f32, or bf16 (mixed precision, f32 master weights; cuda only)")
      ->capture_default_str();
  train->add_option("--seed", t.seed, "seed of weights, data and dropout")->capture_default_str()->check(CLI::NonNegativeNumber);
  train->add_option("--out", t.out, "run directory: metrics.jsonl, model.safetensors, state.safetensors");
  train->add_option("--resume", t.resume, "continue the run in this directory");
  train->add_flag("--restart", t.restart,
                  "with --resume: start the schedule again at the resumed step (warmup, then the cosine to --steps)");
  train->add_option("--lr", t.lr, "peak learning rate (default 1e-3)");
  train->add_option("--min-lr", t.min_lr, "final learning rate of the cosine schedule (default 1e-4)");
  train->add_option("--warmup", t.warmup, "linear warmup steps (default 20)");
  train->add_option("--ema", t.ema,
                    "decay of a moving average of the weights, saved as model.safetensors for sampling (default 0: off)");
  train->add_option("--label-dropout", t.label_dropout,
                    "dit, unet: probability of training an image without its label, for sample --guidance (default 0)");
  train->add_option("--time-sampling", t.time_sampling,
                    "dit, unet: how the flow time is drawn, uniform or logit-normal (default uniform)");
  train->add_option("--clip", t.clip, "gradient clipping by global norm")->capture_default_str();
  train->add_option("--micro-batches", t.micro_batches,
                    "gradient accumulation: each step's batch in N micro-batches, one at a time (the activations of "
                    "one; the same data and masks, sums in another order; default 1, on --resume the run's own)");
  train->add_option("--save-every", t.save_every, "snapshot period in steps")->capture_default_str();
  train->add_flag("--overwrite", t.overwrite, "replace the run in --out (without it, a folder holding a run is refused)");
  bool tf32 = false;
  train->add_flag("--tf32", tf32,
                  "cuda: f32 GEMMs on TF32 tensor cores (products of 10-bit mantissas, f32 sums); off by default, "
                  "not recorded in the run (give it again on --resume)");
  int zero = 0;
  train->add_option("--zero", zero,
                    "under mpirun: 1 shards AdamW's moments over the ranks (ZeRO-1), 0 keeps them whole on each")
      ->capture_default_str();
  std::string max_memory;
  train->add_option("--max-memory", max_memory,
                    "refuse to allocate more than this on the device (bytes, or with K, M, G, T, KiB, MiB, GiB, TiB)");
  // Overrides take effect when given, whatever their value (0 is an error, not "not given").
  std::vector<std::pair<const char*, CLI::Option*>> size_overrides = {
      {"vocab", train->add_option("--vocab", vocab, "override the config's vocabulary size")},
      {"channels", train->add_option("--channels", channels, "override the config's channels")},
      {"heads", train->add_option("--heads", heads, "override the config's heads")},
      {"layers", train->add_option("--layers", layers, "override the config's layers")},
      {"seq_len", train->add_option("--seq-len", seq_len, "override the config's sequence length")},
      {"batch", train->add_option("--batch", batch, "override the config's batch size")}};
  CLI::Option* dropout_option = train->add_option("--dropout", dropout, "override the config's dropout");
  bool fused_loss = false;
  train->add_flag("--fused-loss", fused_loss,
                  "gpt: the head and loss as linear_cross_entropy (the logits never whole; one more head GEMM a step)");
  CLI::App* ops = app.add_subcommand("ops", "list the ops and which backends have kernels for them");
  remat::SampleOptions so;
  CLI::App* sample = app.add_subcommand("sample", "generate images with a trained dit or unet (PNG grid)");
  sample->add_option("--weights", so.weights, "model.safetensors written by remat train")->required();
  sample->add_option("--model", so.model, "dit or unet (default: from the weights file)");
  sample->add_option("--out", so.out, "PNG file to write")->capture_default_str();
  sample->add_option("--n", so.n, "number of images")->capture_default_str();
  sample->add_option("--steps", so.steps, "steps from noise to image")->capture_default_str();
  sample->add_option("--eta", so.eta,
                     "stochasticity of the steps: 0 = Euler steps of the ODE, 1 = ancestral (DDPM) steps")
      ->capture_default_str();
  sample->add_option("--seed", so.seed, "seed of the starting noise")->capture_default_str();
  sample->add_option("--guidance", so.guidance,
                     "classifier-free guidance scale; 1 = none, others need a model trained with --label-dropout")
      ->capture_default_str();
  sample->add_option("--scale", so.scale, "enlarge each pixel to scale x scale (1..16)")->capture_default_str();

  std::string loss_weights;
  int64_t loss_n = 64;
  int loss_times = 10;
  uint64_t loss_seed = 0;
  CLI::App* flow_loss = app.add_subcommand("flow-loss", "a trained dit or unet's loss at each flow time, from noise (t = 1) to image (t = 0)");
  flow_loss->add_option("--weights", loss_weights, "model.safetensors written by remat train")->required();
  flow_loss->add_option("--n", loss_n, "images (the same at every time)")->capture_default_str();
  flow_loss->add_option("--times", loss_times, "evenly spaced times (bin centres)")->capture_default_str();
  flow_loss->add_option("--seed", loss_seed, "seed of the images and noise")->capture_default_str();

  const std::string command = argc > 1 ? argv[1] : "";
  if (argc > 1 && argv[1][0] != '-' && command != "train" && command != "ops" && command != "sample" && command != "flow-loss") {
    std::fprintf(stderr, "remat: unknown command '%s': expected train, sample, flow-loss or ops (see remat --help)\n", argv[1]);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "remat: %s (see remat --help)\n", e.what());
    return 2;
  }
  // Under mpirun every rank runs this; rank 0 alone prints progress and results and writes files.
  remat::dist::ProcessGroup* world = nullptr;
  std::unique_ptr<remat::DataParallelGroup> data_parallel;
  try {
    if (*ops) return list_ops();
    if (*flow_loss) {
      double total = 0;
      bool header = false;
      auto rows = remat::flow_loss_by_time(loss_weights, loss_n, loss_times, loss_seed, [&](const remat::FlowLossAtTime& r) {
        if (!header) fmt::print("{:>6}  {:>8}\n", "t", "loss"), header = true;
        fmt::print("{:6.3f}  {:8.4f}\n", r.t, r.loss);
        std::fflush(stdout);
      });
      for (auto& r : rows) total += r.loss;
      fmt::print("  mean  {:8.4f}  (uniform in t; {} images, seed {})\n", total / rows.size(), loss_n, loss_seed);
      return 0;
    }
    if (*sample) {
      remat::Tensor images = remat::sample_images(so, [](int done, int total) {
        if (!isatty(fileno(stderr))) return;
        std::fprintf(stderr, "\rsampling: step %d/%d\033[K%s", done, total, done == total ? "\n" : "");
        std::fflush(stderr);
      });
      fmt::print("wrote {} ({} images, {} {} steps{})\n", so.out, so.n, so.steps,
                 so.eta == 0 ? "Euler" : fmt::format("stochastic (eta {})", so.eta),
                 so.guidance != 1.0 ? fmt::format(", guidance {}", so.guidance) : "");
      remat::ShapeScore score = remat::score_shapes(images, remat::sample_labels(so.n));
      std::string by_class;
      for (size_t c = 0; c < score.per_class.size(); ++c)
        if (score.per_class[c].second > 0)
          by_class += fmt::format("{}{} {}/{}", by_class.empty() ? " (" : ", ", remat::shape_name(static_cast<int>(c)),
                                  score.per_class[c].first, score.per_class[c].second);
      if (!by_class.empty()) by_class += ")";
      fmt::print("shapes: {}/{} fit their label's outline best, {}/{} also with IoU >= {}{}; mean IoU {:.3f}\n",
                 score.classified, score.n, score.recognised, score.n, remat::kRecognisedIou, by_class, score.mean_iou);
      return 0;
    }
    if (*train) {
      const std::map<std::string, int64_t> values = {{"vocab", vocab},   {"channels", channels}, {"heads", heads},
                                                     {"layers", layers}, {"seq_len", seq_len},   {"batch", batch}};
      for (auto [key, option] : size_overrides)
        if (option->count() > 0) t.overrides[key] = static_cast<double>(values.at(key));
      if (dropout_option->count() > 0) t.overrides["dropout"] = dropout;
      if (fused_loss) t.overrides["fused_loss"] = 1;
      if (!max_memory.empty()) remat::set_memory_limit(remat::parse_device(t.device), remat::parse_byte_count(max_memory));
      t.keep_step_metrics = false;  // the progress bar and metrics.jsonl have every step
      world = &remat::dist::ProcessGroup::world();
      if (world->size() > 1) {
        data_parallel = std::make_unique<remat::DataParallelGroup>(zero, *world);
        t.group = data_parallel.get();
        // `--device cuda`: each rank on its own GPU, by its rank on this machine.
        if (t.device == "cuda") t.device = "cuda:" + std::to_string(remat::dist::local_rank());
      } else {
        REMAT_CHECK(zero == 0 || zero == 1, "--zero: expected 0 or 1, got ", zero);
      }
      if (tf32) {
        REMAT_CHECK(remat::parse_device(t.device).is_cuda(), "--tf32 applies to f32 GEMMs on cuda; this run is on ",
                    t.device);
        remat::set_cuda_tf32(true);
      }
      const bool lead = world->rank() == 0;
      remat::TrainResult r = remat::train(t, lead ? remat::StepCallback(print_progress) : remat::StepCallback(),
                                          [lead](const std::string& note) {
                                            if (!lead) return;
                                            fmt::print("{}\n", note);
                                            std::fflush(stdout);
                                          });
      if (!lead) return 0;
      if (world->size() > 1)
        fmt::print("data parallel on {} processes, each computing its rows of a global batch of {} x --batch{}\n",
                   world->size(), world->size(), zero == 1 ? "; AdamW's moments sharded (ZeRO-1)" : "");
      if (r.steps_run == 0) {
        fmt::print("nothing to do: the run is already at the end of its schedule\n");
        return 0;
      }
      fmt::print("final loss {:.4f} (first {:.4f}; {})\n", r.final_loss, r.first_loss, r.reference_text);
      fmt::print("{:.1f} {}/s, {} parameters, peak memory {} (activations {})\n", r.tokens_per_s, r.item_name,
                 r.parameters, mib(r.peak_bytes), mib(r.activation_peak_bytes));
      if (!r.plan_report.empty()) fmt::print("{}", r.plan_report);
      if (!t.out.empty() || !t.resume.empty())
        fmt::print("wrote {}/model.safetensors, state.safetensors, metrics.jsonl\n", t.out.empty() ? t.resume : t.out);
    }
  } catch (const remat::Error& e) {
    return fail(world, e.message());
  } catch (const std::bad_alloc&) {
    return fail(world, "out of memory (a memory request the system refused; --max-memory makes the limit explicit)");
  } catch (const std::exception& e) {
    return fail(world, e.what());
  }
  return 0;
}
