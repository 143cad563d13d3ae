// The reduction kernels of reduce.cu: sums and maxima over any axes (by column tiles over the
// leading axes, such as bias gradients; a block or a thread per output otherwise), the max
// backward, and clipping's f64 sums of squares, norm and scale. Kept apart so that
// tests/test_simt.cpp and tests/test_simt_ops.cpp can also run them on the CPU under the SIMT
// emulator (tests/simt_emulator.h).
#pragma once

#include <algorithm>
#include <vector>

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

// Writes partial[slice * cols + c], or y[c] directly (cast to Y) when there is one slice. Y, the
// output's type, is T, or Acc<T> for a sum rounded once, to f32, where T is bf16 (linear's bias
// gradient under autocast); so in the kernels below.
template <typename T, typename Op, typename Y = T>
__global__ void reduce_columns_kernel(const T* x, int64_t rows, int64_t cols, int64_t rows_per_slice, Op op,
                                      Acc<T> identity, Acc<T>* partial, Y* y) {
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
  if (gridDim.y == 1) y[c] = cast_to<Y>(total);
  else partial[blockIdx.y * cols + c] = total;
}

template <typename T, typename Op, typename Y = T>
__global__ void fold_slices_kernel(const Acc<T>* partial, int64_t slices, int64_t cols, Op op, Y* y) {
  REMAT_GRID_STRIDE(c, cols) {
    Acc<T> total = partial[c];
    for (int64_t s = 1; s < slices; ++s) total = op(total, partial[s * cols + c]);
    y[c] = cast_to<Y>(total);
  }
}

constexpr int kMaxRank = 8;

// Maps a row-major linear index over `sizes` to an element offset with `strides`.
struct Enumerator {
  int rank = 0;
  int64_t sizes[kMaxRank] = {};
  int64_t strides[kMaxRank] = {};
  __device__ int64_t offset(int64_t linear) const {
    int64_t off = 0;
    for (int d = rank - 1; d >= 0; --d) {
      off += (linear % sizes[d]) * strides[d];
      linear /= sizes[d];
    }
    return off;
  }
};

// What a kernel needs (plain data, passed by value).
struct ReduceIndex {
  Enumerator kept, reduced;
  int64_t n_out = 1, n_red = 1;
};

struct ReducePlan : ReduceIndex {
  Shape out_shape;
  bool leading = false;  // the reduced axes are the leading ones: x is [n_red, n_out], rows reduced
  // Reductions over leading axes (bias gradients: [rows, columns] -> [columns]) go by column tiles
  // and row slices; other few outputs with long reductions get a block each; otherwise one thread
  // per output.
  bool by_columns() const { return leading && n_red >= 64; }
  bool block_per_output() const { return n_red >= 1024 && n_out <= 1024; }
  const ReduceIndex& index() const { return *this; }
};

inline ReducePlan plan_reduce(const Shape& shape, const std::vector<int64_t>& axes) {
  REMAT_CHECK(shape.size() <= static_cast<size_t>(kMaxRank), "reduce: the cuda backend handles up to ", kMaxRank,
              " dims, got ", shape_str(shape));
  ReducePlan p;
  Strides strides = contiguous_strides(shape);
  std::vector<bool> reduced(shape.size(), false);
  for (int64_t a : axes) reduced[a] = true;
  p.out_shape = shape;
  for (int64_t a : axes) p.out_shape[a] = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    Enumerator& e = reduced[d] ? p.reduced : p.kept;
    e.sizes[e.rank] = shape[d];
    e.strides[e.rank] = strides[d];
    ++e.rank;
    (reduced[d] ? p.n_red : p.n_out) *= shape[d];
  }
  // Leading: the reduced dims are dims 0 .. r-1 and some dim is kept.
  p.leading = p.reduced.rank > 0 && p.kept.rank > 0;
  for (int d = 0; d < p.reduced.rank; ++d) p.leading = p.leading && reduced[d];
  return p;
}

template <typename T, typename Op, typename Y = T>
__global__ void reduce_thread_kernel(const T* x, Y* y, ReduceIndex p, Op op, Acc<T> identity) {
  REMAT_GRID_STRIDE(o, p.n_out) {
    const T* base = x + p.kept.offset(o);
    Acc<T> acc = identity;
    for (int64_t r = 0; r < p.n_red; ++r) acc = op(acc, load(base, p.reduced.offset(r)));
    y[o] = cast_to<Y>(acc);
  }
}

template <typename T, typename Op, typename Y = T>
__global__ void reduce_block_kernel(const T* x, Y* y, ReduceIndex p, Op op, Acc<T> identity) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  const T* base = x + p.kept.offset(blockIdx.x);
  Acc<T> acc = identity;
  for (int64_t r = threadIdx.x; r < p.n_red; r += blockDim.x) acc = op(acc, load(base, p.reduced.offset(r)));
  acc = block_reduce(acc, op, identity, scratch);
  if (threadIdx.x == 0) y[blockIdx.x] = cast_to<Y>(acc);
}

template <typename T>
__global__ void max_backward_kernel(const T* dy, const T* x, const T* y, T* dx, ReduceIndex p) {
  REMAT_GRID_STRIDE(o, p.n_out) {
    int64_t base = p.kept.offset(o);
    T best = y[o];
    int64_t ties = 0;
    for (int64_t r = 0; r < p.n_red; ++r) ties += x[base + p.reduced.offset(r)] == best;
    Acc<T> share = load(dy, o) / static_cast<Acc<T>>(ties);
    for (int64_t r = 0; r < p.n_red; ++r) {
      int64_t at = base + p.reduced.offset(r);
      if (x[at] == best) dx[at] = cast_to<T>(share);
    }
  }
}

// Clipping's kernels take up to kClipChunk tensors of one dtype a launch (a gpt2 step's 148
// gradients in 3 launches a stage, not 148), passed by value: their data, sizes, slots (places in
// the clipped list, where their sums go) and, for the scale, where each starts in the chunk's
// elements end to end. What a tensor gets does not depend on the others in its chunk.
constexpr int kSquareBlocks = 128, kClipChunk = 64;

template <typename T>
struct ClipChunk {
  T* x[kClipChunk];
  int64_t n[kClipChunk];
  int slot[kClipChunk];
  int64_t start[kClipChunk + 1];  // start[count]: all the chunk's elements
  int count;
};

// Each tensor's f64 sum of squares in two fixed-order stages: a grid of kSquareBlocks x count
// blocks, thread j of block (b, t) summing tensor t's elements b x threads + j and on every
// kSquareBlocks x threads, the block's sum into partial[slot * kSquareBlocks + b]; then
// sum_partials_kernel.
template <typename T>
__global__ void sum_squares_partial_kernel(ClipChunk<T> c, double* partial) {
  REMAT_REDUCE_SCRATCH(double, scratch);
  const T* x = c.x[blockIdx.y];
  double acc = 0;
  REMAT_GRID_STRIDE(i, c.n[blockIdx.y]) {
    double v = static_cast<double>(load(x, i));
    acc += v * v;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(c.slot[blockIdx.y]) * kSquareBlocks + blockIdx.x] = acc;
}

// Block s sums partial[s * count, (s + 1) * count) in a fixed order into out[s].
__global__ void sum_partials_kernel(const double* partial, int count, double* out) {
  REMAT_REDUCE_SCRATCH(double, scratch);
  const double* slots = partial + static_cast<int64_t>(blockIdx.x) * count;
  double acc = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += slots[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// The norm and the scale from the sums, as the host computes them (IEEE f64 add, sqrt and divide):
// clip[0] the scale, clip[1] 1 when the tensors are to be scaled.
__global__ void clip_coefficient_kernel(const double* totals, int64_t count, double max_norm, double* norm,
                                        double* clip) {
  double total = 0;
  for (int64_t i = 0; i < count; ++i) total += totals[i];
  const double n = sqrt(total);
  norm[0] = n;
  clip[0] = n > max_norm ? max_norm / (n + 1e-6) : 1.0;
  clip[1] = n > max_norm ? 1.0 : 0.0;
}

// x *= scale in x's dtype, for each tensor of the chunk, as mul_scalar computes it (the scale
// rounded to the accumulation type).
template <typename T>
__global__ void scale_by_clip_kernel(ClipChunk<T> c, const double* clip) {
  if (clip[1] == 0.0) return;
  const Acc<T> s = static_cast<Acc<T>>(clip[0]);
  REMAT_GRID_STRIDE(e, c.start[c.count]) {
    const int t = tensor_holding(c.start, c.count, e);
    const int64_t i = e - c.start[t];
    c.x[t][i] = cast_to<T>(load(c.x[t], i) * s);
  }
}

}  // namespace remat::cuda::reduce_kernels
