// CUDA row kernels: layer_norm and group_norm forward/backward, softmax, fused cross-entropy.
// layer_norm takes a warp per row up to 1024 channels, else (and the others) one block per row (or
// group) with block reductions; parameter gradients sum row chunks into partials and then the
// partials in order, so every sum has a fixed order.
#include <algorithm>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/norm_softmax_kernels.cuh"
#include "runtime/cuda/index_faults.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

using namespace cuda;
using namespace cuda::row_kernels;

unsigned grid_of(int64_t rows, const char* op) {
  REMAT_CHECK(rows <= INT32_MAX, op, ": ", rows, " rows exceed the cuda grid");
  return static_cast<unsigned>(rows);
}

// layer_norm takes a warp per row where a row fits in the warp's registers: up to 1024 channels.
bool warp_rows_fit(int64_t c) { return c <= 32 * 32; }

// Runs f.template operator()<kPerLane>() with the fewest values per lane that hold c channels (8,
// 24 for gpt2's 768, or 32); false, running nothing, where c is too wide.
template <typename F>
bool dispatch_per_lane(int64_t c, F&& f) {
  if (c <= 32 * 8) f.template operator()<8>();
  else if (c <= 32 * 24) f.template operator()<24>();
  else if (c <= 32 * 32) f.template operator()<32>();
  else return false;
  return true;
}

unsigned warp_row_blocks(int64_t rows, const char* op) {
  return grid_of((rows + kNormWarps - 1) / kNormWarps, op);
}

// The reference path (REMAT_CUDA_INDEX_CHECK=host): targets checked on the host, the error at the op.
void check_targets_on_host(const Tensor& targets, int64_t v, int64_t ignore_index, int64_t first_row) {
  std::vector<int64_t> host = targets.to_vector<int64_t>();
  for (size_t i = 0; i < host.size(); ++i) {
    int64_t t = host[i];
    REMAT_CHECK(t == ignore_index || (t >= 0 && t < v), "cross_entropy: expected targets in [0, ", v,
                ") or ignore_index ", ignore_index, ", got ", t, " at row ", first_row + static_cast<int64_t>(i));
  }
}

// layer_norm's y or its backward's dy in another dtype than x: bf16 for f32 x (autocast's GEMM
// inputs; AutocastOutput in autograd/ops.h) has kernels of its own; other pairs take a cast.
bool has_narrow_kernels(DType x_dtype, DType other) { return x_dtype == DType::f32 && other == DType::bf16; }

// Runs f.template operator()<T, O>() for x's dtype T and O, the dtype of y (layer_norm) or dy (its
// backward): T itself, or bf16 for f32 x.
template <typename F>
void dispatch_with_narrow(DType x_dtype, DType other, const char* op, F&& f) {
  if (has_narrow_kernels(x_dtype, other)) f.template operator()<float, bf16>();
  else dispatch(x_dtype, op, [&]<typename T>() { f.template operator()<T, T>(); });
}

}  // namespace

std::vector<Tensor> CudaBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, DType out) {
  if (out != x.dtype() && !has_narrow_kernels(x.dtype(), out)) {
    std::vector<Tensor> result = layer_norm(x, w, b, eps, x.dtype());
    result[0] = cast(result[0], out);
    return result;
  }
  set_device_of(x);
  int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
  Tensor y = Tensor::empty(x.shape(), out, x.device());
  Shape stat_shape(x.shape().begin(), x.shape().end() - 1);
  Tensor mean = Tensor::empty(stat_shape, x.dtype(), x.device()), rstd = Tensor::empty(stat_shape, x.dtype(), x.device());
  dispatch_with_narrow(x.dtype(), out, "layer_norm", [&]<typename T, typename O>() {
    if (rows == 0) return;
    const bool by_warps = dispatch_per_lane(c, [&]<int kPerLane>() {
      REMAT_LAUNCH(warp_row_blocks(rows, "layer_norm"), 32 * kNormWarps, 0, layer_norm_warp_kernel<T, kPerLane, O>)(
          x.data<T>(), w.data<T>(), b.data<T>(), y.data<O>(), mean.data<T>(), rstd.data<T>(), rows,
          static_cast<int>(c), static_cast<Acc<T>>(eps));
    });
    if (!by_warps)
      REMAT_LAUNCH(grid_of(rows, "layer_norm"), kRowThreads, 0, layer_norm_kernel<T, O>)(
          x.data<T>(), w.data<T>(), b.data<T>(), y.data<O>(), mean.data<T>(), rstd.data<T>(), c,
          static_cast<Acc<T>>(eps));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::vector<Tensor> CudaBackend::layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                     const Tensor& mean, const Tensor& rstd, const Tensor& dx_into) {
  if (dy.dtype() != x.dtype() && !has_narrow_kernels(x.dtype(), dy.dtype()))
    return layer_norm_backward(cast(dy, x.dtype()), x, w, mean, rstd, dx_into);
  set_device_of(x);
  int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
  const bool accumulate = dx_into.defined();
  REMAT_CHECK(!accumulate || (dx_into.dtype() == x.dtype() && dx_into.shape() == x.shape() && dx_into.is_contiguous()),
              "layer_norm_backward: expected dx_into contiguous in x's dtype and shape ", x.meta_str(), ", got ",
              dx_into.meta_str());
  Tensor dx = accumulate ? dx_into : Tensor::empty(x.shape(), x.dtype(), x.device());
  if (rows == 0) return {dx, Tensor::zeros(w.shape(), x.dtype(), x.device()), Tensor::zeros(w.shape(), x.dtype(), x.device())};
  // Every channel's sum is written below: no fill first.
  Tensor dw = Tensor::empty(w.shape(), x.dtype(), x.device()), db = Tensor::empty(w.shape(), x.dtype(), x.device());
  const bool by_warps = warp_rows_fit(c);
  // Fixed-size chunks of rows (larger ones, on the block-per-row path, only past 65535 * kRowChunk
  // rows): the order of each sum depends on the shape alone.
  const int64_t row_chunk = by_warps ? kNormRowsPerBlock : std::max(kRowChunk, (rows + kMaxGridY - 1) / kMaxGridY);
  const int64_t chunks = (rows + row_chunk - 1) / row_chunk;
  Tensor pw = empty_workspace({chunks, c}, accumulation_dtype(x.dtype()), x.device());
  Tensor pb = empty_workspace({chunks, c}, accumulation_dtype(x.dtype()), x.device());
  dispatch_with_narrow(x.dtype(), dy.dtype(), "layer_norm_backward", [&]<typename T, typename G>() {
    using A = Acc<T>;
    if (by_warps) {
      REMAT_CHECK(chunks <= INT32_MAX, "layer_norm_backward: ", rows, " rows exceed the cuda grid");
      dispatch_per_lane(c, [&]<int kPerLane>() {
        const auto kernel = layer_norm_backward_warp_kernel<T, kPerLane, G>;
        REMAT_LAUNCH(static_cast<unsigned>(chunks), 32 * kNormWarps, 0, kernel)(
            dy.data<G>(), x.data<T>(), w.data<T>(), mean.data<T>(), rstd.data<T>(), dx.data<T>(), rows,
            static_cast<int>(c), pw.data<A>(), pb.data<A>(), accumulate);
      });
    } else {
      REMAT_LAUNCH(grid_of(rows, "layer_norm_backward"), kRowThreads, 0, layer_norm_dx_kernel<T, G>)(
          dy.data<G>(), x.data<T>(), w.data<T>(), mean.data<T>(), rstd.data<T>(), dx.data<T>(), c, accumulate);
      dim3 grid(static_cast<unsigned>((c + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
      REMAT_LAUNCH(grid, kThreads, 0, layer_norm_param_partial_kernel<T, G>)(
          dy.data<G>(), x.data<T>(), mean.data<T>(), rstd.data<T>(), rows, c, row_chunk, pw.data<A>(), pb.data<A>());
    }
    REMAT_LAUNCH(static_cast<unsigned>((c + 31) / 32), dim3(32, kSumSlices), 0, sum_chunks_kernel<T>)(
        pw.data<A>(), pb.data<A>(), chunks, c, dw.data<T>(), db.data<T>());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dx, dw, db};
}

Tensor CudaBackend::softmax(const Tensor& x) {
  set_device_of(x);
  int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (rows == 0) return y;
  dispatch(x.dtype(), "softmax", [&]<typename T>() {
    REMAT_LAUNCH(grid_of(rows, "softmax"), kRowThreads, 0, softmax_kernel<T>)(x.data<T>(), y.data<T>(), c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::softmax_backward(const Tensor& dy, const Tensor& y) {
  set_device_of(y);
  int64_t c = y.size(-1), rows = c == 0 ? 0 : y.numel() / c;
  Tensor dx = Tensor::empty(y.shape(), y.dtype(), y.device());
  if (rows == 0) return dx;
  dispatch(y.dtype(), "softmax_backward", [&]<typename T>() {
    REMAT_LAUNCH(grid_of(rows, "softmax_backward"), kRowThreads, 0, softmax_backward_kernel<T>)(
        dy.data<T>(), y.data<T>(), dx.data<T>(), c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

std::vector<Tensor> CudaBackend::group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, double eps) {
  set_device_of(x);
  int64_t n = x.size(0), c = x.size(1);
  // An empty batch (or empty images): nothing to normalise, statistics 0, as on the cpu.
  if (x.numel() == 0) return {Tensor::empty(x.shape(), x.dtype(), x.device()), Tensor::zeros({n, groups}, x.dtype(), x.device()),
                              Tensor::zeros({n, groups}, x.dtype(), x.device())};
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = Tensor::empty({n, groups}, x.dtype(), x.device()), rstd = Tensor::empty({n, groups}, x.dtype(), x.device());
  int64_t hw = x.numel() / (n * c), cg = c / groups, m = cg * hw;
  dispatch(x.dtype(), "group_norm", [&]<typename T>() {
    REMAT_LAUNCH(grid_of(n * groups, "group_norm"), kThreads, 0, group_norm_kernel<T>)(
        x.data<T>(), w.data<T>(), b.data<T>(), y.data<T>(), mean.data<T>(), rstd.data<T>(), m, hw, groups, cg,
        static_cast<Acc<T>>(eps));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::vector<Tensor> CudaBackend::group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                     const Tensor& mean, const Tensor& rstd, int groups) {
  set_device_of(x);
  int64_t n = x.size(0), c = x.size(1);
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.numel() == 0) return {dx, Tensor::zeros({c}, x.dtype(), x.device()), Tensor::zeros({c}, x.dtype(), x.device())};
  int64_t hw = x.numel() / (n * c), cg = c / groups, m = cg * hw;
  Tensor dw = Tensor::empty({c}, x.dtype(), x.device()), db = Tensor::empty({c}, x.dtype(), x.device());
  dispatch(x.dtype(), "group_norm_backward", [&]<typename T>() {
    REMAT_LAUNCH(grid_of(n * groups, "group_norm_backward"), kThreads, 0, group_norm_dx_kernel<T>)(
        dy.data<T>(), x.data<T>(), w.data<T>(), mean.data<T>(), rstd.data<T>(), dx.data<T>(), m, hw, groups, cg);
    REMAT_LAUNCH(grid_of(c, "group_norm_backward"), kThreads, 0, group_norm_param_kernel<T>)(
        dy.data<T>(), x.data<T>(), mean.data<T>(), rstd.data<T>(), n, c, hw, groups, cg, dw.data<T>(), db.data<T>());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dx, dw, db};
}

std::vector<Tensor> CudaBackend::cross_entropy_rows(const Tensor& logits, const Tensor& targets,
                                                    const CrossEntropyRows& rows) {
  set_device_of(logits);
  int64_t n = logits.size(0), v = logits.size(1);
  bool on_host = index_checks_on_host();
  if (on_host) check_targets_on_host(targets, v, rows.ignore_index, rows.first_row);
  IndexFault* fault = on_host ? nullptr : index_fault_record(logits.device().index);
  // The log-sum-exp and the losses in the accumulation type: bf16 would round the log-sum-exp
  // before exp(logit - lse) in backward, and the loss to three digits.
  Tensor lse = Tensor::empty({n}, accumulation_dtype(logits.dtype()), logits.device());
  Tensor row_loss = Tensor::empty({n}, accumulation_dtype(logits.dtype()), logits.device());
  bool is64 = targets.dtype() == DType::i64;
  if (n == 0) return {row_loss, lse};
  dispatch(logits.dtype(), "cross_entropy", [&]<typename T>() {
    REMAT_LAUNCH(grid_of(n, "cross_entropy"), kThreads, 0, cross_entropy_rows_kernel<T>)(
        logits.data<T>(), targets.raw_data(), is64, v, rows.ignore_index, rows.first_row, lse.data<Acc<T>>(),
        row_loss.data<Acc<T>>(), fault);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {row_loss, lse};
}

Tensor CudaBackend::cross_entropy_mean(const Tensor& row_loss, const Tensor& targets, int64_t vocab,
                                       int64_t ignore_index) {
  set_device_of(row_loss);
  Tensor loss = Tensor::empty({}, row_loss.dtype(), row_loss.device());
  bool is64 = targets.dtype() == DType::i64;
  // The accumulation dtype names the kernel: f32 row losses are bf16's and f32's alike.
  dispatch(row_loss.dtype(), "cross_entropy", [&]<typename T>() {
    REMAT_LAUNCH(1, kThreads, 0, cross_entropy_mean_kernel<T>)(row_loss.data<Acc<T>>(), targets.raw_data(), is64,
                                                                 row_loss.size(0), vocab, ignore_index,
                                                                 loss.data<Acc<T>>());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return loss;
}

namespace {

// d(logits) = (softmax - onehot(target)) * dloss / count into `dl`, which may be the logits
// themselves: each thread reads a logit and then writes its gradient in the same place.
void cross_entropy_backward_into(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                 const Backend::CrossEntropyRows& rows, Tensor& dl) {
  set_device_of(logits);
  REMAT_CHECK(dloss.dtype() == accumulation_dtype(logits.dtype()), "cross_entropy_backward: expected the loss's gradient in ",
              dtype_name(accumulation_dtype(logits.dtype())), " for ", dtype_name(logits.dtype()), " logits, got ",
              dtype_name(dloss.dtype()));
  int64_t n = logits.size(0), v = logits.size(1), ignore_index = rows.ignore_index;
  bool on_host = index_checks_on_host();
  if (on_host) check_targets_on_host(targets, v, ignore_index, rows.first_row);
  if (n == 0) return;
  IndexFault* fault = on_host ? nullptr : index_fault_record(logits.device().index);
  const Tensor& batch = rows.batch_targets.defined() ? rows.batch_targets : targets;
  Tensor count = empty_workspace({1}, DType::i64, logits.device());
  auto* counted = reinterpret_cast<long long*>(count.data<int64_t>());
  REMAT_LAUNCH(1, kThreads, 0, cross_entropy_count_kernel)(batch.raw_data(), batch.dtype() == DType::i64,
                                                           batch.numel(), v, ignore_index, counted);
  bool is64 = targets.dtype() == DType::i64;
  dispatch(logits.dtype(), "cross_entropy_backward", [&]<typename T>() {
    REMAT_LAUNCH(grid_of(n, "cross_entropy_backward"), kThreads, 0, cross_entropy_backward_kernel<T>)(
        dloss.data<Acc<T>>(), logits.data<T>(), targets.raw_data(), is64, lse.data<Acc<T>>(), v, ignore_index,
        rows.first_row, counted, dl.data<T>(), fault);
  });
  REMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

Tensor CudaBackend::cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                                           const Tensor& lse, const CrossEntropyRows& rows) {
  set_device_of(logits);
  Tensor dl = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
  cross_entropy_backward_into(dloss, logits, targets, lse, rows, dl);
  return dl;
}

bool CudaBackend::cross_entropy_backward_in_place(const Tensor& dloss, Tensor& logits, const Tensor& targets,
                                                  const Tensor& lse, const CrossEntropyRows& rows) {
  cross_entropy_backward_into(dloss, logits, targets, lse, rows, logits);
  logits.storage()->bump_version();
  return true;
}

}  // namespace remat
