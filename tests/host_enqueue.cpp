// How long the host takes to queue gpt training steps for a GPU, measured on the emulated GPU, where
// no kernel runs until the host waits: remat's own host cost per step (autograd, checkpointing, the
// caching allocator, launch setup), which the GPU's time per step must exceed for the GPU and not
// the host to set the pace; and the caching allocator's peaks per step, which the same code reaches
// on a real GPU (allocation sizes do not depend on the kernels having run). Exits without running
// the queued work (hours under emulation).
//   REMAT_CUDA_MODULE=$PWD/build/tests/libremat_cuda_emulated.so build/tests/host_enqueue
//     [config gpt2] [policies none,full,ops,block_skip:2] [dtype bf16] [batch 8] [layers 12] [fused]
// (`fused`: the head and loss as linear_cross_entropy, GptConfig::fused_loss). With
// REMAT_HOST_ENQUEUE_KERNELS=1 it also lists each policy's last step's launches per kernel (names
// by addr2line from the module's symbol table).
#include <dlfcn.h>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint/apply.h"
#include "models/gpt.h"
#include "models/optim.h"
#include "remat.h"

using namespace remat;

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream list(s);
  for (std::string item; std::getline(list, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// The emulated runtime's count of kernels and library calls queued (tests/fake_cuda_runtime.cpp).
using LaunchCount = long long (*)();
LaunchCount launch_counter() {
  const char* module = std::getenv("REMAT_CUDA_MODULE");
  void* handle = module ? dlopen(module, RTLD_NOW | RTLD_NOLOAD) : nullptr;
  return handle ? reinterpret_cast<LaunchCount>(dlsym(handle, "fake_cuda_launches")) : nullptr;
}

// Launches per kernel so far (fake_cuda_launches_by_kernel in tests/fake_cuda_runtime.cpp).
using KernelCounts = std::map<const void*, long long>;
KernelCounts launches_by_kernel() {
  using Visit = void (*)(const void*, long long, void*);
  using ByKernel = void (*)(Visit, void*);
  void* handle = dlopen(std::getenv("REMAT_CUDA_MODULE"), RTLD_NOW | RTLD_NOLOAD);
  auto by_kernel = handle ? reinterpret_cast<ByKernel>(dlsym(handle, "fake_cuda_launches_by_kernel")) : nullptr;
  KernelCounts counts;
  if (by_kernel != nullptr)
    by_kernel([](const void* kernel, long long n, void* out) { (*static_cast<KernelCounts*>(out))[kernel] = n; },
              &counts);
  return counts;
}

// Prints the launches between two tallies, most first, each kernel named by addr2line.
void print_kernel_launches(const KernelCounts& before, const KernelCounts& after) {
  std::vector<std::pair<long long, const void*>> rows;
  for (const auto& [kernel, n] : after) {
    auto it = before.find(kernel);
    long long delta = n - (it == before.end() ? 0 : it->second);
    if (delta > 0) rows.emplace_back(delta, kernel);
  }
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  Dl_info info{};
  if (rows.empty() || dladdr(rows.front().second, &info) == 0) return;
  std::string command = fmt::format("addr2line -f -C -e '{}'", info.dli_fname);
  for (const auto& [n, kernel] : rows)
    command += fmt::format(" {:#x}", reinterpret_cast<uintptr_t>(kernel) - reinterpret_cast<uintptr_t>(info.dli_fbase));
  std::vector<std::string> names;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char line[4096];
    // addr2line prints two lines an address: the function, then its file and line.
    for (int i = 0; std::fgets(line, sizeof line, pipe) != nullptr; ++i)
      if (i % 2 == 0) names.emplace_back(line, std::strcspn(line, "\n"));
    pclose(pipe);
  }
  for (size_t i = 0; i < rows.size(); ++i)
    fmt::print("  {:6} {}\n", rows[i].first, i < names.size() ? names[i].substr(0, 160) : "?");
}

int run(int argc, char** argv) {
  const std::string config = argc > 1 ? argv[1] : "gpt2";
  const std::vector<std::string> policies = split(argc > 2 ? argv[2] : "none,full,ops,block_skip:2");
  const std::string dtype = argc > 3 ? argv[3] : "bf16";
  REMAT_CHECK(dtype == "bf16" || dtype == "f32", "host_enqueue: expected dtype bf16 or f32, got '", dtype, "'");
  REMAT_CHECK(cuda_device_count() > 0, "host_enqueue: no CUDA device (", cuda_unavailable_reason(),
              "); run it with REMAT_CUDA_MODULE=build/tests/libremat_cuda_emulated.so");
  const LaunchCount launches = launch_counter();
  REMAT_CHECK(launches != nullptr, "host_enqueue: REMAT_CUDA_MODULE is not the emulated CUDA part: no launch count");

  GptConfig c = gpt_config(config);
  if (argc > 4) c.batch = std::stoll(argv[4]);
  if (argc > 5) c.layers = std::stoll(argv[5]);
  if (argc > 6) {
    REMAT_CHECK(std::string(argv[6]) == "fused", "host_enqueue: expected 'fused' as the 6th argument, got '", argv[6], "'");
    c.fused_loss = true;
  }
  manual_seed(1);
  Gpt model(c);
  const Device gpu = Device::cuda(0);
  model.to(gpu);
  model.train();
  std::vector<int64_t> tokens(static_cast<size_t>(c.batch * c.seq_len));
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int64_t>((i * 7919 + 13) % c.vocab);
  Tensor x = Tensor::from_vector(tokens, {c.batch, c.seq_len}).to(gpu);
  for (int64_t& t : tokens) t = (t + 1) % c.vocab;
  Tensor y = Tensor::from_vector(tokens, {c.batch, c.seq_len}).to(gpu);
  AdamW optimizer(model.named_parameters(), AdamWOptions{.weight_decay = 0.1});
  const std::vector<Tensor> params = model.parameters();

  fmt::print("host_enqueue: gpt {} (B {}, T {}, C {}, layers {}), {}; each step: forward, backward, clipping, "
             "AdamW, queued on the emulated GPU and never run\n",
             config, c.batch, c.seq_len, c.channels, c.layers, dtype);
  fmt::print("| policy | step | host ms | launches | us per launch | host waits | peak MiB | activation peak MiB |\n"
             "|---|---|---|---|---|---|---|---|\n");
  const bool per_kernel = std::getenv("REMAT_HOST_ENQUEUE_KERNELS") != nullptr;
  long long later_waits = 0;  // after each policy's first step, which may set things up
  for (const std::string& policy : policies) {
    remove_checkpointing(model);
    if (policy != "none") apply_policy(model, parse_policy(policy));
    for (int step = 0; step < 3; ++step) {
      const long long launches_before = launches(), waits_before = cuda_host_syncs();
      const KernelCounts kernels_before = per_kernel ? launches_by_kernel() : KernelCounts{};
      reset_peak_memory(gpu);
      const auto start = std::chrono::steady_clock::now();
      {
        std::optional<AutocastScope> autocast;
        if (dtype == "bf16") autocast.emplace(DType::bf16);
        Tensor loss = model.loss(x, y);
        autocast.reset();
        backward(loss);
      }
      clip_grad_norm_(params, 1.0);
      optimizer.step(1e-4);
      optimizer.zero_grad();
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      const long long n = launches() - launches_before, waits = cuda_host_syncs() - waits_before;
      if (step > 0) later_waits += waits;
      const MemoryStats memory = memory_stats(gpu);
      constexpr double kMiB = 1024.0 * 1024.0;
      fmt::print("| {} | {} | {:.1f} | {} | {:.1f} | {} | {:.1f} | {:.1f} |\n", policy, step, ms, n,
                 n > 0 ? 1000 * ms / n : 0.0, waits, memory.total.peak / kMiB,
                 memory[MemoryCategory::activation].peak / kMiB);
      if (per_kernel && step == 2) print_kernel_launches(kernels_before, launches_by_kernel());
      std::fflush(stdout);
    }
  }
  // A training step queues its work and returns: the host waits only where the program reads a
  // value (the loss, when it logs it).
  if (later_waits > 0) {
    fmt::print("host_enqueue: the host waited for the GPU {} time(s) after the first steps\n", later_waits);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int rc = 2;
  try {
    rc = run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "host_enqueue: %s\n", e.what());
  }
  std::fflush(nullptr);
  _exit(rc);  // the queued work stays unrun: running it is the emulator's hours, not the host's cost
}
