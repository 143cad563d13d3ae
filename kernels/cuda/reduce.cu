// CUDA reductions (sum, max) over any set of axes (leading axes by column tiles and row slices),
// the max backward and the f64 sums of squares used for gradient clipping. Every output is reduced
// in a fixed order: no atomics.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/reduce_kernels.cuh"
#include "runtime/workspace.h"

namespace remat {

namespace {

using namespace cuda;
using namespace cuda::reduce_kernels;

template <typename T, typename Op, typename Y>
void reduce_columns(const T* x, int64_t rows, int64_t cols, Op op, Acc<T> identity, Y* y, Device device) {
  const int64_t slices = column_slices(rows), rows_per_slice = (rows + slices - 1) / slices;
  const int64_t tiles = (cols + kColumnTile - 1) / kColumnTile;
  REMAT_CHECK(tiles <= INT32_MAX, "sum: ", cols, " columns exceed the cuda backend's grid");
  Tensor partial;
  if (slices > 1) partial = empty_workspace({slices, cols}, dtype_of<Acc<T>>::value, device);
  Acc<T>* partial_data = slices > 1 ? partial.data<Acc<T>>() : nullptr;
  dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slices)), block(kColumnTile, kRowLanes);
  REMAT_LAUNCH(grid, block, 0, reduce_columns_kernel<T, Op, Y>)(x, rows, cols, rows_per_slice, op, identity, partial_data, y);
  REMAT_CUDA_LAUNCH_CHECK();
  if (slices > 1) {
    REMAT_LAUNCH(blocks_for(cols), kThreads, 0, fold_slices_kernel<T, Op, Y>)(partial_data, slices, cols, op, y);
    REMAT_CUDA_LAUNCH_CHECK();
  }
}

// The reduction in x's dtype, or with `accumulated` in its accumulation dtype (one rounding, to
// f32, for bf16 x).
template <typename Op>
Tensor reduce(const Tensor& x, const std::vector<int64_t>& axes, Op op, bool is_max, const char* name,
              bool accumulated = false) {
  set_device_of(x);
  ReducePlan plan = plan_reduce(x.shape(), axes);
  Tensor out = Tensor::empty(plan.out_shape, accumulated ? accumulation_dtype(x.dtype()) : x.dtype(), x.device());
  if (plan.n_out == 0) return out;
  dispatch(x.dtype(), name, [&]<typename T>() {
    auto run = [&]<typename Y>() {
      Acc<T> identity = is_max ? -std::numeric_limits<Acc<T>>::infinity() : Acc<T>(0);
      if (plan.by_columns())
        reduce_columns<T>(x.data<T>(), plan.n_red, plan.n_out, op, identity, out.data<Y>(), x.device());
      else if (plan.block_per_output())
        REMAT_LAUNCH(static_cast<unsigned>(plan.n_out), kThreads, 0, reduce_block_kernel<T, Op, Y>)(
            x.data<T>(), out.data<Y>(), plan.index(), op, identity);
      else
        REMAT_LAUNCH(blocks_for(plan.n_out), kThreads, 0, reduce_thread_kernel<T, Op, Y>)(
            x.data<T>(), out.data<Y>(), plan.index(), op, identity);
    };
    if (accumulated) run.template operator()<Acc<T>>();
    else run.template operator()<T>();
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
}

}  // namespace

Tensor CudaBackend::reduce_sum(const Tensor& x, const std::vector<int64_t>& axes) {
  return reduce(x, axes, SumOp{}, false, "sum");
}

Tensor CudaBackend::reduce_sum_accumulated(const Tensor& x, const std::vector<int64_t>& axes) {
  return reduce(x, axes, SumOp{}, false, "sum", true);
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
    REMAT_LAUNCH(blocks_for(plan.n_out), kThreads, 0, max_backward_kernel<T>)(
        dy.data<T>(), x.data<T>(), y.data<T>(), dx.data<T>(), plan.index());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

namespace {

// Calls fn(chunk) for xs in chunks of at most kClipChunk tensors of one dtype, each tensor's slot
// its place in xs (empty tensors included: their sum of squares is 0).
template <typename Fn>
void for_each_clip_chunk(const std::vector<Tensor>& xs, Fn&& fn) {
  const Device device = xs.front().device();
  std::vector<bool> done(xs.size(), false);
  for (size_t first = 0; first < xs.size(); ++first) {
    if (done[first]) continue;
    const DType dtype = xs[first].dtype();
    dispatch(dtype, "clip_grad_norm", [&]<typename T>() {
      ClipChunk<T> chunk{};
      for (size_t i = first; i < xs.size(); ++i) {
        const Tensor& x = xs[i];
        if (done[i] || x.dtype() != dtype) continue;
        REMAT_CHECK(x.device() == device, "clip_grad_norm: expected every tensor on ", device.str(), ", got one on ",
                    x.device().str());
        done[i] = true;
        const int k = chunk.count;
        chunk.x[k] = x.data<T>();
        chunk.n[k] = x.numel();
        chunk.slot[k] = static_cast<int>(i);
        chunk.start[k + 1] = chunk.start[k] + x.numel();
        chunk.count = k + 1;
        if (chunk.count == kClipChunk) {
          fn(chunk);
          chunk = ClipChunk<T>{};
        }
      }
      if (chunk.count > 0) fn(chunk);
    });
  }
}

// Each tensor's sum of squares into totals[i], on the device: two fixed-order stages, so a
// tensor's sum has the same bits whatever else is clipped with it.
Tensor queue_sum_squares(const std::vector<Tensor>& xs) {
  set_device_of(xs.front());
  const Device device = xs.front().device();
  REMAT_CHECK(xs.size() <= INT32_MAX, "clip_grad_norm: ", xs.size(), " tensors exceed the cuda backend's grid");
  const int count = static_cast<int>(xs.size());
  Tensor partial = empty_workspace({count, kSquareBlocks}, DType::f64, device);
  Tensor totals = empty_workspace({count}, DType::f64, device);
  for_each_clip_chunk(xs, [&]<typename T>(const ClipChunk<T>& chunk) {
    REMAT_LAUNCH(dim3(kSquareBlocks, static_cast<unsigned>(chunk.count)), kThreads, 0, sum_squares_partial_kernel<T>)(
        chunk, partial.data<double>());
    REMAT_CUDA_LAUNCH_CHECK();
  });
  REMAT_LAUNCH(static_cast<unsigned>(count), kThreads, 0, sum_partials_kernel)(partial.data<double>(), kSquareBlocks,
                                                                               totals.data<double>());
  REMAT_CUDA_LAUNCH_CHECK();
  return totals;
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
  Tensor clip = empty_workspace({2}, DType::f64, device);
  REMAT_LAUNCH(1, 1, 0, clip_coefficient_kernel)(
      totals.data<double>(), static_cast<int64_t>(xs.size()), max_norm, norm.data<double>(), clip.data<double>());
  REMAT_CUDA_LAUNCH_CHECK();
  for_each_clip_chunk(xs, [&]<typename T>(const ClipChunk<T>& chunk) {
    if (chunk.start[chunk.count] == 0) return;
    REMAT_LAUNCH(blocks_for(chunk.start[chunk.count]), kThreads, 0, scale_by_clip_kernel<T>)(chunk, clip.data<double>());
    REMAT_CUDA_LAUNCH_CHECK();
  });
  for (const Tensor& x : xs) x.storage()->bump_version();
  return true;
}

}  // namespace remat
