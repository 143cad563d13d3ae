// CUDA device discovery, the per-device caching allocators, copies and synchronisation.
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

#include "runtime/cuda/caching_allocator.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda_backend.h"

namespace remat {

bool cuda_built() { return true; }

int cuda_device_count() {
  int count = 0;
  // No driver or no GPU is not an error: it is zero devices.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string cuda_device_name(int index) {
  cudaDeviceProp prop{};
  REMAT_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  return prop.name;
}

Allocator* cuda_allocator(int index) {
  static std::mutex mutex;
  // Never destroyed: tensors in static storage may still free into it during exit.
  static auto* allocators = new std::vector<std::unique_ptr<CachingAllocator>>();
  std::lock_guard lock(mutex);
  int count = cuda_device_count();
  REMAT_CHECK(index >= 0 && index < count, "cuda:", index, " requested, but ", count, " CUDA device(s) found");
  if (allocators->empty()) allocators->resize(count);
  if (!(*allocators)[index]) (*allocators)[index] = std::make_unique<CachingAllocator>(index);
  return (*allocators)[index].get();
}

void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  cudaMemcpyKind kind = dst_device.is_cpu() ? cudaMemcpyDeviceToHost
                        : src_device.is_cpu() ? cudaMemcpyHostToDevice
                                              : cudaMemcpyDeviceToDevice;
  REMAT_CUDA_CHECK(cudaMemcpy(dst, src, n, kind));
}

void cuda_memset_zero(void* dst, Device device, size_t n) {
  REMAT_CUDA_CHECK(cudaSetDevice(device.index));
  REMAT_CUDA_CHECK(cudaMemsetAsync(dst, 0, n));
}

void cuda_synchronize(int index) {
  REMAT_CUDA_CHECK(cudaSetDevice(index));
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());
}

void cuda_empty_cache(int index) { static_cast<CachingAllocator*>(cuda_allocator(index))->empty_cache(); }

int64_t cuda_segment_count(int index) { return static_cast<CachingAllocator*>(cuda_allocator(index))->segment_count(); }

}  // namespace remat
