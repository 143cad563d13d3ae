// CUDA suite ([cuda]): every op against the CPU, dropout masks and integer ops exact, gradients
// under every policy bitwise equal to none on the GPU, the caching allocator's counters, and a
// short training run. Exits 77 (skipped) on a machine without a GPU; listing works anywhere.
#define CATCH_CONFIG_RUNNER
#include <catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>

#include "../models_for_tests.h"
#include "../op_cases.h"
#include "autograd/graph.h"
#include "checkpoint/planner.h"
#include "dist/data_parallel.h"
#include "dist/nccl.h"
#include "dist/process_group.h"
#include "kernels/backend.h"
#include "models/data.h"
#include "models/dit.h"
#include "models/gpt.h"
#include "models/images.h"
#include "models/train.h"
#include "models/unet.h"
#include "remat.h"
#include "runtime/cuda_backend.h"

using namespace remat;
using namespace remat::testing;
using Catch::Matchers::Contains;

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::string(argv[i]).rfind("--list", 0) == 0;
  if (!listing && cuda_device_count() == 0) {
    std::string why = cuda_unavailable_reason();
    std::printf("test_cuda: %s; skipping the CUDA suite\n", why.empty() ? "no CUDA device found" : why.c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}

namespace {

const Device kGpu = Device::cuda(0);

// A leaf copy of `t` in `dtype` (floating inputs only) on `device`, requiring grad when `t` does.
Tensor leaf_on(const Tensor& t, Device device, DType dtype) {
  Tensor c = (is_floating(t.dtype()) ? t.to(dtype) : t).to(device).clone().detach();
  if (t.requires_grad()) c.set_requires_grad(true);
  return c;
}

struct Outcome {
  std::vector<double> out;
  std::vector<std::vector<double>> grads;
};

// Runs the case on `device` in `dtype`: the output, and the gradients of sum(out * w) for fixed
// weights w that differ per element (so a permuted gradient cannot pass).
Outcome evaluate(const OpCase& c, Device device, DType dtype) {
  std::vector<Tensor> in;
  for (const Tensor& t : c.inputs) in.push_back(leaf_on(t, device, dtype));
  set_rng_state({4242, 0});
  Tensor out = c.f(in);
  std::vector<double> w(out.numel());
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.7 * static_cast<double>(i) + 0.3);
  Tensor weights = Tensor::from_vector(w, out.shape()).to(out.dtype()).to(device);
  backward(sum(mul(out, weights)));
  Outcome r;
  r.out = out.to_vector<double>();
  for (const Tensor& t : in)
    if (t.requires_grad()) r.grads.push_back(t.grad().defined() ? t.grad().to_vector<double>() : std::vector<double>{});
  return r;
}

struct Tolerance {
  double atol, rtol;
};

// f64 differs from the CPU only by libm-vs-CUDA rounding and summation order; f32 by the same
// at single precision, and bf16 by its 8-bit mantissa.
Tolerance tolerance(DType dtype) {
  switch (dtype) {
    case DType::f64: return {1e-9, 1e-8};
    case DType::f32: return {2e-4, 2e-3};
    default: return {5e-2, 5e-2};
  }
}

// "" when every element is within tolerance, else the worst element.
std::string compare(const std::vector<double>& cpu, const std::vector<double>& gpu, Tolerance tol) {
  if (cpu.size() != gpu.size()) return "size " + std::to_string(cpu.size()) + " vs " + std::to_string(gpu.size());
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    double excess = std::abs(cpu[i] - gpu[i]) - (tol.atol + tol.rtol * std::abs(cpu[i]));
    bool nan_mismatch = std::isnan(cpu[i]) != std::isnan(gpu[i]);
    if (nan_mismatch || excess > worst) {
      worst = nan_mismatch ? INFINITY : excess;
      at = i;
    }
  }
  if (worst <= 0) return "";
  return "element " + std::to_string(at) + ": cpu " + std::to_string(cpu[at]) + ", cuda " + std::to_string(gpu[at]);
}

void check_parity(const OpCase& c, DType dtype) {
  Outcome cpu = evaluate(c, Device::cpu(), dtype), gpu = evaluate(c, kGpu, dtype);
  INFO(c.description << " in " << dtype_name(dtype));
  CHECK(compare(cpu.out, gpu.out, tolerance(dtype)) == "");
  REQUIRE(cpu.grads.size() == gpu.grads.size());
  for (size_t i = 0; i < cpu.grads.size(); ++i) {
    INFO("gradient of input " << i);
    CHECK(compare(cpu.grads[i], gpu.grads[i], tolerance(dtype)) == "");
  }
}

Tensor ids(int64_t n, int64_t vocab, int64_t stride) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = (i * stride + 3) % vocab;
  return Tensor::from_vector(v, {n});
}

// Puts the attention path back to what it was when a test that chose another ends.
struct RestoreAttention {
  CudaAttention was = cuda_attention();
  ~RestoreAttention() { set_cuda_attention(was); }
};

// Puts an on/off setting (get, set) back to what it was when a test that changed it ends.
template <bool (*Get)(), void (*Set)(bool)>
struct RestoreSwitch {
  bool was = Get();
  ~RestoreSwitch() { Set(was); }
};
using RestoreBiasEpilogue = RestoreSwitch<cuda_bias_epilogue, set_cuda_bias_epilogue>;
using RestoreBiasGradEpilogue = RestoreSwitch<cuda_bias_grad_epilogue, set_cuda_bias_grad_epilogue>;

// Sets an environment variable for a scope, then puts back what was there.
struct ScopedEnv {
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* was = std::getenv(name)) was_ = was;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (was_) setenv(name_, was_->c_str(), 1);
    else unsetenv(name_);
  }
  const char* name_;
  std::optional<std::string> was_;
};

// attention(q, k, v) as an op case, and random q, k, v of one shape.
Fn attn(bool causal) {
  return [causal](const std::vector<Tensor>& in) { return attention(in[0], in[1], in[2], causal); };
}
std::vector<Tensor> qkv(const Shape& s) { return {randn64(s), randn64(s), randn64(s)}; }

// Shapes that cross the kernels' tiles, blocks and chunks (the catalogue's cases are tiny).
std::vector<OpCase> large_cases() {
  return {
      {"attention causal T 100 D 64", attn(true), {randn64({1, 2, 100, 64}), randn64({1, 2, 100, 64}), randn64({1, 2, 100, 64})}},
      {"attention T 70 D 128", attn(false), {randn64({2, 1, 70, 128}), randn64({2, 1, 70, 128}), randn64({2, 1, 70, 128})}},
      {"attention causal T 33 D 5", attn(true), {randn64({1, 3, 33, 5}), randn64({1, 3, 33, 5}), randn64({1, 3, 33, 5})}},
      {"layer_norm [600, 300]", [](auto& in) { return layer_norm(in[0], in[1], in[2]); },
       {randn64({600, 300}), randn64({300}), randn64({300})}},
      {"softmax [7, 1000]", [](auto& in) { return softmax(in[0]); }, {randn64({7, 1000})}},
      {"cross_entropy [33, 5000]", [](auto& in) { return cross_entropy(in[0], in[1]); }, {randn64({33, 5000}), ids(33, 5000, 977)}},
      {"sum of 5000 (one block)", [](auto& in) { return sum(in[0]); }, {randn64({5000})}},
      {"sum over rows [300, 200]", [](auto& in) { return sum(in[0], {0}); }, {randn64({300, 200})}},
      {"sum over rows [3000, 1100] (column tiles, 6 row slices)", [](auto& in) { return sum(in[0], {0}); },
       {randn64({3000, 1100})}},
      {"sum over the two leading axes [5, 130, 40]", [](auto& in) { return sum(in[0], {0, 1}); }, {randn64({5, 130, 40})}},
      {"max over rows [2000, 33]", [](auto& in) { return max(in[0], {0}); }, {randn64({2000, 33})}},
      {"linear [2, 300, 40] -> 1100 (a wide bias gradient)", [](auto& in) { return linear(in[0], in[1], in[2]); },
       {randn64({2, 300, 40}), randn64({1100, 40}), randn64({1100})}},
      {"max over the middle axis", [](auto& in) { return max(in[0], {1}); }, {randn64({4, 1500, 3})}},
      {"linear [2, 37, 65] -> 129", [](auto& in) { return linear(in[0], in[1], in[2]); },
       {randn64({2, 37, 65}), randn64({129, 65}), randn64({129})}},
      {"matmul [4, 65, 33] @ [33, 17]", [](auto& in) { return matmul(in[0], in[1]); }, {randn64({4, 65, 33}), randn64({33, 17})}},
      {"conv2d 3x3 [2, 8, 16, 16] -> 16", [](auto& in) { return conv2d(in[0], in[1], in[2], 1, 1); },
       {randn64({2, 8, 16, 16}), randn64({16, 8, 3, 3}), randn64({16})}},
      {"conv2d stride 2", [](auto& in) { return conv2d(in[0], in[1], in[2], 2, 1); },
       {randn64({1, 4, 9, 9}), randn64({6, 4, 3, 3}), randn64({6})}},
      {"group_norm [2, 32, 8, 8] in 8 groups", [](auto& in) { return group_norm(in[0], in[1], in[2], 8); },
       {randn64({2, 32, 8, 8}), randn64({32}), randn64({32})}},
      {"embedding 300 ids of 50", [](auto& in) { return embedding(in[0], in[1]); }, {ids(300, 50, 7), randn64({50, 16})}},
      {"modulate [3, 40, 64]", [](auto& in) { return modulate(in[0], in[1], in[2]); },
       {randn64({3, 40, 64}), randn64({3, 64}), randn64({3, 64})}},
      {"gelu of 100000", [](auto& in) { return gelu(in[0]); }, {randn64({100000})}},
  };
}

}  // namespace

namespace {

GptConfig gpu_gpt() {
  GptConfig c = gpt_config("tiny");
  c.layers = 4;
  c.dropout = 0.1;  // replays must redraw the same masks on the GPU too
  return c;
}

// gpu_gpt with heads of 32, a head dim the tensor-core attention kernels take.
GptConfig gpu_gpt_heads_of_32() {
  GptConfig c = gpu_gpt();
  c.channels = 64;
  c.heads = 2;
  return c;
}

// Every policy's gradients bitwise equal to `plain` (none's), with replays and dropped bytes; the
// model is left without checkpointing.
void check_policies_bitwise(Module& model, const std::function<Tensor()>& loss,
                            const std::vector<std::vector<char>>& plain) {
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3"}) {
    INFO(policy);
    apply_policy(model, parse_policy(policy));
    reset_checkpoint_counters();
    CHECK(run_grads(model.parameters(), loss) == plain);
    CHECK(checkpoint_counters().replays > 0);
    CHECK(checkpoint_counters().bytes_dropped > 0);
  }
  remove_checkpointing(model);
}

// gpt (`config`, with dropout) on the GPU, in f32 and under bf16 autocast: every policy's gradients
// bitwise equal to none's, and `calls`, where given (the counter of the path under test), moving in
// none's run.
void check_gpt_policies_bitwise(const GptConfig& config, const std::function<int64_t()>& calls = {}) {
  Gpt model(config);
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7), {2, 16}).to(kGpu), targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  for (bool bf16 : {false, true}) {
    INFO((bf16 ? "bf16" : "f32"));
    auto loss = [&] {
      std::optional<AutocastScope> autocast;
      if (bf16) autocast.emplace(DType::bf16);
      return model.loss(idx, targets);
    };
    const int64_t before = calls ? calls() : 0;
    auto plain = run_grads(model.parameters(), loss);
    if (calls) CHECK(calls() > before);
    check_policies_bitwise(model, loss, plain);
  }
}

// gpt with heads of 32 under bf16 autocast on attention path `path`: the path runs, and every
// policy's gradients are bitwise equal to none's.
void check_gpt_attention_path_bitwise(CudaAttention path) {
  set_cuda_attention(path);
  Gpt model(gpu_gpt_heads_of_32());
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7), {2, 16}).to(kGpu), targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  auto loss = [&] {
    AutocastScope autocast(DType::bf16);
    return model.loss(idx, targets);
  };
  const int64_t before = cuda_attention_calls(path);
  auto plain = run_grads(model.parameters(), loss);
  CHECK(cuda_attention_calls(path) > before);
  check_policies_bitwise(model, loss, plain);
}

// linear cases for the cuBLASLt paths: shapes that cross tiles, and x one row into a larger tensor
// (its address 4-byte aligned only, so the algorithm must be chosen for that alignment and not
// reused from the aligned call of the same shape).
std::vector<OpCase> lt_linear_cases() {
  auto lin = [](const std::vector<Tensor>& in) { return linear(in[0], in[1], in[2]); };
  auto offset_lin = [](const std::vector<Tensor>& in) { return linear(slice(in[0], 0, 1, 38), in[1], in[2]); };
  return {
      {"linear [2, 37, 65] -> 129", lin, {randn64({2, 37, 65}), randn64({129, 65}), randn64({129})}},
      {"linear [300, 40] -> 1100", lin, {randn64({300, 40}), randn64({1100, 40}), randn64({1100})}},
      {"linear [37, 65] -> 129", lin, {randn64({37, 65}), randn64({129, 65}), randn64({129})}},
      {"linear [37, 65] -> 129 at an odd offset", offset_lin, {randn64({38, 65}), randn64({129, 65}), randn64({129})}},
      {"linear [5, 8] -> 3", lin, {randn64({5, 8}), randn64({3, 8}), randn64({3})}},
  };
}

}  // namespace

// Cases for the newest kernels come first, so that a short GPU session runs them.

TEST_CASE("autocast's weight copies on cuda: AdamW writes them with a cast's bits, and gpt trains as with casts",
          "[cuda][bf16][optim]") {
  RestoreSwitch<autocast_cache_enabled, set_autocast_cache_enabled> restore;
  auto bytes = [](const Tensor& t) {
    Tensor c = t.to(Device::cpu());
    auto* at = static_cast<const uint8_t*>(c.raw_data());
    return std::vector<uint8_t>(at, at + c.nbytes());
  };
  manual_seed(83);
  // Multi-tensor AdamW over 60 f32 tensors (two chunks; some empty), every other one with a bf16
  // copy to write: the parameters' bits as without copies, each copy a cast of its updated tensor.
  {
    std::vector<Tensor> p_plain, p_copied, m_plain, m_copied, v_plain, v_copied, grads, copies;
    for (int i = 0; i < 60; ++i) {
      const int64_t n = i % 13 == 0 ? 0 : (i * 7919) % 9000 + 1;
      Tensor p = Tensor::randn({n}).to(kGpu);
      p_plain.push_back(p.clone());
      p_copied.push_back(p.clone());
      for (auto* state : {&m_plain, &m_copied, &v_plain, &v_copied})
        state->push_back(Tensor::zeros({n}, DType::f32, kGpu));
      grads.push_back(Tensor::randn({n}).to(kGpu));
      copies.push_back(Tensor::zeros({n}, DType::bf16, kGpu));
    }
    Backend& cuda = backend_for(kGpu);
    for (int64_t step = 1; step <= 2; ++step) {
      std::vector<Backend::AdamWTensors> plain, copied;
      for (size_t i = 0; i < p_plain.size(); ++i) {
        Backend::AdamWStep s{i % 2 ? 1e-3 : 3e-4, 0.9, 0.95, 1e-8, i % 3 ? 0.1 : 0.0, step};
        plain.push_back({&p_plain[i], &grads[i], &m_plain[i], &v_plain[i], s});
        copied.push_back({&p_copied[i], &grads[i], &m_copied[i], &v_copied[i], s, i % 2 ? &copies[i] : nullptr});
      }
      cuda.adamw_update_all(plain);
      cuda.adamw_update_all(copied);
    }
    for (size_t i = 0; i < p_plain.size(); ++i) {
      INFO("tensor " << i << " of " << p_plain[i].numel());
      CHECK(bytes(p_copied[i]) == bytes(p_plain[i]));
      CHECK(bytes(m_copied[i]) == bytes(m_plain[i]));
      if (i % 2) CHECK(bytes(copies[i]) == bytes(cast(p_plain[i], DType::bf16)));
      else CHECK(bytes(copies[i]) == bytes(Tensor::zeros({p_plain[i].numel()}, DType::bf16, kGpu)));
    }
    // A copy of the wrong dtype: an error, and nothing updated, not even the items before it.
    const auto p2 = bytes(p_plain[2]);
    Backend::AdamWStep s{1e-3, 0.9, 0.95, 1e-8, 0.0, 3};
    std::vector<Backend::AdamWTensors> wrong{{&p_plain[2], &grads[2], &m_plain[2], &v_plain[2], s},
                                             {&m_plain[1], &grads[1], &m_copied[1], &v_copied[1], s, &p_plain[1]}};
    CHECK_THROWS_WITH(cuda.adamw_update_all(wrong), Contains("expected an f32 parameter's contiguous bf16 copy"));
    CHECK(bytes(p_plain[2]) == p2);
  }

  // gpt under bf16 autocast, two training steps (dropout, clipping, AdamW) with the copies kept
  // and with a cast at every use: the same losses and parameters, bit for bit; with them, the
  // steps after the first cast no weight (linear's, the tied head's).
  Tensor idx = reshape(ids(2 * 16, 64, 7), {2, 16}).to(kGpu), targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  // Under full checkpointing, so that replays take the copies too.
  {
    auto train = [&](bool keep_copies) {
      set_autocast_cache_enabled(keep_copies);
      manual_seed(84);
      Gpt model(gpu_gpt());
      model.to(kGpu);
      model.train();
      apply_policy(model, parse_policy("full"));
      AdamW optimizer(model.named_parameters(), AdamWOptions{.weight_decay = 0.1});
      const std::vector<Tensor> params = model.parameters();
      set_rng_state({9, 0});
      std::vector<double> losses;
      AutocastCacheStats after_first{};
      for (int step = 0; step < 2; ++step) {
        Tensor loss;
        {
          AutocastScope autocast(DType::bf16);
          loss = model.loss(idx, targets);
        }
        backward(loss);
        clip_grad_norm_(params, 1.0);
        optimizer.step(1e-3);
        optimizer.zero_grad();
        losses.push_back(loss.item());
        if (step == 0) after_first = autocast_cache_stats();
      }
      const AutocastCacheStats end = autocast_cache_stats();
      if (keep_copies) {
        CHECK(end.casts == after_first.casts);
        CHECK(end.hits > after_first.hits);
        CHECK(end.refreshes - after_first.refreshes == after_first.copies);
        CHECK(after_first.copies == 4 * 8 + 1);  // 4 blocks: 4 linears, weight and bias each; the tied head
      }
      std::vector<std::vector<uint8_t>> values;
      for (const Tensor& p : params) values.push_back(bytes(p));
      return std::pair{losses, values};
    };
    const auto with_casts = train(false);
    const auto with_copies = train(true);
    CHECK(with_copies.first == with_casts.first);
    CHECK((with_copies.second == with_casts.second));
  }
}

TEST_CASE("linear's dW and db from one cuBLASLt call (BGRADB) match the cpu, repeat their bits, and keep every policy "
          "bitwise",
          "[cuda][op]") {
  manual_seed(31);
  RestoreBiasGradEpilogue restore;
  for (const OpCase& c : lt_linear_cases()) {
    INFO(c.description);
    set_cuda_bias_grad_epilogue(true);
    const int64_t before = cuda_bias_grad_epilogue_calls();
    Outcome fused = evaluate(c, kGpu, DType::f32), again = evaluate(c, kGpu, DType::f32);
    CHECK(cuda_bias_grad_epilogue_calls() - before == 2);
    CHECK(fused.grads == again.grads);
    set_cuda_bias_grad_epilogue(false);
    Outcome plain = evaluate(c, kGpu, DType::f32), cpu = evaluate(c, Device::cpu(), DType::f32);
    CHECK(cuda_bias_grad_epilogue_calls() - before == 2);
    // Only backward's dW and db change path: the output and dx keep their bits.
    CHECK(fused.out == plain.out);
    REQUIRE(fused.grads.size() == 3);
    CHECK(fused.grads[0] == plain.grads[0]);
    for (size_t i = 1; i < 3; ++i) {
      INFO("gradient of input " << i);
      CHECK(compare(cpu.grads[i], fused.grads[i], tolerance(DType::f32)) == "");
      CHECK(compare(plain.grads[i], fused.grads[i], tolerance(DType::f32)) == "");
    }
  }
  // f64 keeps the GEMM and the reduction.
  set_cuda_bias_grad_epilogue(true);
  const int64_t before = cuda_bias_grad_epilogue_calls();
  check_parity(lt_linear_cases()[0], DType::f64);
  CHECK(cuda_bias_grad_epilogue_calls() == before);
  check_gpt_policies_bitwise(gpu_gpt(), cuda_bias_grad_epilogue_calls);
}
TEST_CASE("the defaults: attention picks mma in bf16 where it applies, the GEMMs in f32, the flash kernel in f64, "
          "gpt tiny on them bitwise under every policy; linear's bias in cuBLASLt's epilogue",
          "[cuda][op][bf16]") {
  manual_seed(53);
  if (std::getenv("REMAT_CUDA_ATTENTION") == nullptr) CHECK(cuda_attention() == CudaAttention::automatic);
  if (std::getenv("REMAT_CUDA_BIAS_EPILOGUE") == nullptr) CHECK(cuda_bias_epilogue());
  RestoreAttention restore;
  set_cuda_attention(CudaAttention::automatic);
  struct Expect {
    const char* description;
    Shape shape;
    DType dtype;
    CudaAttention path;
  };
  const std::vector<Expect> expected = {
      {"bf16 D 64", {1, 2, 40, 64}, DType::bf16, CudaAttention::mma},
      {"bf16 D 128", {1, 1, 33, 128}, DType::bf16, CudaAttention::mma},
      {"bf16 D 5 (no mma kernel)", {1, 2, 9, 5}, DType::bf16, CudaAttention::gemm},
      {"f32 D 64", {1, 2, 40, 64}, DType::f32, CudaAttention::gemm},
      {"f64 D 64", {1, 2, 40, 64}, DType::f64, CudaAttention::flash},
  };
  for (const Expect& e : expected) {
    INFO(e.description);
    OpCase c{e.description, attn(true), qkv(e.shape)};
    const int64_t before = cuda_attention_calls(e.path);
    Outcome chosen = evaluate(c, kGpu, e.dtype);
    CHECK(cuda_attention_calls(e.path) - before == 2);  // forward and backward
    // The same result as choosing that path by name.
    set_cuda_attention(e.path);
    Outcome named = evaluate(c, kGpu, e.dtype);
    set_cuda_attention(CudaAttention::automatic);
    CHECK(chosen.out == named.out);
    CHECK(chosen.grads == named.grads);
  }
  // gpt in bf16 with heads of 32 and in f32 under auto: every policy bitwise equal to none.
  Gpt model(gpu_gpt_heads_of_32());
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7), {2, 16}).to(kGpu), targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  for (DType dtype : {DType::bf16, DType::f32}) {
    INFO(dtype_name(dtype));
    auto loss = [&] {
      std::optional<AutocastScope> autocast;
      if (dtype == DType::bf16) autocast.emplace(DType::bf16);
      return model.loss(idx, targets);
    };
    const CudaAttention path = dtype == DType::bf16 ? CudaAttention::mma : CudaAttention::gemm;
    const int64_t before = cuda_attention_calls(path);
    auto plain = run_grads(model.parameters(), loss);
    CHECK(cuda_attention_calls(path) > before);
    check_policies_bitwise(model, loss, plain);
  }
}

TEST_CASE("linear_cross_entropy on cuda: the unfused head's values in f32 and bf16, a chunk's memory, the master "
          "weight's kept copy and f32 dW under autocast, gpt bitwise under every policy",
          "[cuda][op][bf16][fused-loss][memory]") {
  manual_seed(41);
  const int64_t n = 512, v = 2000, c = 16;
  Tensor h0 = Tensor::randn({n, c}).to(kGpu), w0 = Tensor::randn({v, c}).to(kGpu);
  std::vector<int64_t> t = ids(n, v, 43).to_vector<int64_t>();
  t[5] = t[300] = -100;
  Tensor targets = Tensor::from_vector(t, {n}, kGpu);
  struct Run {
    std::vector<float> loss, dh, dw;
    int64_t peak = 0, copies_made = 0, copies_taken = 0;
  };
  // chunk_rows 0: the unfused head (matmul and cross_entropy).
  auto run = [&](int64_t chunk_rows, bool bf16) {
    Tensor h = h0.clone().set_requires_grad(true), w = w0.clone().set_requires_grad(true);
    const int64_t start = memory_stats(kGpu).total.current;
    const AutocastCacheStats cache = autocast_cache_stats();
    reset_peak_memory(kGpu);
    Tensor loss;
    {
      std::optional<AutocastScope> autocast;
      if (bf16) autocast.emplace(DType::bf16);
      loss = chunk_rows > 0 ? linear_cross_entropy(h, w, targets, -100, chunk_rows)
                            : cross_entropy(matmul(h, w, false, true), targets);
    }
    backward(loss);
    Run r{loss.to(DType::f32).to_vector<float>(), h.grad().to_vector<float>(), w.grad().to_vector<float>()};
    r.peak = memory_stats(kGpu).total.peak - start;
    r.copies_made = autocast_cache_stats().casts - cache.casts;
    r.copies_taken = autocast_cache_stats().hits - cache.hits;
    return r;
  };
  for (bool bf16 : {false, true}) {
    INFO((bf16 ? "bf16 autocast" : "f32"));
    Run plain = run(0, bf16), fused = run(64, bf16), again = run(64, bf16);
    CHECK(fused.loss == again.loss);
    CHECK(fused.dh == again.dh);
    CHECK(fused.dw == again.dw);
    // The gradients are about 1e-3 here (a thousandth of a softmax); dW summed over chunks in f32.
    const Tolerance tol = bf16 ? Tolerance{1e-5, 3e-2} : Tolerance{1e-8, 1e-4};
    std::vector<double> a(plain.loss.begin(), plain.loss.end()), b(fused.loss.begin(), fused.loss.end());
    CHECK(compare(a, b, tol) == "");
    a.assign(plain.dh.begin(), plain.dh.end()), b.assign(fused.dh.begin(), fused.dh.end());
    CHECK(compare(a, b, tol) == "");
    a.assign(plain.dw.begin(), plain.dw.end()), b.assign(fused.dw.begin(), fused.dw.end());
    CHECK(compare(a, b, tol) == "");
    // The logits (512 x 2000) never whole: a chunk of 64 rows in their place, its gradient over it.
    const int64_t logits_bytes = n * v * (bf16 ? 2 : 4);
    INFO("logits " << logits_bytes << " bytes; peak: unfused " << plain.peak << ", fused " << fused.peak);
    CHECK(plain.peak >= logits_bytes);
    CHECK(fused.peak < logits_bytes / 3);
    if (bf16) {
      // The f32 weight goes into the node as linear's does: its bf16 copy made once by autocast's
      // cache in forward and taken again in backward (no cast node), as the unfused head's matmul.
      CHECK(plain.copies_made == 1);
      CHECK(plain.copies_taken == 1);
      CHECK(fused.copies_made == 1);
      CHECK(fused.copies_taken == 1);
      // In one chunk dW is the unfused head's GEMM over all rows into f32, the same bits: summed
      // in f32 and not rounded to bf16 (some of its values are no bf16).
      Run whole = run(n, true);
      CHECK(whole.loss == plain.loss);
      CHECK(whole.dw == plain.dw);
      const Tensor dw = Tensor::from_vector(whole.dw, {v, c});
      CHECK(dw.to(DType::bf16).to(DType::f32).to_vector<float>() != whole.dw);
    }
  }
  // gpt with dropout and the fused loss in chunks, f32 and bf16: every policy bitwise equal to none.
  GptConfig config = gpu_gpt();
  config.fused_loss = true;
  config.loss_chunk_rows = 12;
  check_gpt_policies_bitwise(config);
}

TEST_CASE("linear's bias in cuBLASLt's epilogue matches the cpu, repeats its bits, and keeps every policy bitwise",
          "[cuda][op][bf16]") {
  manual_seed(29);
  RestoreBiasEpilogue restore;
  const std::vector<OpCase> cases = lt_linear_cases();
  for (DType dtype : {DType::f32, DType::bf16}) {
    for (const OpCase& c : cases) {
      INFO(c.description << " in " << dtype_name(dtype));
      set_cuda_bias_epilogue(true);
      const int64_t before = cuda_bias_epilogue_calls();
      Outcome lt = evaluate(c, kGpu, dtype), again = evaluate(c, kGpu, dtype);
      CHECK(cuda_bias_epilogue_calls() - before == 2);
      CHECK(lt.out == again.out);
      CHECK(lt.grads == again.grads);
      set_cuda_bias_epilogue(false);
      // The cpu computes f32 only; bf16 is held to the GEMM and bias kernel on the GPU.
      Outcome plain = evaluate(c, kGpu, dtype), cpu = dtype == DType::f32 ? evaluate(c, Device::cpu(), dtype) : plain;
      CHECK(cuda_bias_epilogue_calls() - before == 2);
      CHECK(compare(cpu.out, lt.out, tolerance(dtype)) == "");
      CHECK(compare(plain.out, lt.out, tolerance(dtype)) == "");
      REQUIRE(cpu.grads.size() == lt.grads.size());
      for (size_t i = 0; i < cpu.grads.size(); ++i) {
        INFO("gradient of input " << i);
        CHECK(compare(cpu.grads[i], lt.grads[i], tolerance(dtype)) == "");
      }
    }
  }
  // f64 keeps the GEMM and the bias kernel.
  set_cuda_bias_epilogue(true);
  const int64_t before = cuda_bias_epilogue_calls();
  check_parity(cases[0], DType::f64);
  CHECK(cuda_bias_epilogue_calls() == before);
  check_gpt_policies_bitwise(gpu_gpt(), cuda_bias_epilogue_calls);
}

TEST_CASE("linear and a tied head's matmul under bf16 autocast take their f32 weights: dW and db rounded once, "
          "to f32, and no bf16 weight held until backward",
          "[cuda][op][bf16]") {
  manual_seed(53);
  const int64_t batch = 3, t = 100, in = 96, out = 72, rows = batch * t;
  Tensor x0 = Tensor::randn({batch, t, in}), w0 = Tensor::randn({out, in}), b0 = Tensor::randn({out});
  Tensor dy0 = Tensor::randn({batch, t, out});
  // The bf16 values the products see, exactly.
  const std::vector<float> xb = cast(x0, DType::bf16).to(DType::f32).to_vector<float>();
  const std::vector<float> dyb = cast(dy0, DType::bf16).to(DType::f32).to_vector<float>();
  RestoreBiasGradEpilogue restore;
  // linear(x, W, b) with db from the column reduction, then from dW's GEMM (BGRADB); matmul(x, W^T)
  // as gpt's tied head.
  for (int variant : {0, 1, 2}) {
    const bool head = variant == 2;
    INFO((head ? "matmul(x, W, false, true)" : variant == 1 ? "linear(x, W, b), BGRADB" : "linear(x, W, b)"));
    set_cuda_bias_grad_epilogue(variant == 1);
    const int64_t fused_before = cuda_bias_grad_epilogue_calls();
    Tensor x = x0.to(kGpu), w = w0.to(kGpu).set_requires_grad(true), b = b0.to(kGpu).set_requires_grad(true);
    Tensor dy = cast(dy0.to(kGpu), DType::bf16);
    auto activations = [] { return memory_stats(kGpu)[MemoryCategory::activation].current; };
    const int64_t start = activations();
    Tensor y;
    {
      AutocastScope autocast(DType::bf16);
      y = head ? matmul(x, w, false, true) : linear(x, w, b);
    }
    CHECK(y.dtype() == DType::bf16);
    // Held until backward: y and x's bf16 copy (saved), not a bf16 copy of the weight or the bias.
    CHECK(activations() - start == 2 * rows * (out + in));
    backward(y, dy);
    CHECK(cuda_bias_grad_epilogue_calls() - fused_before == (variant == 1 ? 1 : 0));
    REQUIRE(w.grad().dtype() == DType::f32);
    const std::vector<float> dw = w.grad().to_vector<float>();
    const std::vector<float> db = head ? std::vector<float>() : b.grad().to_vector<float>();
    // Against the sums in double: f32 accumulation over 300 rows is within 1e-5 of them; a result
    // rounded to bf16 on the way (8 bits) would be off by up to 2e-3.
    double worst_w = 0, worst_b = 0;
    for (int64_t o = 0; o < out; ++o) {
      double sb = 0, scale_b = 0;
      for (int64_t r = 0; r < rows; ++r) sb += dyb[r * out + o], scale_b += std::abs(dyb[r * out + o]);
      if (!head) worst_b = std::max(worst_b, std::abs(db[o] - sb) / scale_b);
      for (int64_t i = 0; i < in; ++i) {
        double sw = 0, scale_w = 0;
        for (int64_t r = 0; r < rows; ++r) {
          sw += static_cast<double>(dyb[r * out + o]) * xb[r * in + i];
          scale_w += std::abs(static_cast<double>(dyb[r * out + o]) * xb[r * in + i]);
        }
        worst_w = std::max(worst_w, std::abs(dw[o * in + i] - sw) / scale_w);
      }
    }
    CHECK(worst_w < 1e-5);
    CHECK(worst_b < 1e-5);
  }
}

namespace {

// A leaf on the GPU with src's values in `dtype` (rounded for bf16), aligned (packs of 8) or one
// element into its storage (an elementwise kernel's scalar loop for every value).
Tensor gpu_leaf(const Tensor& src, DType dtype, bool offset) {
  std::vector<float> v = src.to_vector<float>();
  if (offset) v.insert(v.begin(), 0.f);
  Tensor t = cast(Tensor::from_vector(v, {static_cast<int64_t>(v.size())}, kGpu), dtype);
  if (offset) t = slice(t, 0, 1, static_cast<int64_t>(v.size()));
  return reshape(t, src.shape()).detach().set_requires_grad(true);
}

}  // namespace

TEST_CASE("an f32 plus a bf16 tensor under autocast: no cast, the cast's bits, forward and backward", "[cuda][op][bf16]") {
  manual_seed(59);
  const Tensor wide_src = Tensor::randn({8, 125}), narrow_src = Tensor::randn({8, 125}), dy = Tensor::randn({8, 125});
  for (bool offset : {false, true}) {
    for (BinaryFn fn : {BinaryFn::add, BinaryFn::sub}) {
      for (bool narrow_first : {false, true}) {
        INFO((fn == BinaryFn::add ? "add" : "sub") << (narrow_first ? ", bf16 first" : ", f32 first")
                                                   << (offset ? ", one element into storage" : ""));
        auto run = [&](bool autocast_on) {
          Tensor w = gpu_leaf(wide_src, DType::f32, offset), n = gpu_leaf(narrow_src, DType::bf16, offset);
          auto activations = [] { return memory_stats(kGpu)[MemoryCategory::activation]; };
          reset_peak_memory(kGpu);
          const int64_t start = activations().current;
          Tensor y;
          {
            std::optional<AutocastScope> autocast;
            if (autocast_on) autocast.emplace(DType::bf16);
            // Without autocast, the cast by hand: what autocast did before the mixed kernel.
            Tensor nn = autocast_on ? n : cast(n, DType::f32);
            y = fn == BinaryFn::add ? (narrow_first ? add(nn, w) : add(w, nn)) : (narrow_first ? sub(nn, w) : sub(w, nn));
          }
          CHECK(y.dtype() == DType::f32);
          // Under autocast only y is made: no f32 copy of the bf16 operand.
          if (autocast_on) CHECK(activations().peak - start == static_cast<int64_t>(y.nbytes()));
          backward(y, dy.to(kGpu));
          REQUIRE(n.grad().dtype() == DType::bf16);
          return std::vector<std::vector<float>>{y.to_vector<float>(), w.grad().to_vector<float>(),
                                                 n.grad().to(DType::f32).to_vector<float>()};
        };
        CHECK(run(true) == run(false));
      }
    }
  }
}

TEST_CASE("dropout_add on cuda: dropout and then add's bits in one kernel each way, bf16 x with f32 residual too",
          "[cuda][op][bf16]") {
  manual_seed(64);
  const Tensor x_src = Tensor::randn({8, 125}), r_src = Tensor::randn({8, 125}), dy = Tensor::randn({8, 125});
  for (DType x_dtype : {DType::bf16, DType::f32}) {
    for (bool offset : {false, true}) {
      INFO("x in " << dtype_name(x_dtype) << (offset ? ", one element into storage" : ""));
      auto run = [&](bool fused) {
        Tensor x = gpu_leaf(x_src, x_dtype, offset), r = gpu_leaf(r_src, DType::f32, offset), y;
        auto activations = [] { return memory_stats(kGpu)[MemoryCategory::activation]; };
        reset_peak_memory(kGpu);
        const int64_t start = activations().current;
        set_rng_state({43, 9});
        {
          AutocastScope autocast(DType::bf16);
          y = fused ? dropout_add(x, r, 0.3) : add(r, dropout(x, 0.3));
        }
        REQUIRE(y.dtype() == DType::f32);
        // Only y is made: no dropped copy of x.
        if (fused) CHECK(activations().peak - start == static_cast<int64_t>(y.nbytes()));
        backward(y, dy.to(kGpu));
        REQUIRE(x.grad().dtype() == x_dtype);
        return std::vector<std::vector<float>>{y.to_vector<float>(), x.grad().to(DType::f32).to_vector<float>(),
                                               r.grad().to_vector<float>()};
      };
      CHECK(run(true) == run(false));
    }
  }
}

TEST_CASE("layer_norm for a GEMM under autocast writes bf16 and reads a bf16 gradient: the casts' bits, no f32 copy",
          "[cuda][op][bf16]") {
  manual_seed(62);
  // Rows a warp each (40: a partial lane slot; 768: gpt2's) and a block each (1100 channels).
  for (int64_t c : {40, 768, 1100}) {
    INFO(c << " channels");
    const int64_t rows = 37;
    const Tensor x0 = Tensor::randn({rows, c}).to(kGpu), w0 = Tensor::randn({c}).to(kGpu);
    const Tensor b0 = Tensor::randn({c}).to(kGpu);
    const Tensor dy = cast(Tensor::randn({rows, c}).to(kGpu), DType::bf16);
    auto run = [&](AutocastOutput output) {
      Tensor x = x0.clone().set_requires_grad(true), w = w0.clone().set_requires_grad(true);
      Tensor b = b0.clone().set_requires_grad(true), y;
      auto activations = [] { return memory_stats(kGpu)[MemoryCategory::activation]; };
      reset_peak_memory(kGpu);
      const int64_t start = activations().current;
      {
        AutocastScope autocast(DType::bf16);
        y = layer_norm(x, w, b, 1e-5, output);
        // The f32 output, cast as a GEMM's autocast would cast it.
        if (output == AutocastOutput::f32) y = cast(y, DType::bf16);
      }
      REQUIRE(y.dtype() == DType::bf16);
      // y in bf16 and the f32 mean and rstd: no f32 y on the way.
      if (output == AutocastOutput::compute)
        CHECK(activations().peak - start == static_cast<int64_t>(y.nbytes() + 2 * rows * sizeof(float)));
      backward(y, dy);
      return std::vector<std::vector<float>>{y.to(DType::f32).to_vector<float>(), x.grad().to_vector<float>(),
                                             w.grad().to_vector<float>(), b.grad().to_vector<float>()};
    };
    auto fused = run(AutocastOutput::compute), cast_path = run(AutocastOutput::f32);
    const char* names[] = {"y", "dx", "dw", "db"};
    for (size_t i = 0; i < 4; ++i) {
      INFO(names[i]);
      size_t differ = 0;
      for (size_t j = 0; j < fused[i].size(); ++j) differ += fused[i][j] != cast_path[i][j];
      CHECK(differ == 0);
    }
  }
}

TEST_CASE("layer_norm on cuda adds dx into a gradient it alone holds: the engine's bits, no dx or sum made",
          "[cuda][op][bf16]") {
  manual_seed(66);
  // gpt's residual step under bf16 autocast, y = h + dropout(layer_norm(h)) with the norm's output
  // in bf16, at rows a warp each (768 channels) and a block each (1100).
  for (int64_t c : {768, 1100}) {
    INFO(c << " channels");
    const Tensor x0 = Tensor::randn({37, c}).to(kGpu), w = Tensor::randn({c}).to(kGpu), b = Tensor::randn({c}).to(kGpu);
    const Tensor dy = Tensor::randn({37, c}).to(kGpu);
    auto run = [&](bool keep_y_grad) {
      Tensor x = x0.clone().set_requires_grad(true), y;
      set_rng_state({6, 2});
      {
        AutocastScope autocast(DType::bf16);
        Tensor h = mul_scalar(x, 1.0);  // a value of the graph (a leaf's gradient is summed apart)
        y = dropout_add(layer_norm(h, w, b, 1e-5, AutocastOutput::compute), h, 0.2);
      }
      reset_peak_memory(kGpu);
      const int64_t start = memory_stats(kGpu).total.current;
      // Keeping y's gradient (which the residual passes on as it is) leaves the engine to add.
      std::vector<Tensor> g = keep_y_grad ? grad(mul_scalar(y, 1.0), {x, y}, dy) : grad(mul_scalar(y, 1.0), {x}, dy);
      return std::pair{g[0].to_vector<float>(), memory_stats(kGpu).total.peak - start};
    };
    auto [added_in, peak_in] = run(false);
    auto [added_after, peak_after] = run(true);
    CHECK((added_in == added_after));  // not expanded: tens of thousands of values
    // Neither dx nor the engine's sum is made: more than one [rows, c] tensor off the peak (less
    // than two: layer_norm's dw, db and partial sums are alive at one of the peaks, not the other).
    CHECK(peak_after - peak_in > static_cast<int64_t>(x0.nbytes()));
  }
}

namespace {

// Shapes that cross the tensor-core paths' tiles (64 queries, 64 and 32 keys), causal and not, at
// each head dim the mma kernels are built for.
std::vector<OpCase> tile_crossing_attention_cases() {
  return {
      {"causal T 100 D 64", attn(true), qkv({2, 3, 100, 64})},
      {"T 70 D 64", attn(false), qkv({1, 2, 70, 64})},
      {"causal T 130 D 128", attn(true), qkv({1, 2, 130, 128})},
      {"T 33 D 128", attn(false), qkv({2, 1, 33, 128})},
      {"causal T 200 D 32", attn(true), qkv({1, 2, 200, 32})},
  };
}

// `c` in bf16 on attention path `path`, twice: the path runs (two forwards, two backwards), the
// bits repeat, and output and gradients match the flash kernel's within bf16's tolerance.
Outcome check_attention_path(const OpCase& c, CudaAttention path) {
  set_cuda_attention(path);
  const int64_t before = cuda_attention_calls(path);
  Outcome first = evaluate(c, kGpu, DType::bf16), again = evaluate(c, kGpu, DType::bf16);
  CHECK(cuda_attention_calls(path) - before == 4);
  CHECK(first.out == again.out);
  CHECK(first.grads == again.grads);
  set_cuda_attention(CudaAttention::flash);
  Outcome flash = evaluate(c, kGpu, DType::bf16);
  CHECK(compare(flash.out, first.out, tolerance(DType::bf16)) == "");
  REQUIRE(flash.grads.size() == first.grads.size());
  for (size_t i = 0; i < flash.grads.size(); ++i) {
    INFO("gradient of input " << i);
    CHECK(compare(flash.grads[i], first.grads[i], tolerance(DType::bf16)) == "");
  }
  return first;
}

}  // namespace

TEST_CASE("attention on the tensor cores (mma) matches the flash kernel in bf16, repeats its bits, and keeps "
          "every policy bitwise", "[cuda][op][attention][bf16]") {
  manual_seed(23);
  RestoreAttention restore;
  std::vector<OpCase> cases = tile_crossing_attention_cases();
  cases.push_back({"causal T 1 D 64", attn(true), qkv({1, 1, 1, 64})});
  for (const OpCase& c : cases) {
    INFO(c.description);
    Outcome mma = check_attention_path(c, CudaAttention::mma);
    // One row tile a warp in every kernel, or in some (REMAT_CUDA_MMA_TILES): the same bits.
    for (const char* tiles : {"1", "121", "212"}) {
      INFO("REMAT_CUDA_MMA_TILES=" << tiles);
      set_cuda_attention(CudaAttention::mma);
      ScopedEnv env("REMAT_CUDA_MMA_TILES", tiles);
      Outcome other = evaluate(c, kGpu, DType::bf16);
      CHECK(other.out == mma.out);
      CHECK(other.grads == mma.grads);
    }
  }
  // A setting it cannot read is a clear error.
  set_cuda_attention(CudaAttention::mma);
  {
    ScopedEnv env("REMAT_CUDA_MMA_TILES", "3");
    CHECK_THROWS_WITH(evaluate(cases[0], kGpu, DType::bf16),
                      Contains("REMAT_CUDA_MMA_TILES: expected auto, 1, 2") &&
                          Contains("got '3'"));
  }
  // f32 inputs and other head dims take the flash kernel.
  const int64_t flash_before = cuda_attention_calls(CudaAttention::flash);
  evaluate({"T 9 D 5", attn(false), qkv({1, 1, 9, 5})}, kGpu, DType::bf16);
  evaluate({"T 9 D 64 in f32", attn(false), qkv({1, 1, 9, 64})}, kGpu, DType::f32);
  CHECK(cuda_attention_calls(CudaAttention::flash) - flash_before == 4);
  check_gpt_attention_path_bitwise(CudaAttention::mma);
}

TEST_CASE("attention (mma) writes a fused projection's head gradients side by side, with separate heads' bits",
          "[cuda][op][attention][bf16]") {
  // gpt's heads are views of one [B, T, 3C] projection: their gradients go into one such buffer
  // (kernels/attention_layout.h) that split takes back without a copy. Against the same values
  // as contiguous leaves (each gradient its own [B, T, H, D]): the same bits, forward and backward.
  RestoreAttention restore;
  set_cuda_attention(CudaAttention::mma);
  manual_seed(31);
  const int64_t b = 2, t = 40, h = 2, d = 32, c = h * d;
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    Tensor qkv = Tensor::randn({b, t, 3 * c}).to(DType::bf16).to(kGpu).set_requires_grad(true);
    const Tensor upstream = Tensor::randn({b, t, c}).to(DType::bf16).to(kGpu);
    auto to_heads = [&](const Tensor& m) { return permute(reshape(m, {b, t, h, d}), {0, 2, 1, 3}); };
    auto merged = [&](const Tensor& o) { return reshape(permute(o, {0, 2, 1, 3}), {b, t, c}); };
    const int64_t calls = cuda_attention_calls(CudaAttention::mma);
    auto parts = split(qkv, 2, {c, c, c});
    Tensor o = attention(to_heads(parts[0]), to_heads(parts[1]), to_heads(parts[2]), causal);
    backward(sum(mul(merged(o), upstream)));
    std::vector<Tensor> dense;
    for (const Tensor& p : parts) dense.push_back(to_heads(p).as_contiguous().detach().set_requires_grad(true));
    Tensor o2 = attention(dense[0], dense[1], dense[2], causal);
    backward(sum(mul(merged(o2), upstream)));
    CHECK(cuda_attention_calls(CudaAttention::mma) - calls == 4);  // both ran on mma, both ways
    CHECK(o2.to_vector<double>() == o.to_vector<double>());
    for (int64_t i = 0; i < 3; ++i) {
      INFO("gradient " << i << " (q, k, v)");
      Tensor part = qkv.grad().view({b, t, c}, {t * 3 * c, 3 * c, 1}, i * c);
      CHECK(to_heads(part).to_vector<double>() == dense[static_cast<size_t>(i)].grad().to_vector<double>());
    }
  }
}

// [gpu-only]: the emulated GPU has no cuDNN. Built where the build found cuDNN's frontend
// (REMAT_TEST_CUDNN_ATTENTION); elsewhere the path is absent and the case checks the fallback.
TEST_CASE("attention on cuDNN's fused SDPA (cudnn) matches the flash kernel in bf16, repeats its bits, shares the "
          "log-sum-exp of the mma kernels, and keeps every policy bitwise",
          "[cuda][op][attention][bf16][gpu-only]") {
  manual_seed(29);
  RestoreAttention restore;
#ifndef REMAT_TEST_CUDNN_ATTENTION
  WARN("this build has no cuDNN frontend: REMAT_CUDA_ATTENTION=cudnn takes auto's path");
  set_cuda_attention(CudaAttention::cudnn);
  const int64_t mma_before = cuda_attention_calls(CudaAttention::mma);
  evaluate({"causal T 100 D 64", attn(true), qkv({1, 2, 100, 64})}, kGpu, DType::bf16);
  CHECK(cuda_attention_calls(CudaAttention::cudnn) == 0);
  CHECK(cuda_attention_calls(CudaAttention::mma) - mma_before == 2);
#else
  // The heads of a packed [B, T, 3 C] projection, as gpt hands them over (strided views).
  auto packed = [](int64_t heads) -> Fn {
    return [heads](const std::vector<Tensor>& in) {
      const int64_t b = in[0].size(0), t = in[0].size(1), c = in[0].size(2) / 3;
      auto parts = split(in[0], 2, {c, c, c});
      auto to_heads = [&](const Tensor& m) { return permute(reshape(m, {b, t, heads, c / heads}), {0, 2, 1, 3}); };
      return attention(to_heads(parts[0]), to_heads(parts[1]), to_heads(parts[2]), /*causal=*/true);
    };
  };
  std::vector<OpCase> cases = tile_crossing_attention_cases();
  cases.push_back({"causal T 2 D 64", attn(true), qkv({1, 1, 2, 64})});
  cases.push_back({"causal T 96 D 16 (no mma kernel)", attn(true), qkv({1, 2, 96, 16})});
  cases.push_back(
      {"causal heads of a packed [2, 80, 3 x 4 x 64] projection", packed(4), {randn64({2, 80, 768})}});
  for (const OpCase& c : cases) {
    INFO(c.description);
    check_attention_path(c, CudaAttention::cudnn);  // the bits repeat: cuDNN's deterministic backward
  }
  // cuDNN's statistics are the log-sum-exp the other paths keep (the max plus the natural log of
  // the sum of exponentials of the scaled scores), so a backward can take either's.
  {
    Backend& cuda = backend_for(kGpu);
    std::vector<Tensor> in;
    for (const Tensor& t : qkv({1, 2, 77, 64})) in.push_back(t.to(DType::bf16).to(kGpu));
    set_cuda_attention(CudaAttention::cudnn);
    std::vector<Tensor> by_cudnn = cuda.attention(in[0], in[1], in[2], true, 0.125);
    set_cuda_attention(CudaAttention::mma);
    std::vector<Tensor> by_mma = cuda.attention(in[0], in[1], in[2], true, 0.125);
    CHECK(compare(by_mma[1].to_vector<double>(), by_cudnn[1].to_vector<double>(), {1e-3, 1e-3}) == "");
  }
  // f32 inputs and head dims cuDNN's path does not take run where auto would; so does a problem
  // cuDNN declines (a single query and key: no backward kernel), both ways.
  set_cuda_attention(CudaAttention::cudnn);
  const int64_t cudnn_before = cuda_attention_calls(CudaAttention::cudnn);
  const int64_t gemm_before = cuda_attention_calls(CudaAttention::gemm);
  const int64_t mma_before = cuda_attention_calls(CudaAttention::mma);
  evaluate({"T 9 D 5", attn(false), qkv({1, 1, 9, 5})}, kGpu, DType::bf16);
  evaluate({"T 9 D 64 in f32", attn(false), qkv({1, 1, 9, 64})}, kGpu, DType::f32);
  evaluate({"causal T 1 D 64", attn(true), qkv({1, 1, 1, 64})}, kGpu, DType::bf16);
  CHECK(cuda_attention_calls(CudaAttention::cudnn) == cudnn_before);
  CHECK(cuda_attention_calls(CudaAttention::gemm) - gemm_before == 4);
  CHECK(cuda_attention_calls(CudaAttention::mma) - mma_before == 2);
  check_gpt_attention_path_bitwise(CudaAttention::cudnn);
#endif
}

TEST_CASE("strided copies on cuda move words of 16, 8, 4 or 2 bytes as the layout allows: the cpu's bits",
          "[cuda][op][bf16]") {
  manual_seed(59);
  struct Case {
    const char* description;
    DType dtype;
    std::function<Tensor(const Tensor&)> view;  // a strided view of a contiguous [4, 6, 5, 8] tensor
  };
  auto heads = [](const Tensor& x) { return permute(x, {0, 2, 1, 3}); };
  const std::vector<Case> cases = {
      {"bf16 heads, rows of 8 (16-byte words)", DType::bf16, heads},
      {"f32 heads, rows of 8 (16-byte words)", DType::f32, heads},
      {"f64 heads, rows of 8 (16-byte words)", DType::f64, heads},
      {"bf16 heads, rows of 6 (4-byte words)", DType::bf16,
       [&](const Tensor& x) { return heads(slice(x, 3, 0, 6)); }},
      {"bf16 rows of 4 (8-byte words)", DType::bf16, [&](const Tensor& x) { return heads(slice(x, 3, 4, 8)); }},
      {"bf16 rows of 8 one element in (2-byte words)", DType::bf16,
       [](const Tensor& x) { return slice(reshape(x, {4, 6, 40}), 2, 1, 9); }},
      {"bf16 last dim strided (2-byte words)", DType::bf16, [](const Tensor& x) { return transpose(x, 2, 3); }},
      {"bf16 expanded rows (stride 0, 16-byte words)", DType::bf16,
       [](const Tensor& x) { return expand(slice(x, 1, 0, 1), {4, 3, 5, 8}); }},
      {"f32 rows at an offset of 32 bytes (16-byte words)", DType::f32,
       [](const Tensor& x) { return slice(reshape(x, {4, 240}), 1, 8, 128); }},
      {"f32 batches swapped, the last two dims back to back (merged)", DType::f32,
       [](const Tensor& x) { return permute(x, {1, 0, 2, 3}); }},
  };
  Tensor base = Tensor::randn({4, 6, 5, 8});
  for (const Case& c : cases) {
    INFO(c.description);
    Tensor x = cast(base, c.dtype), on_gpu = c.view(x.to(kGpu));
    REQUIRE_FALSE(on_gpu.is_contiguous());
    Tensor want = c.view(x).as_contiguous(), got = on_gpu.as_contiguous().to(Device::cpu());
    REQUIRE(got.shape() == want.shape());
    CHECK(std::memcmp(got.raw_data(), want.raw_data(), want.nbytes()) == 0);
  }
}

TEST_CASE("casts of views on cuda (permuted heads under autocast, an expanded gradient) match the cpu",
          "[cuda][op][bf16]") {
  manual_seed(47);
  Tensor x = Tensor::randn({2, 5, 3, 4});
  Tensor heads = permute(x, {0, 2, 1, 3});  // strided, as attention's heads are
  Tensor on_gpu = permute(x.to(kGpu), {0, 2, 1, 3});
  CHECK(cast(on_gpu, DType::bf16).to(DType::f32).to(Device::cpu()).to_vector<float>() ==
        cast(heads, DType::bf16).to(DType::f32).to_vector<float>());
  // A cast's backward gets sum's gradient, an expanded view of one value.
  Tensor leaf_c = x.clone().detach().set_requires_grad(true), leaf_g = x.to(kGpu).detach().set_requires_grad(true);
  backward(sum(cast(permute(leaf_c, {0, 2, 1, 3}), DType::f64)));
  backward(sum(cast(permute(leaf_g, {0, 2, 1, 3}), DType::f64)));
  CHECK(leaf_g.grad().to_vector<float>() == leaf_c.grad().to_vector<float>());
  CHECK(leaf_g.grad().to_vector<float>() == std::vector<float>(x.numel(), 1.0f));
  // NaN keeps its sign and top payload bits as on the cpu (the hardware's conversion alone gives
  // 0x7fff for every NaN), so bitwise comparisons across devices hold for NaN too.
  uint32_t nan_bits[] = {0x7fc00000u, 0xffc00000u, 0x7f812345u, 0xffbf0001u};
  std::vector<float> nans(4);
  std::memcpy(nans.data(), nan_bits, sizeof nan_bits);
  Tensor n_cpu = Tensor::from_vector(nans, {4});
  Tensor b_cpu = cast(n_cpu, DType::bf16), b_gpu = cast(n_cpu.to(kGpu), DType::bf16).to(Device::cpu());
  CHECK(std::memcmp(b_cpu.raw_data(), b_gpu.raw_data(), 4 * sizeof(uint16_t)) == 0);
}

TEST_CASE("multi-tensor AdamW and clipping on cuda: the per-tensor update's bits, no wait for the GPU",
          "[cuda][optim][large]") {
  manual_seed(43);
  auto bytes = [](const Tensor& t) {
    Tensor c = t.to(Device::cpu());
    auto* at = static_cast<const uint8_t*>(c.raw_data());
    return std::vector<uint8_t>(at, at + c.nbytes());
  };
  // 100 tensors of many sizes (more than two chunks of tensors, some empty), f32 and f64, with two
  // groups' rates; three steps each way from the same start.
  for (DType dtype : {DType::f32, DType::f64}) {
    std::vector<Tensor> p_one, p_all, m_one, m_all, v_one, v_all, grads;
    for (int i = 0; i < 100; ++i) {
      int64_t n = i % 17 == 0 ? 0 : (i * 7919) % 20000 + 1;
      Tensor p = Tensor::randn({n}, dtype).to(kGpu);
      p_one.push_back(p.clone());
      p_all.push_back(p.clone());
      for (auto* state : {&m_one, &m_all, &v_one, &v_all}) state->push_back(Tensor::zeros({n}, dtype, kGpu));
      grads.push_back(Tensor::randn({n}, dtype).to(kGpu));
    }
    Backend& cuda = backend_for(kGpu);
    for (int64_t step = 1; step <= 3; ++step) {
      std::vector<Backend::AdamWTensors> items;
      for (size_t i = 0; i < p_one.size(); ++i) {
        Backend::AdamWStep s{i % 2 ? 1e-3 : 3e-4, 0.9, 0.95, 1e-8, i % 3 ? 0.1 : 0.0, step};
        cuda.adamw_update(p_one[i], grads[i], m_one[i], v_one[i], s);
        items.push_back({&p_all[i], &grads[i], &m_all[i], &v_all[i], s});
      }
      cuda.adamw_update_all(items);
    }
    for (size_t i = 0; i < p_one.size(); ++i) {
      INFO(dtype_name(dtype) << " tensor " << i << " of " << p_one[i].numel());
      CHECK(bytes(p_all[i]) == bytes(p_one[i]));
      CHECK(bytes(m_all[i]) == bytes(m_one[i]));
      CHECK(bytes(v_all[i]) == bytes(v_one[i]));
    }
  }

  // Clipping on the GPU (clip_grad_norm_): clip_grad_norm's norm and scaled gradients, bit for bit,
  // in every dtype and in all three mixed (150 tensors: three launches of a dtype, or more mixed),
  // clipping or not, without a wait for the GPU.
  const std::vector<DType> dtypes = {DType::f32, DType::f64, DType::bf16};
  for (int mix = 0; mix <= 3; ++mix) {
    for (double max_norm : {1.0, 1e4}) {
      std::vector<Tensor> a, b;
      for (int i = 0; i < 150; ++i) {
        const DType dtype = dtypes[static_cast<size_t>(mix < 3 ? mix : i % 3)];
        Tensor g = Tensor::randn({i % 23 == 0 ? 0 : (i * 7919) % 5000 + 1}).to(dtype).to(kGpu);
        a.push_back(Tensor::zeros(g.shape(), dtype, kGpu).set_requires_grad(true));
        b.push_back(Tensor::zeros(g.shape(), dtype, kGpu).set_requires_grad(true));
        a.back().set_grad(g.clone());
        b.back().set_grad(g.clone());
      }
      clip_grad_norm_(b, max_norm);  // allocator warm
      for (size_t i = 0; i < a.size(); ++i) b[i].grad().copy_(a[i].grad());
      double norm = clip_grad_norm(a, max_norm);
      long long before = cuda_host_syncs();
      Tensor lazy = clip_grad_norm_(b, max_norm);
      CHECK(cuda_host_syncs() - before == 0);
      INFO((mix < 3 ? dtype_name(dtypes[static_cast<size_t>(mix)]) : "mixed") << " max_norm " << max_norm << " norm "
                                                                              << norm);
      CHECK(lazy.item() == norm);
      for (size_t i = 0; i < a.size(); ++i) CHECK(bytes(a[i].grad()) == bytes(b[i].grad()));
    }
  }
}

TEST_CASE("indices checked on the GPU: the cpu's results, no wait for the GPU, the error at the next wait",
          "[cuda][index][large]") {
  manual_seed(41);
  // Embedding gradients grouped by id on the GPU (a stable radix sort) sum each row's tokens in
  // position order, as the cpu does: the same bits. One id 1500 times, then ids spread over a
  // GPT-2-sized vocabulary with repeats; both index dtypes.
  const int64_t vocab = 50304, c = 24, n = 5000;
  std::vector<int64_t> many(n);
  for (int64_t i = 0; i < n; ++i) many[i] = i < 1500 ? 7 : (i * 977 + 11) % vocab;
  many[n - 1] = vocab - 1;
  std::vector<int32_t> many32(many.begin(), many.end());
  Tensor w = Tensor::randn({vocab, c}), dy = Tensor::randn({50, 100, c});
  for (const Tensor& idx : {Tensor::from_vector(many, {50, 100}), Tensor::from_vector(many32, {50, 100})}) {
    Tensor wc = w.clone().detach().set_requires_grad(true);
    backward(sum(mul(embedding(idx, wc), dy)));
    Tensor wg = w.to(kGpu).clone().detach().set_requires_grad(true);
    Tensor rows = embedding(idx.to(kGpu), wg);
    backward(sum(mul(rows, dy.to(kGpu))));
    CHECK(rows.to_vector<float>() == embedding(idx, w).to_vector<float>());
    CHECK(wc.grad().to_vector<float>() == wg.grad().to_vector<float>());
  }
  {  // no indices at all: a zero gradient
    Tensor wg = w.to(kGpu).clone().detach().set_requires_grad(true);
    backward(sum(embedding(Tensor::from_vector(std::vector<int64_t>{}, {0}, kGpu), wg)));
    std::vector<float> g = wg.grad().to_vector<float>();
    CHECK(std::all_of(g.begin(), g.end(), [](float x) { return x == 0.0f; }));
  }

  // cross_entropy counts the rows that count on the GPU: ignored rows (int32 targets) give the
  // cpu's loss and gradient; all rows ignored give NaN on both.
  std::vector<int32_t> targets(64);
  for (int i = 0; i < 64; ++i) targets[i] = i % 5 == 0 ? -100 : (i * 37) % 1000;
  Tensor logits = Tensor::randn({64, 1000}, DType::f64);
  for (bool all_ignored : {false, true}) {
    std::vector<int32_t> t = targets;
    if (all_ignored) std::fill(t.begin(), t.end(), -100);
    Tensor lc = logits.clone().detach().set_requires_grad(true), lg = logits.to(kGpu).clone().detach().set_requires_grad(true);
    Tensor loss_c = cross_entropy(lc, Tensor::from_vector(t, {64})), loss_g = cross_entropy(lg, Tensor::from_vector(t, {64}, kGpu));
    double vc = loss_c.item(), vg = loss_g.item();
    if (all_ignored) {
      CHECK(std::isnan(vc));
      CHECK(std::isnan(vg));
      continue;
    }
    CHECK(std::abs(vc - vg) < 1e-12);
    backward(loss_c);
    backward(loss_g);
    std::vector<double> gc = lc.grad().to_vector<double>(), gg = lg.grad().to_vector<double>();
    double worst = 0;
    for (size_t i = 0; i < gc.size(); ++i) worst = std::max(worst, std::abs(gc[i] - gg[i]));
    CHECK(worst < 1e-14);
  }

  // Fills on the GPU are kernels now (no copy from the host): the cpu's bytes in every dtype.
  for (DType dtype : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8}) {
    Tensor on_gpu = Tensor::full({1000}, 3.0, dtype, kGpu).to(Device::cpu());
    Tensor on_cpu = Tensor::full({1000}, 3.0, dtype);
    INFO(dtype_name(dtype));
    CHECK(std::memcmp(on_gpu.raw_data(), on_cpu.raw_data(), on_cpu.nbytes()) == 0);
  }

  // Forward and backward of both ops queue their work without making the host wait (the backward
  // seed included): none of cuda_host_syncs' waits, once the allocator and the fault record exist.
  std::vector<int64_t> few(many.begin(), many.begin() + 1000);
  Tensor ids_g = Tensor::from_vector(few, {1000}, kGpu), targets_g = Tensor::from_vector(few, {1000}, kGpu);
  Tensor table = Tensor::randn({vocab, 8}).to(kGpu).set_requires_grad(true);
  Tensor head = Tensor::randn({8, vocab}).to(kGpu).set_requires_grad(true);
  auto step = [&] {
    table.zero_grad();
    head.zero_grad();
    backward(cross_entropy(matmul(embedding(ids_g, table), head), targets_g));
  };
  step();
  long long before = cuda_host_syncs();
  step();
  // Small tensors from the host (position ids, a batch) are staged and queued, not waited for.
  Tensor positions = Tensor::arange(1000, DType::i64, kGpu);
  Tensor batch = Tensor::from_vector(few, {1000}, kGpu);
  CHECK(cuda_host_syncs() - before == 0);
  cuda_synchronize(0);
  CHECK(cuda_host_syncs() - before == 1);
  CHECK(batch.to_vector<int64_t>() == few);
  CHECK(positions.to_vector<int64_t>() == Tensor::arange(1000, DType::i64).to_vector<int64_t>());
  // Many staged copies behind queued work: each arrives with its own values (a staging block is
  // reused only once its copy has run).
  Tensor big = Tensor::randn({2048, 2048}).to(kGpu);
  Tensor busy = matmul(matmul(big, big), big);
  std::vector<Tensor> copies;
  for (int64_t i = 0; i < 200; ++i) copies.push_back(Tensor::from_vector(std::vector<int64_t>(100, i), {100}, kGpu));
  for (int64_t i = 0; i < 200; ++i) CHECK(copies[i].to_vector<int64_t>() == std::vector<int64_t>(100, i));
}

TEST_CASE("the budget planner times GPU ops with events on the compute stream", "[cuda][planner]") {
  manual_seed(23);
  Tensor a = Tensor::randn({512, 512}).to(kGpu).set_requires_grad(true);
  Tensor y;
  {
    DeviceOpTiming timing;
    y = sum(matmul(a, a));
  }
  auto graph = std::static_pointer_cast<Graph>(y.autograd_meta_ptr()->graph);
  for (const auto& node : graph->nodes) {
    CHECK(node->forward_start_event);
    CHECK(node->forward_end_event);
  }
  // A plan on the GPU: every option's re-run time comes from those events (positive, finite).
  Gpt model(gpu_gpt());
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7).to(DType::i64), {2, 16}).to(kGpu),
         targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  BudgetPlanner planner(model, 0, 50);
  const BudgetPlan& plan = planner.plan([&] { return model.loss(idx, targets); });
  for (const PlannedBlock& b : plan.blocks)
    for (size_t i = 1; i < b.options.size(); ++i) {
      CHECK(b.options[i].recompute_ms > 0);
      CHECK(std::isfinite(b.options[i].recompute_ms));
    }
  // Retimed from a step under the plan only when that step's forward ran under the events: its
  // host times would be the launches'.
  for (Tensor& p : model.parameters()) p.zero_grad();
  Tensor untimed = model.loss(idx, targets);
  backward(untimed);
  CHECK_FALSE(planner.retime(untimed));
  CHECK(planner.wants_retime());
  Tensor timed;
  {
    DeviceOpTiming timing;
    timed = model.loss(idx, targets);
  }
  backward(timed);
  planner.retime(timed);
  CHECK_FALSE(planner.wants_retime());
  CHECK(plan.retimed);
  const std::vector<TapeNode> tape = tape_of(timed);
  for (const PlannedBlock& b : plan.blocks)
    for (size_t i = 1; i < b.options.size(); ++i) {
      double ms = 0;
      for (size_t k = 0; k < b.tape_positions.size(); ++k) {
        const Node& node = *tape[b.tape_positions[k]].graph->nodes[tape[b.tape_positions[k]].index];
        CHECK_FALSE(node.forward_start_event);  // turned into its time
        if (b.options[i].reruns[k]) ms += node.forward_us / 1000.0;
      }
      CHECK(b.options[i].recompute_ms == ms);
      CHECK(b.options[i].recompute_ms > 0);
    }
  remove_checkpointing(model);
}

TEST_CASE("attention through cuBLAS GEMMs matches the cpu and the flash kernel, and repeats its bits",
          "[cuda][op][attention][large]") {
  manual_seed(22);
  RestoreAttention restore;
  const std::vector<OpCase> cases = {
      {"causal T 70 D 64", attn(true), qkv({2, 3, 70, 64})},
      {"T 70 D 64", attn(false), qkv({2, 3, 70, 64})},
      {"causal T 33 D 5", attn(true), qkv({1, 2, 33, 5})},
      {"T 100 D 128", attn(false), qkv({1, 2, 100, 128})},
      {"causal T 1 D 16", attn(true), qkv({1, 1, 1, 16})},
  };
  // Against the cpu (f64, f32) with the gemm path chosen.
  set_cuda_attention(CudaAttention::gemm);
  REQUIRE(cuda_attention() == CudaAttention::gemm);
  for (const OpCase& c : cases)
    for (DType dtype : {DType::f64, DType::f32}) check_parity(c, dtype);
  // Against the flash kernel on the GPU, bf16 included, and the same bits on a second call.
  for (const OpCase& c : cases)
    for (DType dtype : {DType::f64, DType::f32, DType::bf16}) {
      INFO(c.description << " in " << dtype_name(dtype));
      set_cuda_attention(CudaAttention::gemm);
      Outcome gemm = evaluate(c, kGpu, dtype), again = evaluate(c, kGpu, dtype);
      set_cuda_attention(CudaAttention::flash);
      Outcome flash = evaluate(c, kGpu, dtype);
      CHECK(gemm.out == again.out);
      CHECK(gemm.grads == again.grads);
      CHECK(compare(flash.out, gemm.out, tolerance(dtype)) == "");
      REQUIRE(flash.grads.size() == gemm.grads.size());
      for (size_t i = 0; i < flash.grads.size(); ++i) CHECK(compare(flash.grads[i], gemm.grads[i], tolerance(dtype)) == "");
    }
  // Heads in several chunks ([T, T] temporaries of 64 MiB at most: 6 heads of T 1100 in f64 per
  // chunk, so 16 heads take three), against the flash kernel.
  OpCase big{"16 heads of T 1100 D 32, causal", attn(true), qkv({2, 8, 1100, 32})};
  set_cuda_attention(CudaAttention::gemm);
  Outcome gemm = evaluate(big, kGpu, DType::f64);
  set_cuda_attention(CudaAttention::flash);
  Outcome flash = evaluate(big, kGpu, DType::f64);
  CHECK(compare(flash.out, gemm.out, tolerance(DType::f64)) == "");
  for (size_t i = 0; i < flash.grads.size(); ++i) CHECK(compare(flash.grads[i], gemm.grads[i], tolerance(DType::f64)) == "");
  // gpt tiny under checkpointing, on the gemm path: every policy bitwise equal to none.
  set_cuda_attention(CudaAttention::gemm);
  Gpt model(gpu_gpt());
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7).to(DType::i64), {2, 16}).to(kGpu),
         targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  auto loss = [&] { return model.loss(idx, targets); };
  auto plain = run_grads(model.parameters(), loss);
  for (const char* policy : {"full", "ops", "block_skip:2"}) {
    INFO(policy);
    apply_policy(model, parse_policy(policy));
    reset_checkpoint_counters();
    CHECK(run_grads(model.parameters(), loss) == plain);
    CHECK(checkpoint_counters().replays > 0);
  }
  remove_checkpointing(model);
}

TEST_CASE("sums over leading axes by column tiles and row slices: the cpu's values, the same bits every call",
          "[cuda][op][reduce]") {
  manual_seed(21);
  for (DType dtype : {DType::f32, DType::bf16, DType::f64}) {
    INFO(dtype_name(dtype));
    // 8192 rows (16 slices) of 2304 columns (72 tiles): gpt2's widest bias gradient.
    for (Shape shape : {Shape{8192, 2304}, Shape{64, 3}, Shape{511, 33}, Shape{513, 40}, Shape{4, 700, 70}}) {
      INFO(shape_str(shape));
      Tensor x = Tensor::randn(shape, DType::f64);
      std::vector<int64_t> axes(shape.size() - 1);
      for (size_t d = 0; d < axes.size(); ++d) axes[d] = static_cast<int64_t>(d);
      Tensor on_gpu = x.to(dtype).to(kGpu);
      // The reference: the same (rounded) inputs summed in f64 on the cpu.
      std::vector<double> cpu = sum(x.to(dtype).to(DType::f64), axes).to_vector<double>();
      std::vector<double> first = sum(on_gpu, axes).to_vector<double>(), again = sum(on_gpu, axes).to_vector<double>();
      CHECK(first == again);
      const int64_t rows = x.numel() / shape.back();
      // Sums of `rows` N(0,1) values: rounding grows with sqrt(rows); bf16 keeps an 8-bit mantissa.
      const double tol = dtype == DType::f64 ? 1e-10 : dtype == DType::f32 ? 1e-4 * std::sqrt(rows) : 0.1 * std::sqrt(rows);
      double worst = 0;
      for (size_t i = 0; i < cpu.size(); ++i) worst = std::max(worst, std::abs(cpu[i] - first[i]));
      CHECK(worst < tol);
    }
  }
  // Gradient clipping's terms: one read-back per device, the cpu's sums.
  Tensor a = Tensor::randn({3000}, DType::f64), b = Tensor::randn({5, 7}, DType::f32);
  std::vector<double> mixed = sum_squares_by_device({a.to(kGpu), Tensor(), b, b.to(kGpu), a});
  std::vector<double> host = sum_squares_by_device({a, Tensor(), b, b, a});
  REQUIRE(mixed.size() == 5);
  CHECK(mixed[1] == 0.0);
  CHECK(mixed[2] == host[2]);  // the cpu tensors go through the cpu backend
  CHECK(mixed[4] == host[4]);
  CHECK(mixed[0] == Approx(host[0]).epsilon(1e-12));
  CHECK(mixed[3] == Approx(host[3]).epsilon(1e-12));
}

TEST_CASE("every op's forward and backward on cuda match the cpu in f64 and f32", "[cuda][op]") {
  manual_seed(17);
  for (int i = 0; i < kOpCount; ++i) {
    OpKind op = static_cast<OpKind>(i);
    DYNAMIC_SECTION(op_name(op)) {
      std::vector<OpCase> cases = cases_for(op);
      REQUIRE_FALSE(cases.empty());
      for (const OpCase& c : cases)
        for (DType dtype : {DType::f64, DType::f32}) check_parity(c, dtype);
    }
  }
}

TEST_CASE("ops on shapes that cross tiles and blocks match the cpu", "[cuda][op]") {
  manual_seed(18);
  for (const OpCase& c : large_cases())
    for (DType dtype : {DType::f64, DType::f32}) check_parity(c, dtype);
}

TEST_CASE("conv2d through im2col and cuBLAS matches the cpu and repeats its bits", "[cuda][op][conv]") {
  manual_seed(21);
  // The path a build without cuDNN takes, and the one cuDNN's declines fall back to.
  setenv("REMAT_CUDA_CONV", "gemm", 1);
  std::vector<OpCase> cases = {
      {"3x3 pad 1 [2, 8, 16, 16] -> 16", [](auto& in) { return conv2d(in[0], in[1], in[2], 1, 1); },
       {randn64({2, 8, 16, 16}), randn64({16, 8, 3, 3}), randn64({16})}},
      {"3x3 stride 2 pad 1 [1, 4, 9, 9] -> 6", [](auto& in) { return conv2d(in[0], in[1], in[2], 2, 1); },
       {randn64({1, 4, 9, 9}), randn64({6, 4, 3, 3}), randn64({6})}},
      {"1x1 no bias [3, 5, 4, 7] -> 2", [](auto& in) { return conv2d(in[0], in[1], Tensor(), 1, 0); },
       {randn64({3, 5, 4, 7}), randn64({2, 5, 1, 1})}},
      {"2x4 stride 3 pad 2 [2, 3, 10, 11] -> 5", [](auto& in) { return conv2d(in[0], in[1], in[2], 3, 2); },
       {randn64({2, 3, 10, 11}), randn64({5, 3, 2, 4}), randn64({5})}},
  };
  for (const OpCase& c : cases)
    for (DType dtype : {DType::f64, DType::f32}) check_parity(c, dtype);
  Outcome first = evaluate(cases[0], kGpu, DType::f32), second = evaluate(cases[0], kGpu, DType::f32);
  CHECK(first.out == second.out);
  CHECK(first.grads == second.grads);
  unsetenv("REMAT_CUDA_CONV");
}

TEST_CASE("cross_entropy reads bf16 logits into f32: its loss and log-sum-exp in f32, the f32 cast's bits",
          "[cuda][bf16][op]") {
  manual_seed(22);
  Tensor logits = Tensor::randn({64, 1000}).to(DType::bf16).to(kGpu), targets = ids(64, 1000, 37).to(kGpu);
  std::vector<Tensor> out = backend_for(OpKind::cross_entropy, kGpu).cross_entropy(logits, targets, -100);
  CHECK(out[0].dtype() == DType::f32);
  CHECK(out[1].dtype() == DType::f32);
  // The gradient from the bf16 logits against the same logits in f32: only the final rounding differs.
  Tensor lb = logits.clone().detach().set_requires_grad(true), lf = logits.to(DType::f32).clone().detach().set_requires_grad(true);
  backward(cross_entropy(lb, targets));
  backward(cross_entropy(lf, targets));
  std::vector<double> gb = lb.grad().to_vector<double>(), gf = lf.grad().to_vector<double>();
  CHECK(compare(gf, gb, {1e-6, 1e-2}) == "");
  // Under autocast the logits are not cast to f32 (no f32 copy saved for backward), and nothing
  // changes but memory: the loss and the bf16 gradient have the bits of the f32 cast's path (the
  // cast is exact, the f32 arithmetic the same, the gradient rounded to bf16 as the cast's backward
  // rounds it). Ignored rows included.
  std::vector<int64_t> t = ids(64, 1000, 41).to_vector<int64_t>();
  t[3] = t[17] = -100;
  Tensor targets2 = Tensor::from_vector(t, {64}, kGpu);
  Tensor direct = logits.clone().detach().set_requires_grad(true), via_f32 = logits.clone().detach().set_requires_grad(true);
  Tensor loss_direct, loss_via_f32 = cross_entropy(cast(via_f32, DType::f32), targets2);
  const int64_t before = memory_stats(kGpu).total.current;
  {
    AutocastScope autocast(DType::bf16);
    loss_direct = cross_entropy(direct, targets2);
  }
  // What the direct path holds for backward: the f32 log-sum-exp and loss, no f32 logits.
  CHECK(memory_stats(kGpu).total.current - before == 64 * 4 + 4);
  REQUIRE(loss_direct.dtype() == DType::f32);
  CHECK(loss_direct.item() == loss_via_f32.item());
  backward(loss_direct);
  backward(loss_via_f32);
  REQUIRE(direct.grad().dtype() == DType::bf16);
  CHECK(direct.grad().to(DType::f32).to_vector<float>() == via_f32.grad().to(DType::f32).to_vector<float>());
}

TEST_CASE("cross_entropy's gradient takes the place of logits nothing else holds: same bits, the logits off the peak",
          "[cuda][bf16][op][memory]") {
  manual_seed(23);
  Tensor h = Tensor::randn({64, 32}).to(kGpu).set_requires_grad(true);
  Tensor w = Tensor::randn({1000, 32}).to(kGpu).set_requires_grad(true);
  Tensor targets = ids(64, 1000, 37).to(kGpu);
  // The tied-head shape of gpt under autocast: bf16 logits from a GEMM, read by the loss alone
  // unless the caller keeps them.
  auto run = [&](bool caller_keeps_logits, int64_t& backward_peak) {
    h.zero_grad();
    w.zero_grad();
    Tensor kept, loss;
    {
      AutocastScope autocast(DType::bf16);
      Tensor logits = matmul(h, w, false, true);
      if (caller_keeps_logits) kept = logits;
      loss = cross_entropy(logits, targets);
    }
    reset_peak_memory(kGpu);
    const int64_t start = memory_stats(kGpu).total.current;
    backward(loss);
    backward_peak = memory_stats(kGpu).total.peak - start;
    std::vector<float> grads = h.grad().to(Device::cpu()).to_vector<float>();
    for (float x : w.grad().to(Device::cpu()).to_vector<float>()) grads.push_back(x);
    return grads;
  };
  int64_t peak_in_place = 0, peak_kept = 0;
  std::vector<float> in_place = run(false, peak_in_place), beside = run(true, peak_kept);
  CHECK(in_place == beside);
  // Kept logits make the gradient a tensor of its own: 64 x 1000 bf16 more at backward's peak.
  CHECK(peak_kept - peak_in_place >= 64 * 1000 * 2);
  // A graph kept for another backward keeps its logits intact: the second backward's gradients are
  // the first's.
  Tensor loss;
  {
    AutocastScope autocast(DType::bf16);
    loss = cross_entropy(matmul(h, w, false, true), targets);
  }
  auto grads_of = [&](bool retain) {
    h.zero_grad();
    w.zero_grad();
    backward(loss, Tensor(), {.retain_graph = retain});
    std::vector<float> grads = h.grad().to(Device::cpu()).to_vector<float>();
    for (float x : w.grad().to(Device::cpu()).to_vector<float>()) grads.push_back(x);
    return grads;
  };
  std::vector<float> first = grads_of(true);
  CHECK(first == in_place);
  CHECK(grads_of(false) == first);
}

TEST_CASE("TF32 for f32 GEMMs: off by default, near f32 when on, the same bits every call, f32 again when off",
          "[cuda][op][tf32]") {
  manual_seed(31);
  REQUIRE_FALSE(cuda_tf32());
  const int64_t k = 512;
  Tensor a = Tensor::randn({256, k}), b = Tensor::randn({k, 384});
  const std::vector<double> ref = matmul(a.to(DType::f64), b.to(DType::f64)).to_vector<double>();
  Tensor ga = a.to(kGpu), gb = b.to(kGpu);
  auto product = [&] { return matmul(ga, gb).to_vector<float>(); };
  const std::vector<float> strict = product();
  set_cuda_tf32(true);
  const std::vector<float> fast = product(), again = product();
  set_cuda_tf32(false);
  const std::vector<float> strict_again = product();
  auto worst = [&](const std::vector<float>& v) {
    double w = 0;
    for (size_t i = 0; i < v.size(); ++i) w = std::max(w, std::abs(static_cast<double>(v[i]) - ref[i]));
    return w;
  };
  CHECK(fast == again);
  CHECK(strict_again == strict);
  CHECK(fast != strict);  // TF32 kernels ran
  // Sums of 512 products of N(0, 1) values (about 23 in size): f32 errs by about 1e-5 of that, TF32
  // (10-bit mantissas in the products) by about 1e-3.
  INFO("f32 error " << worst(strict) << ", TF32 error " << worst(fast));
  CHECK(worst(strict) < 1e-3);
  CHECK(worst(fast) < 0.2);
  CHECK(worst(fast) > worst(strict));
}

// [gpu-only]: 16.7 million rows are two billion emulated threads, beyond the emulated GPU.
TEST_CASE("group_norm on an empty batch and layer_norm backward past the grid's y extent match the cpu",
          "[cuda][op][large][gpu-only]") {
  manual_seed(23);
  OpCase empty{"group_norm [0, 4, 3, 3]", [](auto& in) { return group_norm(in[0], in[1], in[2], 2); },
               {randn64({0, 4, 3, 3}), randn64({4}), randn64({4})}};
  check_parity(empty, DType::f32);
  // Past 65535 * kRowChunk (64) rows one chunk of kRowChunk rows per grid row runs out and the
  // chunks grow (here to 257 rows); past 65535 * 256 a grid of 256-row chunks would too.
  const int64_t rows = 65535 * 256 + 1000;
  OpCase tall{"layer_norm [16778960, 2]", [](auto& in) { return layer_norm(in[0], in[1], in[2]); },
              {randn64({rows, 2}), randn64({2}), randn64({2})}};
  check_parity(tall, DType::f64);
}

TEST_CASE("a prefetched copy dropped before use does not write into memory allocated after it", "[cuda][offload][large]") {
  manual_seed(24);
  const Shape shape{16, 1024, 1024};  // 64 MiB: the copy back takes a few milliseconds
  for (int round = 0; round < 5; ++round) {
    Graph graph;
    int64_t value;
    {
      Tensor saved = Tensor::full(shape, 3.0, DType::f32, kGpu);
      value = graph.add_value(saved, -1, 0, false);
      graph.hold(value, saved);
    }
    REQUIRE(graph.offload(value) > 0);  // only the host copy holds the value now
    cuda_synchronize(0);
    graph.prefetch(value);  // the copy back to a new device block starts on the copy stream ...
    graph.release(value);   // ... and its destination is dropped before the copy is waited for
    Tensor fresh = Tensor::full(shape, 7.0, DType::f32, kGpu);  // the caching allocator's next block
    cuda_synchronize(0);
    std::vector<float> v = fresh.to_vector<float>();
    INFO("round " << round);
    CHECK(std::count(v.begin(), v.end(), 7.0f) == static_cast<std::ptrdiff_t>(v.size()));
    cuda_poll_copies();
  }
}

TEST_CASE("dropout masks, embedding rows and their gradients are exact across devices", "[cuda][op]") {
  manual_seed(19);
  Tensor x = Tensor::randn({1000, 37});
  set_rng_state({77, 5});
  Tensor on_cpu = dropout(x, 0.3);
  set_rng_state({77, 5});
  Tensor on_gpu = dropout(x.to(kGpu), 0.3);
  CHECK(on_cpu.to_vector<float>() == on_gpu.to_vector<float>());  // same mask, same scaling: the same bits

  Tensor idx = ids(300, 50, 7), w = Tensor::randn({50, 16});
  Tensor wg = w.to(kGpu).clone().detach().set_requires_grad(true), wc = w.clone().detach().set_requires_grad(true);
  Tensor dy = Tensor::randn({300, 16});
  Tensor ec = embedding(idx, wc);
  std::vector<float> rows_cpu = ec.to_vector<float>();
  backward(sum(mul(ec, dy)));  // one tape per backward: the GPU forward is recorded after this one
  Tensor eg = embedding(idx.to(kGpu), wg);
  CHECK(rows_cpu == eg.to_vector<float>());
  backward(sum(mul(eg, dy.to(kGpu))));
  // Each row sums its tokens in position order on both devices; the products dy * 1 are exact.
  CHECK(wc.grad().to_vector<float>() == wg.grad().to_vector<float>());
}

TEST_CASE("bad input on cuda gets the same clear errors as on the cpu", "[cuda][errors]") {
  // Indices are checked on the GPU and a bad one reported at the next wait for it (with
  // REMAT_CUDA_INDEX_CHECK=host, at the op): here the copy of the result, or a synchronisation.
  Tensor w = Tensor::randn({5, 4}).to(kGpu);
  CHECK_THROWS_WITH(embedding(Tensor::from_vector(std::vector<int64_t>{1, 7}, {2}, kGpu), w).to_vector<float>(),
                    Contains("embedding: expected indices in [0, 5), got 7 at position 1"));
  // The record is cleared: the next call works, and a bad index found in backward names backward.
  CHECK(embedding(Tensor::from_vector(std::vector<int64_t>{4, 0}, {2}, kGpu), w).to_vector<float>() ==
        embedding(Tensor::from_vector(std::vector<int64_t>{4, 0}, {2}), w.to(Device::cpu())).to_vector<float>());
  Tensor dy = Tensor::ones({2, 4}).to(kGpu);
  CHECK_THROWS_WITH(
      [&] {
        Backend& cuda = backend_for(OpKind::embedding, kGpu);
        cuda.embedding_backward(dy, Tensor::from_vector(std::vector<int64_t>{-1, 2}, {2}, kGpu), 5);
        cuda_synchronize(0);
      }(),
      Contains("expected indices in [0, 5), got -1 at position 0"));
  Tensor logits = Tensor::randn({2, 3}).to(kGpu);
  CHECK_THROWS_WITH(
      [&] {
        cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{0, 3}, {2}, kGpu));
        cuda_synchronize(0);
      }(),
      Contains("cross_entropy: expected targets in [0, 3) or ignore_index -100, got 3 at row 1"));
  CHECK(std::isfinite(cross_entropy(logits, Tensor::from_vector(std::vector<int64_t>{0, 2}, {2}, kGpu)).item()));
  Tensor q = Tensor::randn({1, 1, 4, 129}).to(kGpu);
  set_cuda_attention(CudaAttention::flash);  // the GEMM path takes any head dim
  CHECK_THROWS_WITH(attention(q, q, q, true), Contains("head dims 1..128, got 129"));
  CHECK_THROWS_WITH(add(Tensor::ones({2}), Tensor::ones({2}).to(kGpu)), Contains("cuda"));
}

TEST_CASE("gpt tiny gradients on cuda under every policy are bitwise equal to none", "[cuda][policy]") {
  manual_seed(31);
  Gpt model(gpu_gpt());
  model.to(kGpu);
  model.train();
  Tensor idx = ids(2 * 16, 64, 7).to(DType::i64), targets = ids(2 * 16, 64, 5);
  idx = reshape(idx, {2, 16}).to(kGpu), targets = reshape(targets, {2, 16}).to(kGpu);
  auto loss = [&] { return model.loss(idx, targets); };
  auto plain = run_grads(model.parameters(), loss);
  for (const auto& g : plain) CHECK_FALSE(g.empty());
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3", "sac:matmul,attention", "sqrt", "revolve:1"}) {
    INFO(policy);
    apply_policy(model, parse_policy(policy));
    reset_checkpoint_counters();
    CHECK(run_grads(model.parameters(), loss) == plain);
    CHECK(checkpoint_counters().replays > 0);
  }
  // Budgets from the planner's floor to the no-checkpoint peak, as it measures them here.
  BudgetPlanner probe(model, 0, 100);
  for (Tensor& p : model.parameters()) p.zero_grad();
  set_rng_state({1234, 0});
  BudgetPlan range = probe.plan(loss);
  for (double f : {0.0, 0.4, 0.8}) {
    int64_t budget = range.floor_bytes + static_cast<int64_t>(f * static_cast<double>(range.none_peak_bytes - range.floor_bytes));
    INFO("budget " << budget << " bytes");
    BudgetPlanner planner(model, budget);
    for (Tensor& p : model.parameters()) p.zero_grad();
    set_rng_state({1234, 0});
    INFO(planner.plan(loss).to_string());
    CHECK(run_grads(model.parameters(), loss) == plain);
  }
  remove_checkpointing(model);
}

TEST_CASE("gpt tiny in bf16 on cuda: f32 master gradients near f32, bitwise under every policy", "[cuda][bf16][policy]") {
  manual_seed(34);
  Gpt model(gpu_gpt());
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7), {2, 16}).to(kGpu), targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  auto loss_f32 = [&] { return model.loss(idx, targets); };
  auto loss_bf16 = [&] {
    AutocastScope autocast(DType::bf16);
    return model.loss(idx, targets);
  };
  set_rng_state({5, 0});
  double l32 = loss_f32().item();
  set_rng_state({5, 0});
  Tensor l16 = loss_bf16();
  CHECK(l16.dtype() == DType::f32);  // the loss runs in f32
  CHECK(l16.item() == Approx(l32).epsilon(0.02));
  auto mixed = run_grads(model.parameters(), loss_bf16);
  for (const Tensor& p : model.parameters()) CHECK(p.grad().dtype() == DType::f32);
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3", "sqrt"}) {
    INFO(policy);
    apply_policy(model, parse_policy(policy));
    CHECK(run_grads(model.parameters(), loss_bf16) == mixed);
  }
  remove_checkpointing(model);

  // Rounding to bf16 is round-to-nearest-even on both devices.
  Tensor x = Tensor::randn({4096});
  CHECK(x.to(DType::bf16).to_vector<float>() == cast(x.to(kGpu), DType::bf16).to_vector<float>());
}

TEST_CASE("offload on cuda moves saved outputs to host memory: gradients bitwise, device peak lower", "[cuda][offload]") {
  manual_seed(35);
  Gpt model(gpu_gpt());
  model.to(kGpu);
  model.train();
  Tensor idx = reshape(ids(2 * 16, 64, 7), {2, 16}).to(kGpu), targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  auto loss = [&] { return model.loss(idx, targets); };
  auto plain = run_grads(model.parameters(), loss);
  // Linears' outputs saved (on the GPU, or offloaded to the host), everything else recomputed.
  auto activation_peak = [&](Decision linears) {
    CheckpointOptions o;
    o.policy = {"linears", [linears](const PolicyContext& ctx) {
                  return ctx.kind == OpKind::linear ? linears : Decision::prefer_recompute;
                }};
    checkpoint(model, o);
    reset_checkpoint_counters();
    reset_peak_memory(kGpu);
    int64_t base = memory_stats(kGpu)[MemoryCategory::activation].current;
    CHECK(run_grads(model.parameters(), loss) == plain);
    int64_t peak = memory_stats(kGpu)[MemoryCategory::activation].peak - base;
    remove_checkpointing(model);
    return peak;
  };
  int64_t kept = activation_peak(Decision::prefer_save);
  CHECK(checkpoint_counters().bytes_offloaded == 0);
  int64_t offloaded = activation_peak(Decision::prefer_offload);
  CHECK(checkpoint_counters().bytes_offloaded > 0);
  INFO("activation peak: " << kept << " bytes kept on the GPU, " << offloaded << " offloaded");
  CHECK(offloaded < kept);
}

namespace {

// gpt tiny on the GPU for the budget planner's offload cases: its step, the gradients without
// checkpointing, a plan with offload set as given, and a step's activation peak (gradients checked).
struct OffloadPlanning {
  Gpt model{gpu_gpt()};
  Tensor idx = reshape(ids(2 * 16, 64, 7).to(DType::i64), {2, 16}).to(kGpu),
         targets = reshape(ids(2 * 16, 64, 5), {2, 16}).to(kGpu);
  std::function<Tensor()> loss = [this] { return model.loss(idx, targets); };
  std::vector<std::vector<char>> plain;
  OffloadPlanning() {
    model.to(kGpu);
    model.train();
    plain = run_grads(model.parameters(), loss);
  }
  const BudgetPlan& plan(BudgetPlanner& planner, OffloadSettings offload) {
    for (Tensor& p : model.parameters()) p.zero_grad();
    set_rng_state({1234, 0});
    planner.set_offload(offload);
    return planner.plan(loss);
  }
  int64_t step_peak() {
    reset_checkpoint_counters();
    reset_peak_memory(kGpu);
    int64_t base = memory_stats(kGpu)[MemoryCategory::activation].current;
    CHECK(run_grads(model.parameters(), loss) == plain);
    return memory_stats(kGpu)[MemoryCategory::activation].peak - base;
  }
};

}  // namespace

TEST_CASE("the budget planner offloads on cuda when the transfer hides: bitwise, the peak within its prediction",
          "[cuda][planner][offload]") {
  manual_seed(37);
  OffloadPlanning g;
  BudgetPlanner recompute_only(g.model, 0, 50);
  const BudgetPlan without = g.plan(recompute_only, {false, 0});
  CHECK(without.offload_gbps == 0);
  for (const PlannedBlock& b : without.blocks)
    for (const BlockOption& o : b.options) CHECK(o.offload.empty());
  // A bandwidth no transfer outruns: an offload costs only the views its replay re-runs.
  BudgetPlanner fast(g.model, 0, 50);
  const BudgetPlan& plan = g.plan(fast, {true, 1e6});
  INFO(plan.to_string());
  CHECK(plan.offload_gbps == 1e6);
  CHECK(plan.floor_bytes <= without.floor_bytes);
  CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
  CHECK(plan.predicted_recompute_ms + plan.predicted_transfer_ms <= without.predicted_recompute_ms);
  size_t offloading = 0;
  for (const PlannedBlock& b : plan.blocks)
    for (const BlockOption& o : b.options) {
      offloading += !o.offload.empty();
      CHECK((o.offload.empty() || (o.offloaded_bytes > 0 && o.transfer_ms == 0)));
      for (size_t k = 0; k < o.offload.size(); ++k) CHECK_FALSE((o.offload[k] && o.recompute[k]));
    }
  CHECK(offloading >= plan.blocks.size());
  CHECK(g.step_peak() <= plan.predicted_peak_bytes);
  CHECK(checkpoint_counters().bytes_offloaded == plan.predicted_offloaded_bytes);
  // Down to the floor with offload: still within the prediction.
  BudgetPlanner lowest(g.model, plan.floor_bytes);
  const BudgetPlan& floor_plan = g.plan(lowest, {true, 1e6});
  INFO(floor_plan.to_string());
  CHECK(floor_plan.predicted_peak_bytes <= floor_plan.budget_bytes);
  CHECK(g.step_peak() <= floor_plan.predicted_peak_bytes);
  CHECK(checkpoint_counters().bytes_offloaded == floor_plan.predicted_offloaded_bytes);
  // At a bandwidth where every transfer shows, the budget recomputes instead, as without offload.
  BudgetPlanner slow(g.model, 0, 50);
  const BudgetPlan& slow_plan = g.plan(slow, {true, 1e-3});
  INFO(slow_plan.to_string());
  CHECK(slow_plan.predicted_offloaded_bytes == 0);
  CHECK(g.step_peak() <= slow_plan.predicted_peak_bytes);
  CHECK(checkpoint_counters().bytes_offloaded == 0);
  CHECK(checkpoint_counters().replays > 0);
  remove_checkpointing(g.model);
}

TEST_CASE("every offloading option of the first and the last block measures at most its simulated peak on cuda",
          "[cuda][planner][offload][large]") {
  manual_seed(37);
  OffloadPlanning g;
  BudgetPlanner planner(g.model, 0, 50);
  const BudgetPlan& plan = g.plan(planner, {true, 1e6});
  // Each placed by hand, the other blocks kept: the step's gradients, what it moved, and its peak
  // against the simulation's.
  size_t placed = 0;
  for (size_t j : {size_t{0}, plan.blocks.size() - 1}) {
    const std::vector<BlockOption> options = plan.blocks[j].options;
    for (size_t i = 1; i < options.size(); ++i) {
      if (options[i].offload.empty()) continue;
      INFO(plan.blocks[j].name << ": " << options[i].name);
      std::vector<int> choice(plan.blocks.size(), 0);
      choice[j] = static_cast<int>(i);
      const int64_t predicted = planner.place(choice).predicted_peak_bytes;
      const int64_t measured = g.step_peak();
      CHECK(checkpoint_counters().bytes_offloaded == options[i].offloaded_bytes);
      CHECK(measured <= predicted);
      ++placed;
    }
  }
  CHECK(placed >= 4);
  remove_checkpointing(g.model);
}

TEST_CASE("every offloading option of dit's first block measures at most its simulated peak on cuda",
          "[cuda][planner][offload][diffusion][large]") {
  manual_seed(32);
  DitConfig dc = dit_config("tiny");
  dc.ada_zero = false;
  Dit dit(dc);
  dit.to(kGpu);
  ShapesTask data(8, 3);
  auto [x0, labels] = data.batch(3);
  x0 = x0.to(kGpu), labels = labels.to(kGpu);
  std::function<Tensor()> loss = [&] {
    set_rng_state({99, 0});
    return rectified_flow_loss([&](const Tensor& x, const Tensor& t, const Tensor& y) { return dit.forward(x, t, y); },
                               x0, labels);
  };
  auto plain = run_grads(dit.parameters(), loss);
  BudgetPlanner planner(dit, 0, 50);
  planner.set_offload({true, 1e6});
  for (Tensor& p : dit.parameters()) p.zero_grad();
  const BudgetPlan& plan = planner.plan(loss);
  const std::vector<BlockOption> options = plan.blocks[0].options;
  size_t placed = 0;
  for (size_t i = 1; i < options.size(); ++i) {
    if (options[i].offload.empty()) continue;
    INFO(plan.blocks[0].name << ": " << options[i].name);
    std::vector<int> choice(plan.blocks.size(), 0);
    choice[0] = static_cast<int>(i);
    const int64_t predicted = planner.place(choice).predicted_peak_bytes;
    reset_checkpoint_counters();
    reset_peak_memory(kGpu);
    const int64_t base = memory_stats(kGpu)[MemoryCategory::activation].current;
    CHECK(run_grads(dit.parameters(), loss) == plain);
    CHECK(memory_stats(kGpu)[MemoryCategory::activation].peak - base <= predicted);
    CHECK(checkpoint_counters().bytes_offloaded == options[i].offloaded_bytes);
    ++placed;
  }
  CHECK(placed >= 4);
  remove_checkpointing(dit);
}

TEST_CASE("dit and unet tiny gradients on cuda under their policies are bitwise equal to none", "[cuda][policy][diffusion]") {
  manual_seed(32);
  DitConfig dc = dit_config("tiny");
  dc.ada_zero = false;
  Dit dit(dc);
  Unet unet(unet_config("tiny"));
  dit.to(kGpu);
  unet.to(kGpu);
  ShapesTask data(8, 3);
  auto [x0, labels] = data.batch(3);
  x0 = x0.to(kGpu), labels = labels.to(kGpu);
  auto flow = [&](auto& model) {
    return [&model, x0, labels] {
      set_rng_state({99, 0});
      return rectified_flow_loss([&](const Tensor& x, const Tensor& t, const Tensor& y) { return model.forward(x, t, y); },
                                 x0, labels);
    };
  };
  auto dit_loss = flow(dit);
  auto dit_plain = run_grads(dit.parameters(), dit_loss);
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3", "level:5", "sqrt", "revolve:1"}) {
    INFO("dit " << policy);
    apply_policy(dit, parse_policy(policy));
    CHECK(run_grads(dit.parameters(), dit_loss) == dit_plain);
  }
  auto unet_loss = flow(unet);
  auto unet_plain = run_grads(unet.parameters(), unet_loss);
  for (const char* policy : {"level:1", "level:2", "level:3", "level:4", "level:5"}) {
    INFO("unet " << policy);
    apply_policy(unet, parse_policy(policy));
    CHECK(run_grads(unet.parameters(), unet_loss) == unet_plain);
  }
  // The budget planner at its floor with offload free to choose (a bandwidth no transfer outruns):
  // the same bits, the bytes it plans to move moved, the peak within its prediction.
  auto budgets = [](Module& model, const std::function<Tensor()>& loss, const std::vector<std::vector<char>>& plain) {
    auto plan_at = [&](BudgetPlanner& planner) -> const BudgetPlan& {
      for (Tensor& p : model.parameters()) p.zero_grad();
      planner.set_offload({true, 1e6});
      return planner.plan(loss);
    };
    BudgetPlanner half(model, 0, 50);
    BudgetPlanner lowest(model, plan_at(half).floor_bytes);
    {
      const BudgetPlan& plan = plan_at(lowest);
      INFO(model.type_name() << ": " << plan.to_string());
      reset_checkpoint_counters();
      reset_peak_memory(kGpu);
      const int64_t base = memory_stats(kGpu)[MemoryCategory::activation].current;
      CHECK(run_grads(model.parameters(), loss) == plain);
      CHECK(memory_stats(kGpu)[MemoryCategory::activation].peak - base <= plan.predicted_peak_bytes);
      CHECK(checkpoint_counters().bytes_offloaded == plan.predicted_offloaded_bytes);
      CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
    }
    remove_checkpointing(model);
  };
  budgets(dit, dit_loss, dit_plain);
  budgets(unet, unet_loss, unet_plain);
}

TEST_CASE("the caching allocator counts requested bytes exactly and reuses its segments", "[cuda][memory]") {
  Allocator& alloc = allocator_for(kGpu);
  {
    Tensor warm = Tensor::empty({1000}, DType::f32, kGpu);  // the first segment
  }
  reset_peak_memory(kGpu);
  MemoryStats before = memory_stats(kGpu);
  int64_t segments = cuda_segment_count(0);
  {
    Tensor a = Tensor::empty({1000}, DType::f32, kGpu);  // 4000 B
    Tensor b = Tensor::empty({750}, DType::f32, kGpu);   // 3000 B
    MemoryStats during = alloc.stats();
    CHECK(during.total.current - before.total.current == 7000);
    CHECK(during.total.allocated - before.total.allocated == 7000);
    CHECK(during.reserved >= during.total.current);
    CHECK(cuda_segment_count(0) == segments);  // both fit in the cached small segment
  }
  MemoryStats after = memory_stats(kGpu);
  CHECK(after.total.current == before.total.current);
  CHECK(after.total.peak - before.total.current == 7000);
  CHECK(after.total.freed - before.total.freed == 7000);
  // A large block comes back from the cache the second time: no new segment.
  { Tensor big = Tensor::empty({16 << 20}, DType::u8, kGpu); }
  int64_t with_big = cuda_segment_count(0);
  { Tensor again = Tensor::empty({16 << 20}, DType::u8, kGpu); }
  CHECK(cuda_segment_count(0) == with_big);
  // Emptying the cache hands the free 16 MiB segment back to the driver.
  int64_t reserved_before = memory_stats(kGpu).reserved;
  cuda_empty_cache(0);
  CHECK(memory_stats(kGpu).reserved <= reserved_before - (16 << 20));
  CHECK(cuda_segment_count(0) < with_big);
}

TEST_CASE("out of memory on cuda reports requested, allocated, reserved and peak bytes", "[cuda][memory][errors]") {
  Tensor live = Tensor::empty({1 << 20}, DType::f32, kGpu);
  CHECK_THROWS_WITH(Tensor::empty({int64_t(1) << 50}, DType::u8, kGpu),
                    Contains("out of memory on cuda:0: requested 1125899906842624 bytes") && Contains("allocated ") &&
                        Contains("reserved ") && Contains("peak "));
  // The allocator is still usable afterwards.
  Tensor after = Tensor::ones({10}, DType::f32, kGpu);
  CHECK(after.to_vector<float>() == std::vector<float>(10, 1.0f));
}

TEST_CASE("moving a model to cuda moves every parameter in place", "[cuda][module]") {
  manual_seed(33);
  Gpt model(gpt_config("tiny"));
  std::vector<float> first = model.parameters().front().to_vector<float>();
  model.to(kGpu);
  for (const Tensor& p : model.parameters()) CHECK(p.device() == kGpu);
  CHECK(model.parameters().front().to_vector<float>() == first);
  model.to(Device::cpu());
  CHECK(model.parameters().front().device().is_cpu());
}

TEST_CASE("gpt tiny trains on cuda and follows the cpu run", "[cuda][train][large]") {
  TrainOptions o;
  o.config = "tiny";
  o.overrides["batch"] = 16;
  o.overrides["dropout"] = 0;
  o.steps = 30;
  o.lr = 3e-3;
  o.warmup = 5;
  o.policy = "full";
  TrainResult cpu = train(o);
  o.device = "cuda:0";
  TrainResult gpu = train(o);
  REQUIRE(gpu.steps.size() == 30);
  CHECK(gpu.steps.back().loss < gpu.steps.front().loss - 0.5);
  // Same weights, data and schedule: the trajectories differ only by rounding.
  for (size_t i = 0; i < 5; ++i) CHECK(gpu.steps[i].loss == Approx(cpu.steps[i].loss).epsilon(1e-3));
}

TEST_CASE("NCCL on one rank: collectives of CUDA tensors, and data parallel gradients on cuda equal backward's",
          "[cuda][nccl]") {
  // One process (no launcher): the world is one rank, and CUDA tensors still go through NCCL when
  // it loads, so this runs NCCL's communicator, all-gather and broadcast and the device-side sum.
  // On the emulated GPU, NCCL is the module's own one-rank stand-in (tests/fake_nccl.cpp): the real
  // library would drive a GPU that is not there.
  if (std::getenv("REMAT_CUDA_MODULE") && !std::getenv("REMAT_NCCL_LIBRARY")) {
    WARN("skipped: REMAT_CUDA_MODULE without REMAT_NCCL_LIBRARY (set both to the emulated module)");
    return;
  }
  dist::ProcessGroup& world = dist::ProcessGroup::world();
  REQUIRE(world.size() == 1);
  INFO(dist::nccl_problem());
  REQUIRE(dist::nccl_built());
  REQUIRE(dist::nccl_problem().empty());
  manual_seed(12);
  Tensor host = Tensor::randn({1000});
  Tensor a = host.to(kGpu);
  world.all_reduce_sum(a);
  CHECK(a.to_vector<float>() == host.to_vector<float>());
  world.broadcast(a, 0);
  CHECK(a.to_vector<float>() == host.to_vector<float>());
  Tensor gathered = world.all_gather(a);
  CHECK(gathered.shape() == Shape{1, 1000});
  CHECK(gathered.device() == kGpu);
  CHECK(gathered.to_vector<float>() == host.to_vector<float>());
  Tensor ints = Tensor::zeros({4}, DType::i64).to(kGpu);
  CHECK_THROWS_WITH(world.all_reduce_sum(ints), Contains("all_reduce: expected f32 or f64"));

  // DataParallel on cuda: buckets packed, summed and averaged on the device; one rank's mean is
  // its own gradient, bit for bit (the mean multiplies by exactly 1).
  GptConfig c = gpt_config("tiny");
  c.dropout = 0;
  Gpt model(c);
  model.to(kGpu);
  AdditionTask data(c.vocab, 5);
  auto [x, y] = data.batch(4, c.seq_len);
  x = x.to(kGpu), y = y.to(kGpu);
  backward(model.loss(x, y));
  std::vector<std::vector<float>> plain;
  for (Tensor& p : model.parameters()) {
    plain.push_back(p.grad().as_contiguous().to_vector<float>());
    p.zero_grad();
  }
  dist::DataParallel dp(model.named_parameters(), world, /*bucket_bytes=*/int64_t{1} << 16);
  REQUIRE(dp.buckets() > 1);
  dp.backward(model.loss(x, y));
  size_t i = 0;
  for (Tensor& p : model.parameters()) {
    CHECK(p.grad().device() == kGpu);
    CHECK(p.grad().as_contiguous().to_vector<float>() == plain[i++]);
  }
}
