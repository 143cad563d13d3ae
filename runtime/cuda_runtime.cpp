// The runtime's CUDA functions, answered by the CUDA part's table (runtime/cuda/module.h says where
// that part comes from), or with zero devices and a clear error on use where there is none.
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

#include "runtime/cuda/module.h"
#include "runtime/cuda/runtime_api.h"
#include "runtime/cuda_backend.h"
#include "runtime/cuda_devices.h"
#include "runtime/env_switch.h"
#include "runtime/error.h"

namespace remat {

namespace {

const CudaRuntimeApi* api() {
  static const auto* table = static_cast<const CudaRuntimeApi*>(cuda_part_entry("runtime"));
  return table;
}

// The table, or an error that starts with what was asked for and says why there is no CUDA.
const CudaRuntimeApi& require(const std::string& what) {
  REMAT_CHECK(api() != nullptr, what, ", but ", cuda_part_problem());
  return *api();
}

std::string device_str(int index) { return "cuda:" + std::to_string(index); }

std::atomic<bool> g_cuda_tf32{false};

}  // namespace

void set_cuda_tf32(bool enabled) { g_cuda_tf32.store(enabled, std::memory_order_relaxed); }
bool cuda_tf32() { return g_cuda_tf32.load(std::memory_order_relaxed); }

namespace {

EnvSwitch g_cuda_bias_epilogue{"REMAT_CUDA_BIAS_EPILOGUE", true};
EnvSwitch g_cuda_bias_grad_epilogue{"REMAT_CUDA_BIAS_GRAD_EPILOGUE", false};
std::atomic<int64_t> g_cuda_bias_epilogue_calls{0}, g_cuda_bias_grad_epilogue_calls{0};

}  // namespace

void set_cuda_bias_epilogue(bool enabled) { g_cuda_bias_epilogue.set(enabled); }
bool cuda_bias_epilogue() { return g_cuda_bias_epilogue.get(); }
void count_cuda_bias_epilogue_call() { g_cuda_bias_epilogue_calls.fetch_add(1, std::memory_order_relaxed); }
int64_t cuda_bias_epilogue_calls() { return g_cuda_bias_epilogue_calls.load(std::memory_order_relaxed); }

void set_cuda_bias_grad_epilogue(bool enabled) { g_cuda_bias_grad_epilogue.set(enabled); }
bool cuda_bias_grad_epilogue() { return g_cuda_bias_grad_epilogue.get(); }
void count_cuda_bias_grad_epilogue_call() {
  g_cuda_bias_grad_epilogue_calls.fetch_add(1, std::memory_order_relaxed);
}
int64_t cuda_bias_grad_epilogue_calls() { return g_cuda_bias_grad_epilogue_calls.load(std::memory_order_relaxed); }

namespace {
// The attention paths by name, and what an error says a name may be.
constexpr const char* kCudaAttentionNames = "auto, flash, gemm, mma or cudnn";
std::optional<CudaAttention> cuda_attention_named(const std::string& name) {
  for (CudaAttention path : {CudaAttention::automatic, CudaAttention::flash, CudaAttention::gemm, CudaAttention::mma,
                             CudaAttention::cudnn})
    if (name == cuda_attention_name(path)) return path;
  return std::nullopt;
}
}  // namespace

CudaAttention parse_cuda_attention(const std::string& name) {
  std::optional<CudaAttention> path = cuda_attention_named(name);
  REMAT_CHECK(path, "cuda attention: expected ", kCudaAttentionNames, ", got '", name, "'");
  return *path;
}

const char* cuda_attention_name(CudaAttention path) {
  switch (path) {
    case CudaAttention::gemm: return "gemm";
    case CudaAttention::mma: return "mma";
    case CudaAttention::cudnn: return "cudnn";
    case CudaAttention::automatic: return "auto";
    default: return "flash";
  }
}

namespace {
// -1: not chosen yet (the environment decides at the first call), else a CudaAttention.
std::atomic<int> g_cuda_attention{-1};
std::atomic<int64_t> g_cuda_attention_calls[static_cast<int>(CudaAttention::automatic)];
}  // namespace

void count_cuda_attention_call(CudaAttention path) {
  g_cuda_attention_calls[static_cast<int>(path)].fetch_add(1, std::memory_order_relaxed);
}
int64_t cuda_attention_calls(CudaAttention path) {
  return g_cuda_attention_calls[static_cast<int>(path)].load(std::memory_order_relaxed);
}

void set_cuda_attention(CudaAttention path) { g_cuda_attention.store(static_cast<int>(path)); }

CudaAttention cuda_attention() {
  int path = g_cuda_attention.load();
  if (path < 0) {
    const char* env = std::getenv("REMAT_CUDA_ATTENTION");
    CudaAttention chosen = CudaAttention::automatic;
    if (env != nullptr && *env != '\0') {
      const std::string value(env);
      std::optional<CudaAttention> named = cuda_attention_named(value);
      REMAT_CHECK(named, "REMAT_CUDA_ATTENTION: expected ", kCudaAttentionNames, ", got '", value, "'");
      chosen = *named;
    }
    int expected = -1;
    g_cuda_attention.compare_exchange_strong(expected, static_cast<int>(chosen));
    path = g_cuda_attention.load();
  }
  return static_cast<CudaAttention>(path);
}

bool cuda_built() { return cuda_part_built(); }
int cuda_device_count() { return api() ? api()->device_count() : 0; }
long long cuda_host_syncs() { return api() ? api()->host_syncs() : 0; }
std::string cuda_unavailable_reason() { return api() ? std::string() : cuda_part_problem(); }
std::string cuda_device_name(int index) { return api() ? api()->device_name(index) : std::string(); }

Allocator* cuda_allocator(int index) { return require(device_str(index) + " requested").allocator(index); }

void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  require("copy from " + src_device.str() + " to " + dst_device.str()).copy_bytes(dst, dst_device, src, src_device, n);
}

void cuda_memset_zero(void* dst, Device device, size_t n) { require(device.str() + " memset").memset_zero(dst, device, n); }
void cuda_fill(void* dst, Device device, size_t count, size_t element_bytes, uint64_t pattern) {
  require(device.str() + " fill").fill(dst, device, count, element_bytes, pattern);
}
void cuda_synchronize(int index) { require(device_str(index) + " synchronize").synchronize(index); }
void cuda_empty_cache(int index) { require(device_str(index) + " empty_cache").empty_cache(index); }
int64_t cuda_segment_count(int index) { return require(device_str(index) + " segment count").segment_count(index); }
Allocator* cuda_pinned_allocator() { return require("pinned host memory requested").pinned_allocator(); }

CopyTicket cuda_copy_async(void* dst, const void* src, size_t n, int index, bool to_device,
                           std::shared_ptr<const void> keep) {
  return require(device_str(index) + " copy").copy_async(dst, src, n, index, to_device, std::move(keep));
}

void cuda_wait(const CopyTicket& ticket) {
  if (api()) api()->wait(ticket);
}

int cuda_poll_copies() { return api() ? api()->poll_copies() : 0; }

int cuda_wait_copies(int index, int keep_in_flight) {
  return require(device_str(index) + " copy").wait_copies(index, keep_in_flight);
}

Tensor cuda_copy_strided(const Tensor& t) { return require(t.device().str() + " copy").copy_strided(t); }

void cuda_set_device(int index) { require(device_str(index) + " made current").set_device(index); }
bool cuda_compute_idle(int index) { return require(device_str(index) + " queried").compute_idle(index); }

std::shared_ptr<void> cuda_record_event(int index) {
  return require(device_str(index) + " event requested").record_event(index);
}

float cuda_elapsed_ms(const std::shared_ptr<void>& start, const std::shared_ptr<void>& end) {
  return require("cuda event timing requested").elapsed_ms(start, end);
}

}  // namespace remat
