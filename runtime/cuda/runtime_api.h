// The table of runtime functions the CUDA part hands the runtime (runtime/cuda/device.cu fills it;
// runtime/cuda_runtime.cpp calls through it). Internal to remat.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "../allocator.h"
#include "../tensor.h"

namespace remat {

using CopyTicket = std::shared_ptr<void>;

struct CudaRuntimeApi {
  int (*device_count)();
  std::string (*device_name)(int index);
  Allocator* (*allocator)(int index);
  void (*copy_bytes)(void* dst, Device dst_device, const void* src, Device src_device, size_t n);
  void (*memset_zero)(void* dst, Device device, size_t n);
  // `count` elements of `element_bytes` (1, 2, 4 or 8) each set to the low bytes of `pattern`.
  void (*fill)(void* dst, Device device, size_t count, size_t element_bytes, uint64_t pattern);
  void (*synchronize)(int index);
  void (*empty_cache)(int index);
  int64_t (*segment_count)(int index);
  Allocator* (*pinned_allocator)();
  CopyTicket (*copy_async)(void* dst, const void* src, size_t n, int index, bool to_device,
                           std::shared_ptr<const void> keep);
  void (*wait)(const CopyTicket& ticket);
  int (*poll_copies)();
  Tensor (*copy_strided)(const Tensor& t);  // a contiguous copy of a strided view on the device
  void (*set_device)(int index);              // make `index` the calling thread's current device
  bool (*compute_idle)(int index);            // whether device `index`'s compute stream has finished its work
  std::shared_ptr<void> (*record_event)(int index);  // a timing event, recorded now on the compute stream
  // Milliseconds from one event to a later one of the same device (waits for the later).
  float (*elapsed_ms)(const std::shared_ptr<void>& start, const std::shared_ptr<void>& end);
  int64_t (*host_syncs)();  // the times the host has waited for a GPU (cuda_host_syncs)
  // Waits until at most `keep_in_flight` copies of device `index` are in flight, oldest first, and
  // lets go of what the finished ones kept; returns the copies still in flight on every device.
  int (*wait_copies)(int index, int keep_in_flight);
};

// The CUDA kernels' strided copy, for the table (kernels/cuda/cuda_backend.cu).
Tensor cuda_kernels_copy_strided(const Tensor& t);

}  // namespace remat

// The CUDA part's entries, as cuda_part_entry returns them: the runtime table and the Backend.
extern "C" void* remat_cuda_runtime_entry();
extern "C" void* remat_cuda_kernels_entry();
