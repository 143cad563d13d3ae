// The column reduction of reduce.cu (sums and maxima over the leading axes, such as bias
// gradients), kept apart so that tests/test_simt.cpp can also run it on the CPU under the SIMT
// emulator (tests/simt_emulator.h).
#pragma once

#include <algorithm>

#include "kernels/cuda/cuda_common.cuh"

namespace remat::cuda::reduce_kernels {

// Reduction of the rows of a [rows, cols] matrix in two fixed-order stages, so that a wide bias
// gradient ([8192, 2304]) uses the whole GPU and reads each row coalesced: a block of 32 x 8
// threads takes 32 columns of one slice of rows, each thread every 8th row of the slice in order,
// then the 8 partial values in order; the slices' partials are then folded in slice order. The
// slices depend on the row count only, so the bits do not depend on the GPU.
constexpr int kColumnTile = 32, kRowLanes = 8, kRowsPerSlice = 512, kMaxSlices = 64;

inline int64_t column_slices(int64_t rows) {
  return std::min<int64_t>(kMaxSlices, std::max<int64_t>(1, (rows + kRowsPerSlice - 1) / kRowsPerSlice));
}

// Writes partial[slice * cols + c], or y[c] directly (cast to T) when there is one slice.
template <typename T, typename Op>
__global__ void reduce_columns_kernel(const T* x, int64_t rows, int64_t cols, int64_t rows_per_slice, Op op,
                                      Acc<T> identity, Acc<T>* partial, T* y) {
  __shared__ Acc<T> lanes[kRowLanes][kColumnTile + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t end = begin + rows_per_slice < rows ? begin + rows_per_slice : rows;
  Acc<T> acc = identity;
  if (c < cols)
    for (int64_t r = begin + threadIdx.y; r < end; r += kRowLanes) acc = op(acc, load(x, r * cols + c));
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  Acc<T> total = lanes[0][threadIdx.x];
  for (int l = 1; l < kRowLanes; ++l) total = op(total, lanes[l][threadIdx.x]);
  if (gridDim.y == 1) y[c] = cast_to<T>(total);
  else partial[blockIdx.y * cols + c] = total;
}

template <typename T, typename Op>
__global__ void fold_slices_kernel(const Acc<T>* partial, int64_t slices, int64_t cols, Op op, T* y) {
  REMAT_GRID_STRIDE(c, cols) {
    Acc<T> total = partial[c];
    for (int64_t s = 1; s < slices; ++s) total = op(total, partial[s * cols + c]);
    y[c] = cast_to<T>(total);
  }
}

}  // namespace remat::cuda::reduce_kernels
