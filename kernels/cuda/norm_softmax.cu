// CUDA row kernels: layer_norm and group_norm forward/backward, softmax, fused cross-entropy.
// One block per row (or group) with block reductions; parameter gradients sum row chunks into
// partials and then the partials in order, so every sum has a fixed order.
#include <algorithm>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "runtime/cuda/index_faults.h"

namespace remat {

namespace {

using namespace cuda;

constexpr int kRowThreads = 128;
constexpr int64_t kRowChunk = 256;      // rows per partial sum of a parameter gradient (at least)
constexpr int64_t kMaxGridY = 65535;    // the grid's y extent, where those partials are laid out

DType acc_dtype(DType t) { return t == DType::f64 ? DType::f64 : DType::f32; }

Tensor workspace(const Shape& shape, DType dtype, Device device) {
  MemoryCategoryScope scope(MemoryCategory::workspace);
  return Tensor::empty(shape, dtype, device);
}

unsigned grid_of(int64_t rows, const char* op) {
  REMAT_CHECK(rows <= INT32_MAX, op, ": ", rows, " rows exceed the cuda grid");
  return static_cast<unsigned>(rows);
}

// ---- shared by layer_norm and group_norm ----------------------------------------------------

// Mean and 1 / sqrt(variance + eps) of the n values at x, by the whole block (two passes).
template <typename T>
__device__ void block_mean_rstd(const T* x, int64_t n, Acc<T> eps, Acc<T>* scratch, Acc<T>& mu, Acc<T>& rs) {
  using A = Acc<T>;
  A s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += load(x, i);
  mu = block_sum(s, scratch) / static_cast<A>(n);
  A v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A d = load(x, i) - mu;
    v += d * d;
  }
  rs = A(1) / sqrt(block_sum(v, scratch) / static_cast<A>(n) + eps);
}

// dx of a normalisation over the n values at x: rstd * (d - mean(d) - xhat * mean(d * xhat)) with
// d = dy * w[channel(i)], by the whole block.
template <typename T, typename Channel>
__device__ void block_norm_dx(const T* dy, const T* x, const T* w, Acc<T> mu, Acc<T> rs, T* dx, int64_t n,
                              Channel channel, Acc<T>* scratch) {
  using A = Acc<T>;
  A s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A xhat = (load(x, i) - mu) * rs, d = load(dy, i) * load(w, channel(i));
    s1 += d;
    s2 += d * xhat;
  }
  A mean_d = block_sum(s1, scratch) / static_cast<A>(n);
  A mean_dx = block_sum(s2, scratch) / static_cast<A>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A xhat = (load(x, i) - mu) * rs, d = load(dy, i) * load(w, channel(i));
    dx[i] = cast_to<T>(rs * (d - mean_d - xhat * mean_dx));
  }
}

// ---- layer_norm -------------------------------------------------------------------------------

template <typename T>
__global__ void layer_norm_kernel(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t c, Acc<T> eps) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* row = x + blockIdx.x * c;
  A mu, rs;
  block_mean_rstd(row, c, eps, scratch, mu, rs);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x)
    y[blockIdx.x * c + i] = cast_to<T>((load(row, i) - mu) * rs * load(w, i) + load(b, i));
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = cast_to<T>(mu);
    rstd[blockIdx.x] = cast_to<T>(rs);
  }
}

template <typename T>
__global__ void layer_norm_dx_kernel(const T* dy, const T* x, const T* w, const T* mean, const T* rstd, T* dx, int64_t c) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  int64_t base = blockIdx.x * c;
  block_norm_dx(dy + base, x + base, w, load(mean, blockIdx.x), load(rstd, blockIdx.x), dx + base, c,
                [](int64_t i) { return i; }, scratch);
}

// partial_w/b[chunk, channel]: sums over the chunk's rows, in row order.
template <typename T>
__global__ void layer_norm_param_partial_kernel(const T* dy, const T* x, const T* mean, const T* rstd, int64_t rows,
                                                int64_t c, int64_t row_chunk, Acc<T>* partial_w, Acc<T>* partial_b) {
  using A = Acc<T>;
  int64_t ch = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ch >= c) return;
  int64_t r0 = blockIdx.y * row_chunk, r1 = min(rows, r0 + row_chunk);
  A sw = 0, sb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    A g = load(dy, r * c + ch);
    sw += g * (load(x, r * c + ch) - load(mean, r)) * load(rstd, r);
    sb += g;
  }
  partial_w[blockIdx.y * c + ch] = sw;
  partial_b[blockIdx.y * c + ch] = sb;
}

template <typename T>
__global__ void sum_chunks_kernel(const Acc<T>* partial_w, const Acc<T>* partial_b, int64_t chunks, int64_t c, T* dw,
                                  T* db) {
  REMAT_GRID_STRIDE(ch, c) {
    Acc<T> sw = 0, sb = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      sw += partial_w[k * c + ch];
      sb += partial_b[k * c + ch];
    }
    dw[ch] = cast_to<T>(sw);
    db[ch] = cast_to<T>(sb);
  }
}

// ---- softmax ----------------------------------------------------------------------------------

template <typename T>
__global__ void softmax_kernel(const T* x, T* y, int64_t c) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* row = x + blockIdx.x * c;
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) mx = max(mx, load(row, i));
  mx = block_max(mx, scratch);
  A s = 0;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) s += exp(load(row, i) - mx);
  s = block_sum(s, scratch);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) y[blockIdx.x * c + i] = cast_to<T>(exp(load(row, i) - mx) / s);
}

template <typename T>
__global__ void softmax_backward_kernel(const T* dy, const T* y, T* dx, int64_t c) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  int64_t base = blockIdx.x * c;
  A dot = 0;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) dot += load(dy, base + i) * load(y, base + i);
  dot = block_sum(dot, scratch);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x)
    dx[base + i] = cast_to<T>(load(y, base + i) * (load(dy, base + i) - dot));
}

// ---- group_norm: groups of C/G channels are contiguous in [N, C, H, W] -------------------------

template <typename T>
__global__ void group_norm_kernel(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t m, int64_t hw,
                                  int groups, int64_t cg, Acc<T> eps) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* g = x + blockIdx.x * m;
  A mu, rs;
  block_mean_rstd(g, m, eps, scratch, mu, rs);
  int64_t c0 = (blockIdx.x % groups) * cg;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    int64_t ch = c0 + i / hw;
    y[blockIdx.x * m + i] = cast_to<T>((load(g, i) - mu) * rs * load(w, ch) + load(b, ch));
  }
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = cast_to<T>(mu);
    rstd[blockIdx.x] = cast_to<T>(rs);
  }
}

template <typename T>
__global__ void group_norm_dx_kernel(const T* dy, const T* x, const T* w, const T* mean, const T* rstd, T* dx, int64_t m,
                                     int64_t hw, int groups, int64_t cg) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  int64_t base = blockIdx.x * m, c0 = (blockIdx.x % groups) * cg;
  block_norm_dx(dy + base, x + base, w, load(mean, blockIdx.x), load(rstd, blockIdx.x), dx + base, m,
                [c0, hw](int64_t i) { return c0 + i / hw; }, scratch);
}

// One block per channel: sums over images and positions.
template <typename T>
__global__ void group_norm_param_kernel(const T* dy, const T* x, const T* mean, const T* rstd, int64_t n, int64_t c,
                                        int64_t hw, int groups, int64_t cg, T* dw, T* db) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  int64_t ch = blockIdx.x, g = ch / cg;
  A sw = 0, sb = 0;
  for (int64_t j = threadIdx.x; j < n * hw; j += blockDim.x) {
    int64_t img = j / hw, at = (img * c + ch) * hw + j % hw;
    A d = load(dy, at);
    sw += d * (load(x, at) - load(mean, img * groups + g)) * load(rstd, img * groups + g);
    sb += d;
  }
  sw = block_sum(sw, scratch);
  sb = block_sum(sb, scratch);
  if (threadIdx.x == 0) {
    dw[ch] = cast_to<T>(sw);
    db[ch] = cast_to<T>(sb);
  }
}

// ---- cross_entropy ----------------------------------------------------------------------------

__device__ __forceinline__ int64_t target_at(const void* targets, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(targets)[i] : static_cast<const int32_t*>(targets)[i];
}

// A target is used when it is in [0, v); ignore_index rows count for nothing, and a bad target is
// reported (with a record) and then treated like ignore_index.
__device__ __forceinline__ bool target_used(int64_t t, int64_t v, int64_t ignore_index, int64_t row, IndexFault* fault,
                                            IndexFaultOp op) {
  if (t >= 0 && t < v && t != ignore_index) return true;
  if (t != ignore_index && fault != nullptr) report_index_fault(fault, op, t, row, v, ignore_index);
  return false;
}

template <typename T>
__global__ void cross_entropy_rows_kernel(const T* logits, const void* targets, bool is64, int64_t v,
                                          int64_t ignore_index, Acc<T>* lse, Acc<T>* row_loss, IndexFault* fault) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* row = logits + blockIdx.x * v;
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) mx = max(mx, load(row, j));
  mx = block_max(mx, scratch);
  A s = 0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) s += exp(load(row, j) - mx);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    A l = mx + log(s);
    lse[blockIdx.x] = l;
    int64_t t = target_at(targets, is64, blockIdx.x);
    bool used = target_used(t, v, ignore_index, blockIdx.x, fault, IndexFaultOp::cross_entropy);
    row_loss[blockIdx.x] = used ? l - load(row, t) : A(0);
  }
}

// The rows whose targets count, on the GPU: the mean's divisor without a copy to the host.
__device__ long long used_targets(const void* targets, bool is64, int64_t n, int64_t v, int64_t ignore_index,
                                  long long* scratch) {
  long long count = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t t = target_at(targets, is64, i);
    count += t >= 0 && t < v && t != ignore_index;
  }
  return block_sum(count, scratch);
}

template <typename T>
__global__ void cross_entropy_mean_kernel(const Acc<T>* row_loss, const void* targets, bool is64, int64_t n, int64_t v,
                                          int64_t ignore_index, T* loss) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  REMAT_REDUCE_SCRATCH(long long, counts);
  A s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += row_loss[i];
  s = block_sum(s, scratch);
  long long count = used_targets(targets, is64, n, v, ignore_index, counts);
  // All rows ignored: the mean is 0/0; PyTorch returns NaN, so do we.
  if (threadIdx.x == 0) loss[0] = cast_to<T>(count ? s / static_cast<A>(count) : std::numeric_limits<A>::quiet_NaN());
}

__global__ void cross_entropy_count_kernel(const void* targets, bool is64, int64_t n, int64_t v, int64_t ignore_index,
                                           long long* count) {
  REMAT_REDUCE_SCRATCH(long long, counts);
  long long c = used_targets(targets, is64, n, v, ignore_index, counts);
  if (threadIdx.x == 0) *count = c;
}

template <typename T>
__global__ void cross_entropy_backward_kernel(const T* dloss, const T* logits, const void* targets, bool is64,
                                              const Acc<T>* lse, int64_t v, int64_t ignore_index, const long long* count,
                                              T* dl, IndexFault* fault) {
  using A = Acc<T>;
  int64_t t = target_at(targets, is64, blockIdx.x);
  bool used = target_used(t, v, ignore_index, blockIdx.x, threadIdx.x == 0 ? fault : nullptr,
                          IndexFaultOp::cross_entropy_backward);
  T* row = dl + blockIdx.x * v;
  A g = load(dloss, 0) / static_cast<A>(*count ? *count : 1);
  A l = lse[blockIdx.x];
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    if (!used) row[j] = cast_to<T>(A(0));
    else row[j] = cast_to<T>(exp(load(logits, blockIdx.x * v + j) - l) * g - (j == t ? g : A(0)));
  }
}

// The reference path (REMAT_CUDA_INDEX_CHECK=host): targets checked on the host, the error at the op.
void check_targets_on_host(const Tensor& targets, int64_t v, int64_t ignore_index) {
  std::vector<int64_t> host = targets.to_vector<int64_t>();
  for (size_t i = 0; i < host.size(); ++i) {
    int64_t t = host[i];
    REMAT_CHECK(t == ignore_index || (t >= 0 && t < v), "cross_entropy: expected targets in [0, ", v,
                ") or ignore_index ", ignore_index, ", got ", t, " at row ", i);
  }
}

}  // namespace

std::vector<Tensor> CudaBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
  set_device_of(x);
  int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  Shape stat_shape(x.shape().begin(), x.shape().end() - 1);
  Tensor mean = Tensor::empty(stat_shape, x.dtype(), x.device()), rstd = Tensor::empty(stat_shape, x.dtype(), x.device());
  if (rows == 0) return {y, mean, rstd};
  dispatch(x.dtype(), "layer_norm", [&]<typename T>() {
    layer_norm_kernel<T><<<grid_of(rows, "layer_norm"), kRowThreads>>>(x.data<T>(), w.data<T>(), b.data<T>(), y.data<T>(),
                                                                       mean.data<T>(), rstd.data<T>(), c,
                                                                       static_cast<Acc<T>>(eps));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::vector<Tensor> CudaBackend::layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                     const Tensor& mean, const Tensor& rstd) {
  set_device_of(x);
  int64_t c = x.size(-1), rows = c == 0 ? 0 : x.numel() / c;
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor dw = Tensor::zeros(w.shape(), x.dtype(), x.device()), db = Tensor::zeros(w.shape(), x.dtype(), x.device());
  if (rows == 0) return {dx, dw, db};
  // Fixed-size chunks of rows, larger ones only past 65535 * 256 rows: the order of each sum
  // depends on the shape alone.
  int64_t row_chunk = std::max(kRowChunk, (rows + kMaxGridY - 1) / kMaxGridY);
  int64_t chunks = (rows + row_chunk - 1) / row_chunk;
  Tensor pw = workspace({chunks, c}, acc_dtype(x.dtype()), x.device()), pb = workspace({chunks, c}, acc_dtype(x.dtype()), x.device());
  dispatch(x.dtype(), "layer_norm_backward", [&]<typename T>() {
    using A = Acc<T>;
    layer_norm_dx_kernel<T><<<grid_of(rows, "layer_norm_backward"), kRowThreads>>>(
        dy.data<T>(), x.data<T>(), w.data<T>(), mean.data<T>(), rstd.data<T>(), dx.data<T>(), c);
    dim3 grid(static_cast<unsigned>((c + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
    layer_norm_param_partial_kernel<T><<<grid, kThreads>>>(dy.data<T>(), x.data<T>(), mean.data<T>(), rstd.data<T>(),
                                                           rows, c, row_chunk, pw.data<A>(), pb.data<A>());
    sum_chunks_kernel<T><<<blocks_for(c), kThreads>>>(pw.data<A>(), pb.data<A>(), chunks, c, dw.data<T>(), db.data<T>());
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
    softmax_kernel<T><<<grid_of(rows, "softmax"), kRowThreads>>>(x.data<T>(), y.data<T>(), c);
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
    softmax_backward_kernel<T><<<grid_of(rows, "softmax_backward"), kRowThreads>>>(dy.data<T>(), y.data<T>(), dx.data<T>(), c);
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
    group_norm_kernel<T><<<grid_of(n * groups, "group_norm"), kThreads>>>(x.data<T>(), w.data<T>(), b.data<T>(), y.data<T>(),
                                                                         mean.data<T>(), rstd.data<T>(), m, hw, groups,
                                                                         cg, static_cast<Acc<T>>(eps));
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
    group_norm_dx_kernel<T><<<grid_of(n * groups, "group_norm_backward"), kThreads>>>(
        dy.data<T>(), x.data<T>(), w.data<T>(), mean.data<T>(), rstd.data<T>(), dx.data<T>(), m, hw, groups, cg);
    group_norm_param_kernel<T><<<grid_of(c, "group_norm_backward"), kThreads>>>(
        dy.data<T>(), x.data<T>(), mean.data<T>(), rstd.data<T>(), n, c, hw, groups, cg, dw.data<T>(), db.data<T>());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {dx, dw, db};
}

std::vector<Tensor> CudaBackend::cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  set_device_of(logits);
  int64_t n = logits.size(0), v = logits.size(1);
  bool on_host = index_checks_on_host();
  if (on_host) check_targets_on_host(targets, v, ignore_index);
  IndexFault* fault = on_host ? nullptr : index_fault_record(logits.device().index);
  // The log-sum-exp in the accumulation type: bf16 would round it before exp(logit - lse) in backward.
  Tensor lse = Tensor::empty({n}, acc_dtype(logits.dtype()), logits.device());
  Tensor loss = Tensor::empty({}, logits.dtype(), logits.device());
  Tensor row_loss = workspace({n}, acc_dtype(logits.dtype()), logits.device());
  bool is64 = targets.dtype() == DType::i64;
  dispatch(logits.dtype(), "cross_entropy", [&]<typename T>() {
    if (n > 0)
      cross_entropy_rows_kernel<T><<<grid_of(n, "cross_entropy"), kThreads>>>(
          logits.data<T>(), targets.raw_data(), is64, v, ignore_index, lse.data<Acc<T>>(), row_loss.data<Acc<T>>(), fault);
    cross_entropy_mean_kernel<T><<<1, kThreads>>>(row_loss.data<Acc<T>>(), targets.raw_data(), is64, n, v, ignore_index,
                                                  loss.data<T>());
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {loss, lse};
}

Tensor CudaBackend::cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                                           const Tensor& lse, int64_t ignore_index) {
  set_device_of(logits);
  int64_t n = logits.size(0), v = logits.size(1);
  bool on_host = index_checks_on_host();
  if (on_host) check_targets_on_host(targets, v, ignore_index);
  Tensor dl = Tensor::empty(logits.shape(), logits.dtype(), logits.device());
  if (n == 0) return dl;
  IndexFault* fault = on_host ? nullptr : index_fault_record(logits.device().index);
  Tensor count = workspace({1}, DType::i64, logits.device());
  bool is64 = targets.dtype() == DType::i64;
  auto* counted = reinterpret_cast<long long*>(count.data<int64_t>());
  cross_entropy_count_kernel<<<1, kThreads>>>(targets.raw_data(), is64, n, v, ignore_index, counted);
  dispatch(logits.dtype(), "cross_entropy_backward", [&]<typename T>() {
    cross_entropy_backward_kernel<T><<<grid_of(n, "cross_entropy_backward"), kThreads>>>(
        dloss.data<T>(), logits.data<T>(), targets.raw_data(), is64, lse.data<Acc<T>>(), v, ignore_index, counted,
        dl.data<T>(), fault);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dl;
}

}  // namespace remat
