// Indices checked on the GPU without stopping the host: a kernel that reads indices (embedding,
// cross_entropy) records the first bad one in its device's record and carries on with a harmless
// stand-in; the host reads the record where it waits for the GPU anyway (a copy to the host, a
// synchronisation) and throws there, naming the op, the index and its position.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace remat {

// The op that found a bad index (the error names it).
enum class IndexFaultOp : int32_t { none = 0, embedding, embedding_backward, cross_entropy, cross_entropy_backward };

// One per GPU, in device memory; all zero while no fault is recorded.
struct IndexFault {
  uint32_t claimed;  // the first bad index sets it; the ones after leave the record as it is
  int32_t op;        // an IndexFaultOp
  int64_t value, position, bound, ignore_index;
};

#if defined(__CUDACC__) || defined(REMAT_SIMT_EMULATION)  // device code, or the tests' emulator of it
__device__ inline void report_index_fault(IndexFault* record, IndexFaultOp op, int64_t value, int64_t position,
                                          int64_t bound, int64_t ignore_index = 0) {
  if (atomicCAS(&record->claimed, 0u, 1u) == 0u) {
    record->op = static_cast<int32_t>(op);
    record->value = value;
    record->position = position;
    record->bound = bound;
    record->ignore_index = ignore_index;
  }
}
#endif

// Device `index`'s record, for a kernel about to check indices on the current stream (allocated and
// zeroed on first use). Marks the device as having a check to read.
IndexFault* index_fault_record(int index);

// If a checking kernel ran on device `index` since the last read: waits for the device's queued
// work, reads the record, and throws its fault as a remat::Error (clearing the record first, so that
// the next step starts clean). Costs nothing when no checking kernel ran.
void throw_index_faults(int index);

// REMAT_CUDA_INDEX_CHECK=host: the reference path instead, which copies the indices to the host,
// checks them there (the error at the op itself) and sorts embedding gradients' rows there; one
// synchronisation per op. `device` (the default) or unset: the checks above.
bool index_checks_on_host();

}  // namespace remat
