// A simulated CUDA runtime for testing remat's host-side CUDA code on a machine without a GPU:
// device memory is host memory, streams are queues that run only when a test says so, events
// complete when their stream reaches them. Misuse the real runtime would reject or that would
// race on a GPU (a copy to memory no longer allocated, an event used after destruction, work
// recorded on another device's stream) is recorded, for the test to check.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

namespace fake_cuda {

// Forgets every allocation, stream and event, and makes `devices` devices of `capacity` bytes each.
// Before the first reset: one device of 16 GiB.
void reset(int devices = 1, size_t capacity = size_t(16) << 30);

struct Counters {
  int device_mallocs = 0;   // cudaMalloc calls that succeeded
  int device_frees = 0;     // cudaFree calls
  int failed_mallocs = 0;   // cudaMalloc calls refused for want of capacity
  int host_allocs = 0;      // cudaHostAlloc calls
  size_t device_live = 0;   // bytes allocated by cudaMalloc and not freed, all devices
  long long launches = 0;   // kernels and library calls queued by launch()
};
Counters counters();

// Work on a stream of the current device (nullptr: its compute stream, the legacy default
// stream), as a kernel would be queued: `work` runs when the stream reaches it.
void enqueue(cudaStream_t stream, std::function<void()> work);

// A kernel launch on the current device's compute stream: checks the configuration as the real
// runtime does (block size, grid extents, dynamic shared memory against 48 KiB or what
// cudaFuncSetAttribute allowed for `kernel`), then queues `body`. A bad configuration sets the
// error cudaGetLastError returns, and is recorded as misuse.
void launch(const void* kernel, const unsigned grid[3], const unsigned block[3], size_t shared_bytes,
            std::function<void()> body);

// Runs queued work until nothing more can run. Which stream goes first when several can: the
// orders a GPU might take, so that a missing dependency shows.
enum class Order { compute_first, copies_first };
void run(Order order);
// Operations queued and not yet run, on all streams.
size_t pending();

// Whether [p, p + n) lies inside one live cudaMalloc allocation.
bool is_device_memory(const void* p, size_t n);

// What went wrong since the last reset (empty when nothing did).
std::vector<std::string> misuse();

}  // namespace fake_cuda
