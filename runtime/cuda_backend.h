// What the runtime asks of the CUDA backend; answered by runtime/cuda/ or, without CUDA, by cuda_absent.cpp.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "runtime/allocator.h"

namespace remat {

bool cuda_built();           // true when remat was compiled with the CUDA backend
int cuda_device_count();     // 0 without a GPU or without CUDA; never throws
std::string cuda_device_name(int index);
Allocator* cuda_allocator(int index);
void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n);
void cuda_memset_zero(void* dst, Device device, size_t n);
void cuda_synchronize(int index);    // waits for all work queued on the device
void cuda_empty_cache(int index);    // returns the allocator's wholly free segments to the driver
int64_t cuda_segment_count(int index);  // segments the caching allocator holds from the driver

// Page-locked host memory for asynchronous copies, cached by size (its own counters).
Allocator* cuda_pinned_allocator();
// Copies n bytes on device `index`'s copy stream, after the work queued so far on the compute
// stream. `keep` (the owners of both ends) stays alive until the copy has finished, and is let go
// by the first cuda_poll_copies after that. The ticket marks the copy's end: cuda_wait makes the compute stream wait for it
// (before the first kernel that reads a copy to the device).
using CopyTicket = std::shared_ptr<void>;
CopyTicket cuda_copy_async(void* dst, const void* src, size_t n, int index, bool to_device,
                           std::shared_ptr<const void> keep);
void cuda_wait(const CopyTicket& ticket);
// Lets go of what finished copies kept alive; returns the copies still in flight.
int cuda_poll_copies();

}  // namespace remat
