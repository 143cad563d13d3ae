// CUDA reductions (sum, max) over any set of axes (leading axes by column tiles and row slices),
// the max backward and the f64 sums of squares used for gradient clipping. Every output is reduced
// in a fixed order: no atomics.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/reduce_kernels.cuh"

namespace remat {

namespace {

using namespace cuda;
using namespace cuda::reduce_kernels;

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

ReducePlan plan_reduce(const Shape& shape, const std::vector<int64_t>& axes) {
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

template <typename T, typename Op>
void reduce_columns(const T* x, int64_t rows, int64_t cols, Op op, Acc<T> identity, T* y, Device device) {
  const int64_t slices = column_slices(rows), rows_per_slice = (rows + slices - 1) / slices;
  const int64_t tiles = (cols + kColumnTile - 1) / kColumnTile;
  REMAT_CHECK(tiles <= INT32_MAX, "sum: ", cols, " columns exceed the cuda backend's grid");
  Tensor partial;
  if (slices > 1) {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    partial = Tensor::empty({slices, cols}, std::is_same_v<Acc<T>, double> ? DType::f64 : DType::f32, device);
  }
  Acc<T>* partial_data = slices > 1 ? partial.data<Acc<T>>() : nullptr;
  reduce_columns_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(slices)),
                             dim3(kColumnTile, kRowLanes)>>>(x, rows, cols, rows_per_slice, op, identity,
                                                             partial_data, y);
  REMAT_CUDA_LAUNCH_CHECK();
  if (slices > 1) {
    fold_slices_kernel<T><<<blocks_for(cols), kThreads>>>(partial_data, slices, cols, op, y);
    REMAT_CUDA_LAUNCH_CHECK();
  }
}

template <typename T, typename Op>
__global__ void reduce_thread_kernel(const T* x, T* y, ReduceIndex p, Op op, Acc<T> identity) {
  REMAT_GRID_STRIDE(o, p.n_out) {
    const T* base = x + p.kept.offset(o);
    Acc<T> acc = identity;
    for (int64_t r = 0; r < p.n_red; ++r) acc = op(acc, load(base, p.reduced.offset(r)));
    y[o] = cast_to<T>(acc);
  }
}

template <typename T, typename Op>
__global__ void reduce_block_kernel(const T* x, T* y, ReduceIndex p, Op op, Acc<T> identity) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  const T* base = x + p.kept.offset(blockIdx.x);
  Acc<T> acc = identity;
  for (int64_t r = threadIdx.x; r < p.n_red; r += blockDim.x) acc = op(acc, load(base, p.reduced.offset(r)));
  acc = block_reduce(acc, op, identity, scratch);
  if (threadIdx.x == 0) y[blockIdx.x] = cast_to<T>(acc);
}

template <typename Op>
Tensor reduce(const Tensor& x, const std::vector<int64_t>& axes, Op op, bool is_max, const char* name) {
  set_device_of(x);
  ReducePlan plan = plan_reduce(x.shape(), axes);
  Tensor out = Tensor::empty(plan.out_shape, x.dtype(), x.device());
  if (plan.n_out == 0) return out;
  dispatch(x.dtype(), name, [&]<typename T>() {
    Acc<T> identity = is_max ? -std::numeric_limits<Acc<T>>::infinity() : Acc<T>(0);
    if (plan.by_columns())
      reduce_columns<T>(x.data<T>(), plan.n_red, plan.n_out, op, identity, out.data<T>(), x.device());
    else if (plan.block_per_output())
      reduce_block_kernel<T><<<static_cast<unsigned>(plan.n_out), kThreads>>>(x.data<T>(), out.data<T>(), plan.index(), op, identity);
    else
      reduce_thread_kernel<T><<<blocks_for(plan.n_out), kThreads>>>(x.data<T>(), out.data<T>(), plan.index(), op, identity);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
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

constexpr int kSquareBlocks = 128;

template <typename T>
__global__ void sum_squares_partial_kernel(const T* x, int64_t n, double* partial) {
  REMAT_REDUCE_SCRATCH(double, scratch);
  double acc = 0;
  REMAT_GRID_STRIDE(i, n) {
    double v = static_cast<double>(load(x, i));
    acc += v * v;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_partials_kernel(const double* partial, int count, double* out) {
  REMAT_REDUCE_SCRATCH(double, scratch);
  double acc = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[0] = acc;
}

}  // namespace

Tensor CudaBackend::reduce_sum(const Tensor& x, const std::vector<int64_t>& axes) {
  return reduce(x, axes, SumOp{}, false, "sum");
}

Tensor CudaBackend::reduce_max(const Tensor& x, const std::vector<int64_t>& axes) {
  for (int64_t a : axes) REMAT_CHECK(x.shape()[a] > 0, "max: cannot reduce an empty axis of ", x.meta_str());
  return reduce(x, axes, MaxOp{}, true, "max");
}

Tensor CudaBackend::reduce_max_backward(const Tensor& dy, const Tensor& x, const Tensor& y) {
  set_device_of(x);
  std::vector<int64_t> axes;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (y.shape()[d] == 1 && x.shape()[d] != 1) axes.push_back(d);
  ReducePlan plan = plan_reduce(x.shape(), axes);
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.numel() == 0) return dx;
  REMAT_CUDA_CHECK(cudaMemsetAsync(dx.raw_data(), 0, dx.nbytes()));
  dispatch(x.dtype(), "max_backward", [&]<typename T>() {
    max_backward_kernel<T><<<blocks_for(plan.n_out), kThreads>>>(dy.data<T>(), x.data<T>(), y.data<T>(), dx.data<T>(), plan.index());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

namespace {

// Each tensor's sum of squares into totals[i], on the device (two fixed-order stages per tensor).
Tensor queue_sum_squares(const std::vector<Tensor>& xs) {
  set_device_of(xs.front());
  const Device device = xs.front().device();
  const int64_t count = static_cast<int64_t>(xs.size());
  Tensor partial, totals;
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    partial = Tensor::empty({count, kSquareBlocks}, DType::f64, device);
    totals = Tensor::empty({count}, DType::f64, device);
  }
  // Each tensor's two stages as for one tensor, into its own slots; one copy back for all.
  for (int64_t i = 0; i < count; ++i) {
    const Tensor& x = xs[static_cast<size_t>(i)];
    REMAT_CHECK(x.device() == device, "sum_squares: expected every tensor on ", device.str(), ", got one on ",
                x.device().str());
    double* slots = partial.data<double>() + i * kSquareBlocks;
    dispatch(x.dtype(), "sum_squares", [&]<typename T>() {
      sum_squares_partial_kernel<T><<<kSquareBlocks, kThreads>>>(x.data<T>(), x.numel(), slots);
    });
    REMAT_CUDA_LAUNCH_CHECK();
    sum_partials_kernel<<<1, kThreads>>>(slots, kSquareBlocks, totals.data<double>() + i);
    REMAT_CUDA_LAUNCH_CHECK();
  }
  return totals;
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

// x *= scale in x's dtype, as mul_scalar computes it (the scale rounded to the accumulation type).
template <typename T>
__global__ void scale_by_clip_kernel(T* x, int64_t n, const double* clip) {
  if (clip[1] == 0.0) return;
  const Acc<T> s = static_cast<Acc<T>>(clip[0]);
  REMAT_GRID_STRIDE(i, n) x[i] = cast_to<T>(load(x, i) * s);
}

}  // namespace

std::vector<double> CudaBackend::sum_squares(const std::vector<Tensor>& xs) {
  if (xs.empty()) return {};
  return queue_sum_squares(xs).to(Device::cpu()).to_vector<double>();
}

bool CudaBackend::clip_by_total_norm(const std::vector<Tensor>& xs, double max_norm, Tensor& norm) {
  if (xs.empty() || !std::all_of(xs.begin(), xs.end(), [](const Tensor& x) { return x.is_contiguous(); }))
    return false;
  Tensor totals = queue_sum_squares(xs);
  const Device device = xs.front().device();
  norm = Tensor::empty({}, DType::f64, device);
  Tensor clip;
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    clip = Tensor::empty({2}, DType::f64, device);
  }
  clip_coefficient_kernel<<<1, 1>>>(totals.data<double>(), static_cast<int64_t>(xs.size()), max_norm,
                                    norm.data<double>(), clip.data<double>());
  REMAT_CUDA_LAUNCH_CHECK();
  for (const Tensor& x : xs) {
    if (x.numel() == 0) continue;
    dispatch(x.dtype(), "clip_by_total_norm", [&]<typename T>() {
      scale_by_clip_kernel<T><<<blocks_for(x.numel()), kThreads>>>(x.data<T>(), x.numel(), clip.data<double>());
    });
    REMAT_CUDA_LAUNCH_CHECK();
    x.storage()->bump_version();
  }
  return true;
}

}  // namespace remat
