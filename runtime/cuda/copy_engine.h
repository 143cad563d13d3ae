// Copies that overlap the compute stream: page-locked host blocks, a copy stream per device, and
// the copies in flight with what each keeps alive until it has finished. Plain host code over the
// CUDA runtime API, so tests can run it against a simulated runtime (tests/fake_cuda_runtime.h).
#pragma once

#include <cstddef>
#include <memory>

#include "../allocator.h"
#include "runtime_api.h"

namespace remat::cuda {

// Page-locked host memory, cached by exact size and never returned (cudaFreeHost synchronises).
Allocator* pinned_allocator();

// n bytes on device `index`'s copy stream, after the work queued on its compute stream so far;
// `keep` lives until the copy has finished and a poll_copies has seen it. The ticket is an event
// at the copy's end.
CopyTicket copy_async(void* dst, const void* src, size_t n, int index, bool to_device,
                      std::shared_ptr<const void> keep);

// Makes the current device's compute stream wait for the copy of `ticket`.
void wait_for_copy(const CopyTicket& ticket);

// Lets go of what finished copies kept alive; returns the copies still in flight.
int poll_copies();

// Waits for the oldest copies of device `index` until at most `keep_in_flight` are in flight, and
// lets go of what they kept; returns how many copies it waited for.
int wait_for_copies(int index, int keep_in_flight);

// A copy from the host to device `index` through a page-locked block, queued on the compute
// stream like a kernel: the host does not wait for the GPU. The block returns to the cache once
// the copy has run.
void copy_staged_to_device(void* dst, int index, const void* src, size_t n);

}  // namespace remat::cuda
