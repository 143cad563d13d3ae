// Reliability: configs read from files are checked, parameter counts are known before a model is
// built, running out of memory is an error (inside parallel kernels too), long runs stay flat,
// and metrics.jsonl matches the snapshot it belongs to.
#include <unistd.h>

#include <catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "models/data.h"
#include "models/dit.h"
#include "models/gpt.h"
#include "models/optim.h"
#include "models/tasks.h"
#include "models/train.h"
#include "models/unet.h"
#include "remat.h"

using namespace remat;
using Catch::Matchers::Contains;

namespace {

int64_t count_of(const Module& m) {
  int64_t n = 0;
  for (const Tensor& p : m.parameters()) n += p.numel();
  return n;
}

// Lifts a memory limit when the test leaves, whatever happens.
struct MemoryLimit {
  explicit MemoryLimit(int64_t bytes) { set_memory_limit(Device::cpu(), bytes); }
  ~MemoryLimit() { set_memory_limit(Device::cpu(), 0); }
};

}  // namespace

TEST_CASE("parameter counts are known before a model is built", "[reliability][models]") {
  for (const char* name : {"tiny", "small"}) {
    INFO(name);
    GptConfig g = gpt_config(name);
    CHECK(parameter_count(g) == count_of(Gpt(g)));
    DitConfig d = dit_config(name);
    CHECK(parameter_count(d) == count_of(Dit(d)));
    UnetConfig u = unet_config(name);
    CHECK(parameter_count(u) == count_of(Unet(u)));
  }
  UnetConfig u = unet_config("tiny");
  u.mults = {1, 2, 3};
  CHECK(parameter_count(u) == count_of(Unet(u)));
  CHECK(task_parameter_count("gpt", "small", {{"channels", 512}, {"heads", 8}}) ==
        parameter_count([] {
          GptConfig c = gpt_config("small");
          c.channels = 512;
          return c;
        }()));
}

TEST_CASE("gpt's model FLOPs per token: 6 per weight the matmuls use, plus attention's 12 L T C",
          "[reliability][models]") {
  for (const char* name : {"tiny", "small", "gpt2"}) {
    INFO(name);
    GptConfig c = gpt_config(name);
    // The matmuls' weights: every 2-D parameter (the linears, and wte as the tied LM head) but the
    // position embedding, which is only looked up.
    double weights = 0;
    if (std::string(name) != "gpt2") {
      for (auto& [param, t] : Gpt(c).named_parameters())
        if (t.dim() == 2 && param.find("wpe") == std::string::npos) weights += static_cast<double>(t.numel());
    } else {  // not built here (124M parameters): its sizes
      weights = 12.0 * 12 * 768 * 768 + 50304.0 * 768;
    }
    const double attention = 12.0 * static_cast<double>(c.layers * c.seq_len * c.channels);
    CHECK(train_flops_per_token(c) == 6 * weights + attention);
  }
  // GPT-2 124M at T 1024: within 1% of llm.c's and nanoGPT's 6 N + 12 L T C, whose N counts every
  // parameter (biases, norms and the position embedding too): about 0.86 GFLOP per token.
  const GptConfig g = gpt_config("gpt2");
  const double llm_c = 6.0 * static_cast<double>(parameter_count(g)) + 12.0 * 12 * 1024 * 768;
  CHECK(train_flops_per_token(g) < llm_c);
  CHECK(train_flops_per_token(g) > 0.99 * llm_c);
}

TEST_CASE("configs too large to count are refused, not overflowed (found by fuzz_config)", "[reliability][models]") {
  CHECK_THROWS_WITH(task_parameter_count("gpt", "tiny", {{"channels", 1e12}, {"heads", 1}}),
                    Contains("would have more than 2^63 parameters"));
  CHECK_THROWS_WITH(task_parameter_count("dit", "tiny", {{"channels", 1e12}, {"heads", 1}}),
                    Contains("would have more than 2^63 parameters"));
  CHECK_THROWS_WITH(task_parameter_count("unet", "tiny", {{"channels", 1e12}}), Contains("from 1 to 2^40"));
}

TEST_CASE("model configs read from files are checked like any other", "[reliability][models]") {
  nlohmann::json gpt = {{"name", "x"}, {"vocab", 64}, {"channels", 32}, {"heads", 0}, {"layers", 1},
                        {"seq_len", 8}, {"batch", 2}, {"dropout", 0.0}};
  CHECK_THROWS_WITH(make_task_from_json("gpt", gpt, 0), Contains("gpt: expected positive sizes"));
  gpt["heads"] = 4;
  gpt["dropout"] = 1.5;
  CHECK_THROWS_WITH(make_task_from_json("gpt", gpt, 0), Contains("expected dropout in [0, 1)"));
  nlohmann::json dit = {{"name", "x"}, {"image", 8}, {"patch", 0}, {"channels", 32}, {"heads", 4}, {"double_blocks", 1},
                        {"single_blocks", 1}, {"classes", 4}, {"batch", 2}, {"ada_zero", true}};
  CHECK_THROWS_WITH(make_task_from_json("dit", dit, 0), Contains("dit: expected positive sizes"));
  nlohmann::json unet = {{"name", "x"}, {"image", 8}, {"base", 8}, {"groups", 0}, {"heads", 2}, {"classes", 4},
                         {"batch", 2}, {"mults", {1, 2}}, {"dropout", 0.0}};
  CHECK_THROWS_WITH(make_task_from_json("unet", unet, 0), Contains("unet: expected positive sizes"));
  gpt["channels"] = 1 << 20;
  gpt["vocab"] = 1 << 20;
  gpt["dropout"] = 0.0;
  CHECK_THROWS_WITH(make_task_from_json("gpt", gpt, 0), Contains("for the weights alone, more than the"));
}

TEST_CASE("running out of memory is an error, also inside parallel kernels, and the next step works", "[reliability][memory]") {
  manual_seed(1);
  Tensor q = Tensor::randn({2, 2, 256, 32}), x = Tensor::randn({4, 16, 32, 32}), w = Tensor::randn({16, 16, 3, 3});
  {
    MemoryLimit limit(memory_stats().total.current + (1 << 16));  // 64 KiB above what exists
    CHECK_THROWS_WITH(attention(q, q, q, true), Contains("out of memory on cpu"));
    CHECK_THROWS_WITH(conv2d(x, w, Tensor(), 1, 1), Contains("out of memory on cpu"));
    CHECK_THROWS_WITH(Tensor::empty({1 << 20}), Contains("would pass the limit"));
  }
  CHECK(attention(q, q, q, true).shape() == q.shape());
  CHECK(conv2d(x, w, Tensor(), 1, 1).shape() == Shape{4, 16, 32, 32});
}

namespace {

// `steps` training steps of gpt tiny under each policy: live and peak bytes after the last step
// equal those after step 10, at the same point of the step (its batch still alive).
void check_memory_flat(int steps) {
  for (const char* policy : {"none", "full", "ops", "block_skip:2", "level:3"}) {
    INFO("policy " << policy);
    manual_seed(2);
    GptConfig c = gpt_config("tiny");
    Gpt model(c);
    apply_policy(model, parse_policy(policy));
    AdamW opt(model.named_parameters());
    AdditionTask data(c.vocab, 3);
    reset_peak_memory();
    int64_t live_10 = 0, live_last = 0, peak_10 = 0, peak_last = 0;
    for (int step = 1; step <= steps; ++step) {
      auto [x, y] = data.batch(c.batch, c.seq_len);
      backward(model.loss(x, y));
      opt.step(1e-3);
      opt.zero_grad();
      if (step == 10) live_10 = memory_stats().total.current, peak_10 = memory_stats().total.peak;
      if (step == steps) live_last = memory_stats().total.current, peak_last = memory_stats().total.peak;
    }
    CHECK(live_last == live_10);
    CHECK(peak_last == peak_10);  // no step after the tenth needed more than the first ten
  }
}

}  // namespace

TEST_CASE("1,000 training steps of gpt tiny keep live and peak memory flat under every policy", "[reliability][memory]") {
  check_memory_flat(1000);
}

TEST_CASE("20,000 training steps of gpt tiny keep live and peak memory flat under every policy",
          "[reliability][memory][slow]") {
  check_memory_flat(20000);
}

TEST_CASE("metrics.jsonl holds each step once, also when a run stopped after its last snapshot", "[reliability][train]") {
  auto dir = std::filesystem::temp_directory_path() / ("remat_metrics_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  TrainOptions o;
  o.config = "tiny";
  o.steps = 10;
  o.save_every = 3;
  o.stop_at = 7;
  o.out = dir.string();
  train(o);
  auto steps_in_file = [&] {
    std::vector<int64_t> steps;
    std::ifstream in(dir / "metrics.jsonl");
    for (std::string line; std::getline(in, line);) steps.push_back(nlohmann::json::parse(line).at("step"));
    return steps;
  };
  CHECK(steps_in_file() == std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7});
  // A process that died after the snapshot at step 7 may have left later lines behind.
  std::ofstream(dir / "metrics.jsonl", std::ios::app) << R"({"step":8,"loss":9.0})" << "\n";
  TrainOptions more;
  more.resume = dir.string();
  more.keep_step_metrics = false;
  TrainResult r = train(more);
  CHECK(r.steps.empty());
  CHECK(r.steps_run == 3);
  CHECK(steps_in_file() == std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  std::filesystem::remove_all(dir);
}
