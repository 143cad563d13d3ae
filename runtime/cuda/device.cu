// The CUDA part's runtime: device discovery, the per-device caching allocators, copies and
// synchronisation (copies that overlap compute: copy_engine.cpp), handed to the runtime as one
// table (runtime/cuda/runtime_api.h).
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

#include "runtime/cuda/caching_allocator.h"
#include "runtime/cuda/copy_engine.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/index_faults.h"
#include "runtime/cuda/launch.h"
#include "runtime/cuda/runtime_api.h"

namespace remat {

namespace {

int device_count() {
  int count = 0;
  // No driver or no GPU is not an error: it is zero devices.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string device_name(int index) {
  cudaDeviceProp prop{};
  REMAT_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  return prop.name;
}

Allocator* allocator(int index) {
  static std::mutex mutex;
  // Never destroyed: tensors in static storage may still free into it during exit.
  static auto* allocators = new std::vector<std::unique_ptr<CachingAllocator>>();
  std::lock_guard lock(mutex);
  int count = device_count();
  REMAT_CHECK(index >= 0 && index < count, "cuda:", index, " requested, but ", count, " CUDA device(s) found");
  if (allocators->empty()) allocators->resize(count);
  if (!(*allocators)[index]) (*allocators)[index] = std::make_unique<CachingAllocator>(index);
  return (*allocators)[index].get();
}

std::atomic<int64_t> g_host_syncs{0};

int64_t host_syncs() { return g_host_syncs.load(std::memory_order_relaxed); }

// Copies from the host of at most this many bytes are staged (cuda::copy_staged_to_device).
constexpr size_t kStagedCopyMax = size_t(1) << 20;

// The table's copy: synchronous, but for small copies from the host, which are queued.
void copy_bytes_sync(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  if (src_device.is_cpu() && !dst_device.is_cpu() && n <= kStagedCopyMax) {
    cuda::copy_staged_to_device(dst, dst_device.index, src, n);
    return;
  }
  // A copy between host and device waits for the compute stream's queued work (and the host for it).
  if (dst_device.is_cpu() || src_device.is_cpu()) g_host_syncs.fetch_add(1, std::memory_order_relaxed);
  cudaMemcpyKind kind = dst_device.is_cpu() ? cudaMemcpyDeviceToHost
                        : src_device.is_cpu() ? cudaMemcpyHostToDevice
                                              : cudaMemcpyDeviceToDevice;
  REMAT_CUDA_CHECK(cudaMemcpy(dst, src, n, kind));
  // A copy to the host has waited for the GPU: the moment to report bad indices its kernels found.
  if (dst_device.is_cpu()) throw_index_faults(src_device.index);
}

void memset_zero(void* dst, Device device, size_t n) {
  REMAT_CUDA_CHECK(cudaSetDevice(device.index));
  REMAT_CUDA_CHECK(cudaMemsetAsync(dst, 0, n));
}

template <typename E>
__global__ void fill_kernel(E* dst, size_t count, E value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(blockDim.x) * gridDim.x)
    dst[i] = value;
}

// On the compute stream, like a kernel: no copy from the host, so no wait for the GPU.
void fill(void* dst, Device device, size_t count, size_t element_bytes, uint64_t pattern) {
  if (count == 0) return;
  REMAT_CUDA_CHECK(cudaSetDevice(device.index));
  unsigned blocks = static_cast<unsigned>(std::min<size_t>((count + 255) / 256, 65536));
  switch (element_bytes) {
    case 1: REMAT_LAUNCH(blocks, 256, 0, fill_kernel<uint8_t>)(static_cast<uint8_t*>(dst), count, pattern); break;
    case 2: REMAT_LAUNCH(blocks, 256, 0, fill_kernel<uint16_t>)(static_cast<uint16_t*>(dst), count, pattern); break;
    case 4: REMAT_LAUNCH(blocks, 256, 0, fill_kernel<uint32_t>)(static_cast<uint32_t*>(dst), count, pattern); break;
    case 8: REMAT_LAUNCH(blocks, 256, 0, fill_kernel<uint64_t>)(static_cast<uint64_t*>(dst), count, pattern); break;
    default: REMAT_FAIL("fill on ", device.str(), ": expected elements of 1, 2, 4 or 8 bytes, got ", element_bytes);
  }
  REMAT_CUDA_CHECK(cudaGetLastError());
}

void synchronize(int index) {
  REMAT_CUDA_CHECK(cudaSetDevice(index));
  g_host_syncs.fetch_add(1, std::memory_order_relaxed);
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());
  throw_index_faults(index);
}

void set_device(int index) { REMAT_CUDA_CHECK(cudaSetDevice(index)); }

std::shared_ptr<void> record_event(int index) {
  REMAT_CUDA_CHECK(cudaSetDevice(index));
  cudaEvent_t event = nullptr;
  REMAT_CUDA_CHECK(cudaEventCreate(&event));
  std::shared_ptr<void> owned(event, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
  REMAT_CUDA_CHECK(cudaEventRecord(event, 0));  // the compute stream (see compute_idle)
  return owned;
}

float elapsed_ms(const std::shared_ptr<void>& start, const std::shared_ptr<void>& end) {
  g_host_syncs.fetch_add(1, std::memory_order_relaxed);
  REMAT_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(end.get())));
  float ms = 0;
  REMAT_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.get()), static_cast<cudaEvent_t>(end.get())));
  return ms;
}

// The compute stream is the legacy default stream.
bool compute_idle(int index) {
  REMAT_CUDA_CHECK(cudaSetDevice(index));
  cudaError_t status = cudaStreamQuery(0);
  if (status == cudaErrorNotReady) return false;
  REMAT_CUDA_CHECK(status);
  return true;
}

// An offload's bound on the copies in flight: a wait for the GPU when it is behind.
int wait_copies(int index, int keep_in_flight) {
  if (cuda::wait_for_copies(index, keep_in_flight) > 0) g_host_syncs.fetch_add(1, std::memory_order_relaxed);
  return cuda::poll_copies();
}

void empty_device_cache(int index) { static_cast<CachingAllocator*>(allocator(index))->empty_cache(); }

int64_t segment_count(int index) { return static_cast<CachingAllocator*>(allocator(index))->segment_count(); }

}  // namespace

extern "C" void* remat_cuda_runtime_entry() {
  static const CudaRuntimeApi table{device_count,    device_name,    allocator,
                                    copy_bytes_sync, memset_zero,    fill,
                                    synchronize,     empty_device_cache, segment_count,
                                    cuda::pinned_allocator, cuda::copy_async, cuda::wait_for_copy,
                                    cuda::poll_copies, cuda_kernels_copy_strided, set_device,
                                    compute_idle,    record_event,   elapsed_ms,
                                    host_syncs,      wait_copies};
  return const_cast<CudaRuntimeApi*>(&table);
}

}  // namespace remat
