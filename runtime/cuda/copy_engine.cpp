// The copy engine: page-locked host blocks, one non-blocking copy stream per device, and the list
// of copies in flight, each holding what it reads and writes until its event has completed.
#include "runtime/cuda/copy_engine.h"

#include <cstdio>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/cuda/cuda_check.h"

namespace remat::cuda {

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
  int64_t reserved_bytes() const override {
    std::lock_guard lock(mutex_);
    return reserved_;
  }

 private:
  mutable std::mutex mutex_;
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
  static auto* engines = new std::vector<CopyEngine>(kMaxDevices);  // never destroyed: see allocator()
  return *engines;
}

// The engine of device `index`; the caller holds g_copy_mutex and has made `index` the current
// device. Its copy stream is created on first use (a stream belongs to the device current then).
CopyEngine& copy_engine(int index, bool with_stream) {
  REMAT_CHECK(index >= 0 && index < kMaxDevices, "cuda:", index, ": device index out of range");
  CopyEngine& e = copy_engines()[index];
  if (with_stream && !e.stream) REMAT_CUDA_CHECK(cudaStreamCreateWithFlags(&e.stream, cudaStreamNonBlocking));
  return e;
}

// Makes a device current for a scope, and the caller's current again after it: copying for one
// device must not move the calling thread's later work to it.
class DeviceScope {
 public:
  explicit DeviceScope(int index) {
    REMAT_CUDA_CHECK(cudaGetDevice(&previous_));
    REMAT_CUDA_CHECK(cudaSetDevice(index));
  }
  ~DeviceScope() { REMAT_CUDA_CHECK_NOTHROW(cudaSetDevice(previous_)); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

cudaEvent_t new_event() {
  cudaEvent_t event = nullptr;
  REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return event;
}

}  // namespace

Allocator* pinned_allocator() {
  static auto* pinned = new PinnedAllocator();
  return pinned;
}

CopyTicket copy_async(void* dst, const void* src, size_t n, int index, bool to_device,
                      std::shared_ptr<const void> keep) {
  std::lock_guard lock(g_copy_mutex);
  DeviceScope device(index);
  CopyEngine& e = copy_engine(index, true);
  // The copy starts after everything queued on the compute (legacy default) stream so far: the
  // source is written, and a destination block reused from the cache is no longer read.
  cudaEvent_t queued = new_event();
  REMAT_CUDA_CHECK(cudaEventRecord(queued, 0));
  REMAT_CUDA_CHECK(cudaStreamWaitEvent(e.stream, queued, 0));
  REMAT_CUDA_CHECK(cudaEventDestroy(queued));  // released once it has completed
  REMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost, e.stream));
  cudaEvent_t done = new_event();
  REMAT_CUDA_CHECK(cudaEventRecord(done, e.stream));
  e.in_flight.emplace_back(done, std::move(keep));
  // The ticket has its own event: the in-flight one is destroyed when polled.
  cudaEvent_t arrival = new_event();
  REMAT_CUDA_CHECK(cudaEventRecord(arrival, e.stream));
  return CopyTicket(static_cast<void*>(arrival), [](void* ev) { cudaEventDestroy(static_cast<cudaEvent_t>(ev)); });
}

void wait_for_copy(const CopyTicket& ticket) {
  if (ticket) REMAT_CUDA_CHECK(cudaStreamWaitEvent(0, static_cast<cudaEvent_t>(ticket.get()), 0));
}

int poll_copies() {
  std::lock_guard lock(g_copy_mutex);
  int pending = 0;
  // Every engine's list, but no stream is created here (querying an event needs no current device).
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

int wait_for_copies(int index, int keep_in_flight) {
  int waited = 0;
  {
    std::lock_guard lock(g_copy_mutex);
    REMAT_CHECK(index >= 0 && index < kMaxDevices, "cuda:", index, ": device index out of range");
    auto& list = copy_engines()[index].in_flight;
    while (static_cast<int>(list.size()) > std::max(keep_in_flight, 0)) {
      REMAT_CUDA_CHECK(cudaEventSynchronize(list.front().first));
      REMAT_CUDA_CHECK(cudaEventDestroy(list.front().first));
      list.erase(list.begin());  // what the copy kept alive goes now
      ++waited;
    }
  }
  return waited;
}

void copy_staged_to_device(void* dst, int index, const void* src, size_t n) {
  if (n == 0) return;
  Allocator* pinned = pinned_allocator();
  void* staging = pinned->allocate(n, MemoryCategory::workspace);
  std::shared_ptr<const void> keep(staging, [pinned, n](const void* p) {
    pinned->deallocate(const_cast<void*>(p), n, MemoryCategory::workspace);
  });
  std::memcpy(staging, src, n);
  poll_copies();  // blocks of earlier staged copies that have run go back to the cache
  std::lock_guard lock(g_copy_mutex);
  DeviceScope device(index);
  CopyEngine& e = copy_engine(index, false);  // the list only: this copy runs on the compute stream
  REMAT_CUDA_CHECK(cudaMemcpyAsync(dst, staging, n, cudaMemcpyHostToDevice, 0));
  cudaEvent_t done = new_event();
  REMAT_CUDA_CHECK(cudaEventRecord(done, 0));
  e.in_flight.emplace_back(done, std::move(keep));
}

}  // namespace remat::cuda
