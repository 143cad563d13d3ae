// `remat-bench ops`: GEMM throughput at a few sizes and per-op forward/backward times.
#include "bench_ops.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "remat.h"
#include "models/gpt.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention_heads.h"
#include "kernels/cpu/gemm.h"
#include "runtime/cuda_backend.h"

namespace remat::bench {

namespace {

// Median wall time of `repeats` runs after one warm-up, in seconds. On a GPU each run waits for
// its kernels, so the time is the device's, not the launch's.
double median_seconds(Device device, int repeats, const std::function<void()>& body) {
  auto run = [&] {
    body();
    if (device.is_cuda()) cuda_synchronize(device.index);
  };
  run();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    auto start = std::chrono::steady_clock::now();
    run();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Every CPU GEMM library of this build at 1024^3 and at gpt small's linear shapes, interleaved
// (three rounds, the median of each library's round medians), so that the automatic choice can be
// checked here.
void compare_cpu_gemms(int repeats, nlohmann::json& rows) {
  const std::vector<std::string> libraries = cpu::gemm_libraries();  // the chosen one first
  const std::string& chosen = libraries.front();
  fmt::print("{:<10} {:>22}", "cpu gemm", "shape (M x K x N)");
  for (const std::string& library : libraries) fmt::print(" {:>10}", library);
  fmt::print("   (chosen: {})\n", chosen);
  struct Shape3 {
    int64_t m, k, n;
  };
  for (Shape3 g : {Shape3{1024, 1024, 1024}, {1024, 256, 768}, {1024, 256, 1024}, {1024, 1024, 256}}) {
    Tensor a = Tensor::randn({g.m, g.k}), b = Tensor::randn({g.k, g.n});
    std::map<std::string, std::vector<double>> seconds;
    for (int round = 0; round < 3; ++round)
      for (const std::string& library : libraries) {
        cpu::set_gemm_library(library);
        seconds[library].push_back(median_seconds(Device::cpu(), repeats, [&] { matmul(a, b); }));
      }
    const double flops = 2.0 * g.m * g.k * g.n;
    nlohmann::json row = {{"op", "cpu gemm libraries"}, {"m", g.m}, {"k", g.k}, {"n", g.n}, {"chosen", chosen}};
    fmt::print("{:<10} {:>22}", "matmul", fmt::format("{} x {} x {}", g.m, g.k, g.n));
    for (const std::string& library : libraries) {
      std::vector<double>& s = seconds[library];
      std::sort(s.begin(), s.end());
      const double gflops = flops / s[s.size() / 2] / 1e9;
      fmt::print(" {:>10.1f}", gflops);
      row[library + "_gflops"] = gflops;
    }
    fmt::print("   GFLOP/s\n");
    rows.push_back(row);
  }
  cpu::set_gemm_library(chosen);
}

// The attention paths `remat-bench ops` times on cuda (--attention names them by label).
struct AttentionVariant {
  CudaAttention path;
  const char* tiles;  // REMAT_CUDA_MMA_TILES for the mma kernels
  const char* label;
};
constexpr AttentionVariant kAttentionVariants[] = {{CudaAttention::mma, "2", "mma"},
                                                   {CudaAttention::mma, "1", "mma-1tile"},
                                                   {CudaAttention::gemm, "2", "gemm"},
                                                   {CudaAttention::cudnn, "2", "cudnn"}};

// Attention at gpt2's shape (B 8, H 12, T 1024, D 64, causal) in bf16 on each tensor-core path,
// forward and backward apart: the kernels' own speed, which a step's profile mixes with its
// copies; the mma kernels with two row tiles a warp (the default at this head dim) and with one
// (REMAT_CUDA_MMA_TILES, attention_mma.cu), for a GPU to say which is faster, and cuDNN's fused
// attention (its deterministic backward), where the build has it. TFLOP/s counts what
// FlashAttention's papers count: the causal half of two T x T x D products per head forward, five
// backward (2.5x; remat's backward runs seven, recomputing the scores and dP in both of its
// kernels).
void time_cuda_attention(Device device, int repeats, const std::vector<std::string>& chosen, nlohmann::json& rows) {
  const int64_t b = 8, h = 12, t = 1024, d = 64;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const double forward_flops = 4.0 * b * h * t * t * d / 2, backward_flops = 2.5 * forward_flops;
  auto input = [&] { return cast(Tensor::randn({b, h, t, d}).to(device), DType::bf16); };
  const Tensor q = input(), k = input(), v = input(), d_o = input();
  Backend& backend = backend_for(device);
  const CudaAttention before = cuda_attention();
  const char* tiles_env = std::getenv("REMAT_CUDA_MMA_TILES");
  const std::optional<std::string> tiles_before = tiles_env ? std::optional<std::string>(tiles_env) : std::nullopt;
  for (const AttentionVariant& variant : kAttentionVariants) try {
    if (!chosen.empty() && std::find(chosen.begin(), chosen.end(), variant.label) == chosen.end()) continue;
    set_cuda_attention(variant.path);
    setenv("REMAT_CUDA_MMA_TILES", variant.tiles, 1);
    const int64_t calls = cuda_attention_calls(variant.path);
    std::vector<Tensor> out = backend.attention(q, k, v, true, scale);
    // A path that does not take the problem hands it to another: not this path's time.
    if (cuda_attention_calls(variant.path) == calls)
      throw std::runtime_error("another path ran (this build lacks it, or it declined the problem: see stderr)");
    const double forward = median_seconds(device, repeats, [&] { backend.attention(q, k, v, true, scale); });
    const double backward = median_seconds(device, repeats, [&] {
      backend.attention_backward(d_o, q, k, v, out[0], out[1], true, scale);
    });
    for (const auto& [phase, seconds, flops] :
         {std::tuple{"forward", forward, forward_flops}, std::tuple{"backward", backward, backward_flops}}) {
      const std::string name = fmt::format("attention {} {} [{},{},{},{}] bf16 causal", variant.label, phase, b, h, t, d);
      fmt::print("{:<56} {:>8.3f} ms {:>7.1f} TFLOP/s\n", name, seconds * 1e3, flops / seconds / 1e12);
      rows.push_back({{"op", name}, {"median_ms", seconds * 1e3}, {"tflops", flops / seconds / 1e12}});
    }
  } catch (const std::exception& e) {  // the other paths and the JSON still come out
    fmt::print("attention {}: failed: {}\n", variant.label, e.what());
    rows.push_back({{"op", fmt::format("attention {}", variant.label)}, {"error", e.what()}});
  }
  set_cuda_attention(before);
  if (tiles_before) setenv("REMAT_CUDA_MMA_TILES", tiles_before->c_str(), 1);
  else unsetenv("REMAT_CUDA_MMA_TILES");
}

}  // namespace

std::vector<std::string> attention_variants() {
  std::vector<std::string> names;
  for (const AttentionVariant& variant : kAttentionVariants) names.push_back(variant.label);
  names.push_back("none");
  return names;
}

int run_ops(const OpsOptions& options) {
  Device device = parse_device(options.device);
  NoGradGuard no_grad;
  manual_seed(0);
  nlohmann::json rows = nlohmann::json::array();
  fmt::print("remat-bench ops on {} ({} threads{})\n", device.str(), omp_get_max_threads(),
             device.is_cpu() ? ", GEMM " + cpu::gemm_library() + ", attention " + cpu::attention_path()
                             : std::string());
  fmt::print("{:<10} {:>22} {:>12} {:>10}\n", "op", "shape (M x K x N)", "median ms", "GFLOP/s");
  struct Gemm {
    int64_t m, k, n;
  };
  std::vector<Gemm> sizes = {{256, 256, 256}, {512, 512, 512}, {1024, 1024, 1024}, {1024, 768, 3072}};
  if (device.is_cuda()) sizes.push_back({4096, 4096, 4096});  // large enough to fill a GPU
  for (Gemm g : sizes) {
    Tensor a = Tensor::randn({g.m, g.k}).to(device), b = Tensor::randn({g.k, g.n}).to(device);
    Tensor w = Tensor::randn({g.n, g.k}).to(device), bias = Tensor::randn({g.n}).to(device);
    double flops = 2.0 * g.m * g.k * g.n;
    for (const char* op : {"matmul", "linear"}) {
      bool is_matmul = std::string(op) == "matmul";
      double s = median_seconds(device, options.repeats, [&] { is_matmul ? matmul(a, b) : linear(a, w, bias); });
      std::string shape = fmt::format("{} x {} x {}", g.m, g.k, g.n);
      fmt::print("{:<10} {:>22} {:>12.3f} {:>10.1f}\n", op, shape, s * 1e3, flops / s / 1e9);
      rows.push_back({{"op", op}, {"m", g.m}, {"k", g.k}, {"n", g.n}, {"median_ms", s * 1e3}, {"gflops", flops / s / 1e9}});
    }
  }
  if (device.is_cpu() && cpu::gemm_libraries().size() > 1) compare_cpu_gemms(options.repeats, rows);
  // Fused ops at GPT-small sizes (B 8, T 128, C 256, H 8).
  Tensor x = Tensor::randn({8 * 128, 256}).to(device);
  Tensor gamma = Tensor::ones({256}).to(device), beta = Tensor::zeros({256}).to(device);
  Tensor q = Tensor::randn({8, 8, 128, 32}).to(device);
  Tensor logits = Tensor::randn({8 * 128, 256}).to(device);
  Tensor targets = Tensor::zeros({8 * 128}, DType::i64).to(device);
  Tensor hidden = Tensor::randn({8 * 128, 1024}).to(device);  // the MLP's inner width
  Tensor heads = Tensor::randn({8, 128, 8, 32}).to(device);   // [B, T, H, D] before the head split
  // unet small's widest convolution: 16 images of 32 x 32, 96 -> 32 channels, 3x3 "same".
  Tensor images = Tensor::randn({16, 96, 32, 32}).to(device), kernel = Tensor::randn({32, 96, 3, 3}).to(device);
  Tensor conv_bias = Tensor::randn({32}).to(device), conv_dy = Tensor::randn({16, 32, 32, 32}).to(device);
  Backend& backend = backend_for(device);
  // AdamW over gpt small's parameters (76 tensors, 4.8 M values): one call per tensor against one
  // multi-tensor call (on a GPU, a launch per tensor against a few).
  std::vector<Tensor> ps, gs, ms, vs;
  for (const Tensor& p : Gpt(gpt_config("small")).parameters()) {
    ps.push_back(Tensor::zeros(p.shape(), DType::f32, device));
    gs.push_back(Tensor::ones(p.shape(), DType::f32, device));
    ms.push_back(Tensor::zeros(p.shape(), DType::f32, device));
    vs.push_back(Tensor::zeros(p.shape(), DType::f32, device));
  }
  const Backend::AdamWStep adamw_step{1e-4, 0.9, 0.95, 1e-8, 0.1, 1};
  std::vector<Backend::AdamWTensors> adamw_items;
  for (size_t i = 0; i < ps.size(); ++i) adamw_items.push_back({&ps[i], &gs[i], &ms[i], &vs[i], adamw_step});
  const std::string adamw_name = fmt::format("adamw {} tensors, ", ps.size());
  const double attention_scale = 1 / std::sqrt(32.0);
  const std::vector<Tensor> attention_out = backend.attention(q, q, q, true, attention_scale);
  std::vector<std::pair<std::string, std::function<void()>>> fused = {
      {"layer_norm [1024,256]", [&] { layer_norm(x, gamma, beta); }},
      {"softmax [1024,256]", [&] { softmax(x); }},
      {"gelu [1024,1024]", [&] { gelu(hidden); }},
      {"gelu backward [1024,1024]", [&] { backend.unary_backward(UnaryFn::gelu, hidden, hidden, Tensor(), 0.0); }},
      {"silu [1024,1024]", [&] { silu(hidden); }},
      {"transpose copy [8,128,8,32]", [&] { transpose(heads, 1, 2).as_contiguous(); }},
      {"attention causal [8,8,128,32]", [&] { attention(q, q, q, true); }},
      {"attention backward causal [8,8,128,32]", [&] {
         backend.attention_backward(q, q, q, q, attention_out[0], attention_out[1], true, attention_scale);
       }},
      {"cross_entropy [1024,256]", [&] { cross_entropy(logits, targets); }},
      {"conv2d 3x3 [16,96,32,32] -> 32", [&] { conv2d(images, kernel, conv_bias, 1, 1); }},
      {"conv2d backward 3x3 [16,96,32,32] -> 32",
       [&] { backend.conv2d_backward(conv_dy, images, kernel, 1, 1, true); }},
      {adamw_name + "one call each", [&] {
         for (auto& t : adamw_items) backend.adamw_update(*t.param, *t.grad, *t.m, *t.v, t.step);
       }},
      {adamw_name + "multi-tensor", [&] { backend.adamw_update_all(adamw_items); }},
  };
  for (auto& [name, body] : fused) {
    double s = median_seconds(device, options.repeats, body);
    fmt::print("{:<40} {:>12.3f} ms\n", name, s * 1e3);
    rows.push_back({{"op", name}, {"median_ms", s * 1e3}});
  }
  if (device.is_cuda()) time_cuda_attention(device, options.repeats, options.attention, rows);
  if (!options.json_path.empty()) {
    std::string tmp = options.json_path + ".tmp";
    std::ofstream(tmp) << nlohmann::json{{"device", device.str()}, {"threads", omp_get_max_threads()}, {"rows", rows}}.dump(2);
    std::rename(tmp.c_str(), options.json_path.c_str());
  }
  return 0;
}

}  // namespace remat::bench
