// What offload costs the budget planner: the bandwidth between a GPU and pinned host memory, and
// the transfer time a block's compute does not hide.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "checkpoint/planner.h"
#include "runtime/cuda_backend.h"
#include "runtime/tensor.h"

namespace remat {

double offload_exposed_ms(int64_t bytes, double forward_ms, double gbps) {
  if (bytes <= 0) return 0;
  REMAT_CHECK(gbps > 0, "offload: expected a positive bandwidth in GB/s, got ", gbps);
  const double copy_ms = static_cast<double>(bytes) / (gbps * 1e6);
  // Out during forward, back during backward (prefetched a few nodes ahead): each direction hides
  // behind the compute it overlaps, one copy at a time on the copy stream.
  return std::max(0.0, copy_ms - forward_ms) + std::max(0.0, copy_ms - 2 * forward_ms);
}

double offload_bandwidth_gbps(int index) {
  if (const char* env = std::getenv("REMAT_OFFLOAD_GBPS")) {
    char* end = nullptr;
    const double gbps = std::strtod(env, &end);
    REMAT_CHECK(end != env && *end == '\0' && gbps > 0,
                "REMAT_OFFLOAD_GBPS: expected a positive number of GB/s, got '", env, "'");
    return gbps;
  }
  static std::mutex mutex;
  static std::map<int, double> measured;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto found = measured.find(index); found != measured.end()) return found->second;
  // 64 MiB to the host and back, in copies of 8 MiB as Graph::offload and a prefetch make them
  // (one buffer, so that the measurement adds only 8 MiB of workspace to the device's peak, once),
  // after a small copy that waits for the compute stream's queue (a copy starts after the kernels
  // queued before it).
  constexpr int64_t kBytes = int64_t{8} << 20;
  constexpr int kRounds = 8;
  MemoryCategoryScope category(MemoryCategory::workspace);
  Tensor device = Tensor::empty({kBytes}, DType::u8, Device::cuda(index));
  Tensor host = Tensor::empty_pinned({kBytes}, DType::u8);
  cuda_copy_async(host.raw_data(), device.raw_data(), 4096, index, false, nullptr);
  cuda_wait_copies(index, 0);
  const auto start = std::chrono::steady_clock::now();
  for (int round = 0; round < kRounds; ++round) {
    cuda_copy_async(host.raw_data(), device.raw_data(), kBytes, index, false, nullptr);
    cuda_copy_async(device.raw_data(), host.raw_data(), kBytes, index, true, nullptr);
  }
  cuda_wait_copies(index, 0);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double gbps = 2.0 * kRounds * static_cast<double>(kBytes) / std::max(seconds, 1e-9) / 1e9;
  measured[index] = gbps;
  return gbps;
}

}  // namespace remat
