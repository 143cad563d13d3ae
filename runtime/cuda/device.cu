// The CUDA part's runtime: device discovery, the per-device caching allocators, copies and
// synchronisation, handed to the runtime as one table (runtime/cuda/runtime_api.h).
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "runtime/cuda/caching_allocator.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/index_faults.h"
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

// Copies from the host of at most this many bytes are staged (copy_staged_to_device).
constexpr size_t kStagedCopyMax = size_t(1) << 20;
void copy_staged_to_device(void* dst, Device dst_device, const void* src, size_t n);

// The table's copy: synchronous, but for small copies from the host, which are queued.
void copy_bytes_sync(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  if (src_device.is_cpu() && !dst_device.is_cpu() && n <= kStagedCopyMax) {
    copy_staged_to_device(dst, dst_device, src, n);
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
    case 1: fill_kernel<<<blocks, 256>>>(static_cast<uint8_t*>(dst), count, static_cast<uint8_t>(pattern)); break;
    case 2: fill_kernel<<<blocks, 256>>>(static_cast<uint16_t*>(dst), count, static_cast<uint16_t>(pattern)); break;
    case 4: fill_kernel<<<blocks, 256>>>(static_cast<uint32_t*>(dst), count, static_cast<uint32_t>(pattern)); break;
    case 8: fill_kernel<<<blocks, 256>>>(static_cast<uint64_t*>(dst), count, pattern); break;
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

void empty_cache(int index) { static_cast<CachingAllocator*>(allocator(index))->empty_cache(); }

int64_t segment_count(int index) { return static_cast<CachingAllocator*>(allocator(index))->segment_count(); }

namespace {

// Page-locked host blocks, cached by exact size: cudaHostAlloc is slow and cudaFreeHost
// synchronises the device, so blocks are reused and never returned.
class PinnedAllocator final : public Allocator {
 public:
  Device device() const override { return Device::cpu(); }

 protected:
  void* raw_allocate(size_t bytes) override {
    std::lock_guard lock(mutex_);
    auto& free = free_[bytes];
    if (!free.empty()) {
      void* ptr = free.back();
      free.pop_back();
      return ptr;
    }
    void* ptr = nullptr;
    if (cudaHostAlloc(&ptr, bytes, cudaHostAllocDefault) != cudaSuccess) {
      cudaGetLastError();
      REMAT_FAIL("out of pinned host memory: requested ", bytes, " bytes");
    }
    reserved_ += static_cast<int64_t>(bytes);
    return ptr;
  }
  void raw_deallocate(void* ptr, size_t bytes) noexcept override {
    std::lock_guard lock(mutex_);
    free_[bytes].push_back(ptr);
  }
  int64_t reserved_bytes() const override { return reserved_; }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t reserved_ = 0;
};

// Per device: the copy stream and the copies in flight with what they keep alive.
struct CopyEngine {
  cudaStream_t stream = nullptr;
  std::vector<std::pair<cudaEvent_t, std::shared_ptr<const void>>> in_flight;
};

constexpr int kMaxDevices = 64;
std::mutex g_copy_mutex;

std::vector<CopyEngine>& copy_engines() {
  static auto* engines = new std::vector<CopyEngine>(kMaxDevices);
  return *engines;
}

// The engine of device `index`, its stream created on first use; the caller has made `index` the
// current device (a stream belongs to the device current when it is created).
CopyEngine& copy_engine(int index) {
  REMAT_CHECK(index >= 0 && index < kMaxDevices, "cuda:", index, ": device index out of range");
  CopyEngine& e = copy_engines()[index];
  if (!e.stream) REMAT_CUDA_CHECK(cudaStreamCreateWithFlags(&e.stream, cudaStreamNonBlocking));
  return e;
}

}  // namespace

Allocator* pinned_allocator() {
  static auto* pinned = new PinnedAllocator();
  return pinned;
}

CopyTicket copy_async(void* dst, const void* src, size_t n, int index, bool to_device,
                           std::shared_ptr<const void> keep) {
  std::lock_guard lock(g_copy_mutex);
  REMAT_CUDA_CHECK(cudaSetDevice(index));
  CopyEngine& e = copy_engine(index);
  // The copy starts after everything queued on the compute (legacy default) stream so far: the
  // source is written, and a destination block reused from the cache is no longer read.
  cudaEvent_t queued, done, arrival;
  REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&queued, cudaEventDisableTiming));
  REMAT_CUDA_CHECK(cudaEventRecord(queued, 0));
  REMAT_CUDA_CHECK(cudaStreamWaitEvent(e.stream, queued, 0));
  REMAT_CUDA_CHECK(cudaEventDestroy(queued));  // released once it has completed
  REMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost, e.stream));
  REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  REMAT_CUDA_CHECK(cudaEventRecord(done, e.stream));
  e.in_flight.emplace_back(done, std::move(keep));
  // The ticket has its own event: the in-flight one is destroyed when polled.
  REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&arrival, cudaEventDisableTiming));
  REMAT_CUDA_CHECK(cudaEventRecord(arrival, e.stream));
  return CopyTicket(static_cast<void*>(arrival), [](void* ev) { cudaEventDestroy(static_cast<cudaEvent_t>(ev)); });
}

void wait(const CopyTicket& ticket) {
  if (ticket) REMAT_CUDA_CHECK(cudaStreamWaitEvent(0, static_cast<cudaEvent_t>(ticket.get()), 0));
}

int poll_copies() {
  std::lock_guard lock(g_copy_mutex);
  int pending = 0;
  // Only engines that copied something: polling must not create streams (or touch devices).
  for (CopyEngine& e : copy_engines()) {
    auto& list = e.in_flight;
    for (auto it = list.begin(); it != list.end();) {
      cudaError_t status = cudaEventQuery(it->first);
      if (status == cudaErrorNotReady) {
        ++pending;
        ++it;
        continue;
      }
      REMAT_CUDA_CHECK(status);
      REMAT_CUDA_CHECK(cudaEventDestroy(it->first));
      it = list.erase(it);  // what the copy kept alive (its source, its destination) goes now
    }
  }
  return pending;
}

// A small copy from the host (position ids, a batch of tokens, a tensor built on the host) goes
// through a page-locked block and is queued on the compute stream like a kernel, so the host does
// not wait for the GPU's queued work, as cudaMemcpy from pageable memory would. The block goes back
// to the pinned cache once the copy has run (let go by poll_copies, which this calls too).
void copy_staged_to_device(void* dst, Device dst_device, const void* src, size_t n) {
  if (n == 0) return;
  Allocator* pinned = pinned_allocator();
  void* staging = pinned->allocate(n, MemoryCategory::workspace);
  std::shared_ptr<const void> keep(staging, [pinned, n](const void* p) {
    pinned->deallocate(const_cast<void*>(p), n, MemoryCategory::workspace);
  });
  std::memcpy(staging, src, n);
  poll_copies();
  std::lock_guard lock(g_copy_mutex);
  REMAT_CUDA_CHECK(cudaSetDevice(dst_device.index));
  CopyEngine& e = copy_engine(dst_device.index);
  REMAT_CUDA_CHECK(cudaMemcpyAsync(dst, staging, n, cudaMemcpyHostToDevice, 0));
  cudaEvent_t done;
  REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  REMAT_CUDA_CHECK(cudaEventRecord(done, 0));
  e.in_flight.emplace_back(done, std::move(keep));
}

}  // namespace

extern "C" void* remat_cuda_runtime_entry() {
  static const CudaRuntimeApi table{device_count, device_name, allocator,     copy_bytes_sync,  memset_zero,   fill,
                                    synchronize,  empty_cache, segment_count, pinned_allocator, copy_async,
                                    wait,         poll_copies, cuda_kernels_copy_strided,
                                    set_device,   compute_idle, record_event, elapsed_ms,
                                    host_syncs};
  return const_cast<CudaRuntimeApi*>(&table);
}

}  // namespace remat
