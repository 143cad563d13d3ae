// CUDA device discovery, the device allocator and host/device copies.
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

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

namespace {

// Device memory straight from cudaMalloc, counted like the CPU allocator.
class CudaAllocator final : public Allocator {
 public:
  explicit CudaAllocator(int index) : index_(index) {}
  Device device() const override { return Device::cuda(index_); }

 protected:
  void* raw_allocate(size_t bytes) override {
    REMAT_CUDA_CHECK(cudaSetDevice(index_));
    void* ptr = nullptr;
    cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status != cudaSuccess) {
      cudaGetLastError();
      MemoryStats s = stats();
      REMAT_FAIL("out of memory on cuda:", index_, ": requested ", bytes, " bytes, allocated ", s.total.current,
                 ", reserved ", s.reserved, ", peak ", s.total.peak);
    }
    return ptr;
  }
  void raw_deallocate(void* ptr, size_t) noexcept override { REMAT_CUDA_CHECK_NOTHROW(cudaFree(ptr)); }

 private:
  int index_;
};

}  // namespace

Allocator* cuda_allocator(int index) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<CudaAllocator>> allocators;
  std::lock_guard lock(mutex);
  int count = cuda_device_count();
  REMAT_CHECK(index >= 0 && index < count, "cuda:", index, " requested, but ", count, " CUDA device(s) found");
  if (allocators.empty()) allocators.resize(count);
  if (!allocators[index]) allocators[index] = std::make_unique<CudaAllocator>(index);
  return allocators[index].get();
}

void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  cudaMemcpyKind kind = dst_device.is_cpu() ? cudaMemcpyDeviceToHost
                        : src_device.is_cpu() ? cudaMemcpyHostToDevice
                                              : cudaMemcpyDeviceToDevice;
  REMAT_CUDA_CHECK(cudaMemcpy(dst, src, n, kind));
}

}  // namespace remat
