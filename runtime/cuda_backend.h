// What the runtime asks of the CUDA part (runtime/cuda/), beyond the public cuda_devices.h; answered
// through the CUDA part's table (runtime/cuda_runtime.cpp), with a clear error where there is none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "allocator.h"
#include "cuda_devices.h"

namespace remat {

Allocator* cuda_allocator(int index);
void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n);
void cuda_memset_zero(void* dst, Device device, size_t n);
// `count` elements of `element_bytes` each set to the low bytes of `pattern`, queued on the compute
// stream (Tensor::fill_ on a GPU: no copy from the host).
void cuda_fill(void* dst, Device device, size_t count, size_t element_bytes, uint64_t pattern);
int64_t cuda_segment_count(int index);  // segments the caching allocator holds from the driver

// Page-locked host memory for asynchronous copies, cached by size (its own counters).
Allocator* cuda_pinned_allocator();
// Copies n bytes on device `index`'s copy stream, after the work queued so far on the compute
// stream. `keep` (the owners of both ends) stays alive until the copy has finished, and is let go
// by the first cuda_poll_copies after that. The ticket marks the copy's end: cuda_wait makes the
// compute stream wait for it (before the first kernel that reads a copy to the device).
using CopyTicket = std::shared_ptr<void>;
CopyTicket cuda_copy_async(void* dst, const void* src, size_t n, int index, bool to_device,
                           std::shared_ptr<const void> keep);
void cuda_wait(const CopyTicket& ticket);
// Lets go of what finished copies kept alive; returns the copies still in flight.
int cuda_poll_copies();
// Waits (the host for the GPU) until at most `keep_in_flight` copies of device `index` are in
// flight, oldest first, then polls: what offload uses to bound the device memory its copies hold
// when the GPU runs behind the host.
int cuda_wait_copies(int index, int keep_in_flight);
// A contiguous copy of a strided view on a GPU (the CUDA kernels' copy, reached through the CUDA part).
class Tensor;
Tensor cuda_copy_strided(const Tensor& t);
// Makes device `index` current on the calling thread (libraries such as NCCL bind to it).
void cuda_set_device(int index);
// Whether device `index`'s compute stream has finished the work queued on it (never blocks).
bool cuda_compute_idle(int index);
// Timing on a GPU's compute stream (the budget planner's op costs): an event recorded now, and the
// milliseconds from one to a later one of the same device (waits for the later).
std::shared_ptr<void> cuda_record_event(int index);
float cuda_elapsed_ms(const std::shared_ptr<void>& start, const std::shared_ptr<void>& end);

}  // namespace remat
