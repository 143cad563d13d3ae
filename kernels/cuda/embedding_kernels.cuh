// The embedding kernels of sparse_ops.cu: the lookup with its index check, and the backward's
// grouping of token positions by id (sort keys, then each id's first sorted position) and its
// per-row sums in position order. Kept apart so that tests/test_simt.cpp can also run them on the
// CPU under the SIMT emulator (tests/simt_emulator.h), with a stable sort standing in for CUB's.
#pragma once

#include "kernels/cuda/cuda_common.cuh"
#include "runtime/cuda/index_faults.h"

namespace remat::cuda::embedding_kernels {

__device__ __forceinline__ int64_t index_at(const void* idx, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(idx)[i] : static_cast<const int32_t*>(idx)[i];
}

// A bad index reads nothing: its row is zero, and (with a record) the first one is reported.
template <typename T>
__global__ void embedding_kernel(const void* idx, bool is64, const T* w, T* out, int64_t n, int64_t c, int64_t vocab,
                                 IndexFault* fault) {
  REMAT_GRID_STRIDE(e, n * c) {
    int64_t p = e / c, j = e % c, id = index_at(idx, is64, p);
    bool ok = id >= 0 && id < vocab;
    if (!ok && j == 0 && fault != nullptr) report_index_fault(fault, IndexFaultOp::embedding, id, p, vocab);
    out[e] = ok ? w[id * c + j] : cast_to<T>(Acc<T>(0));
  }
}

// Sort keys: the id, or `vocab` for a bad one (sorted past every row, so no row sums it).
__global__ void embedding_keys_kernel(const void* idx, bool is64, int64_t n, int64_t vocab, uint32_t* keys,
                                      int32_t* positions, IndexFault* fault) {
  REMAT_GRID_STRIDE(p, n) {
    int64_t id = index_at(idx, is64, p);
    bool ok = id >= 0 && id < vocab;
    if (!ok) report_index_fault(fault, IndexFaultOp::embedding_backward, id, p, vocab);
    keys[p] = static_cast<uint32_t>(ok ? id : vocab);
    positions[p] = static_cast<int32_t>(p);
  }
}

// offsets[v] = the first sorted position whose id is at least v, for v = 0..vocab.
__global__ void embedding_offsets_kernel(const uint32_t* sorted_ids, int64_t n, int64_t vocab, int32_t* offsets) {
  REMAT_GRID_STRIDE(v, vocab + 1) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      int64_t mid = (lo + hi) / 2;
      if (sorted_ids[mid] < static_cast<uint32_t>(v)) lo = mid + 1;
      else hi = mid;
    }
    offsets[v] = static_cast<int32_t>(lo);
  }
}

template <typename T>
__global__ void embedding_backward_kernel(const T* dy, const int32_t* order, const int32_t* offsets, T* dw,
                                          int64_t vocab, int64_t c) {
  REMAT_GRID_STRIDE(e, vocab * c) {
    int64_t row = e / c, j = e % c;
    Acc<T> acc = 0;
    for (int32_t p = offsets[row]; p < offsets[row + 1]; ++p) acc += load(dy, order[p] * c + j);
    dw[e] = cast_to<T>(acc);
  }
}

}  // namespace remat::cuda::embedding_kernels
