// CPU GEMM through Eigen: batched matmul with transposed operands, and linear (GEMM + bias).
#include <Eigen/Core>

#include "kernels/cpu/cpu_backend.h"

namespace remat {

namespace {

template <typename T>
using RowMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using ConstMap = Eigen::Map<const RowMajor<T>>;
template <typename T>
using Map = Eigen::Map<RowMajor<T>>;

// C = op(A) op(B) for one matrix pair; A is stored [rows_a, cols_a] as given.
template <typename T>
void gemm(const T* a, int64_t ra, int64_t ca, bool ta, const T* b, int64_t rb, int64_t cb, bool tb, T* c) {
  ConstMap<T> A(a, ra, ca), B(b, rb, cb);
  int64_t m = ta ? ca : ra, n = tb ? rb : cb;
  Map<T> C(c, m, n);
  if (!ta && !tb) C.noalias() = A * B;
  else if (ta && !tb) C.noalias() = A.transpose() * B;
  else if (!ta && tb) C.noalias() = A * B.transpose();
  else C.noalias() = A.transpose() * B.transpose();
}

}  // namespace

Tensor CpuBackend::matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  int64_t ra = a.size(-2), ca = a.size(-1), rb = b.size(-2), cb = b.size(-1);
  int64_t m = trans_a ? ca : ra, n = trans_b ? rb : cb;
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = Tensor::empty(out_shape, a.dtype());
  int64_t batch = a.numel() / (ra * ca == 0 ? 1 : ra * ca);
  bool shared_b = b.dim() == 2;
  cpu::dispatch_float(a.dtype(), "matmul", [&]<typename T>() {
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* pc = out.data<T>();
    if (batch == 1) {
      gemm(pa, ra, ca, trans_a, pb, rb, cb, trans_b, pc);  // Eigen threads the large single GEMM itself
      return;
    }
    // Many small GEMMs: one per thread (Eigen stays single-threaded inside a parallel region).
#pragma omp parallel for if (batch * m * n > cpu::kParallelGrain)
    for (int64_t i = 0; i < batch; ++i)
      gemm(pa + i * ra * ca, ra, ca, trans_a, pb + (shared_b ? 0 : i * rb * cb), rb, cb, trans_b, pc + i * m * n);
  });
  return out;
}

Tensor CpuBackend::linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  int64_t in = x.size(-1), rows = x.numel() / (in == 0 ? 1 : in), out_features = w.size(0);
  Shape out_shape = x.shape();
  out_shape.back() = out_features;
  Tensor y = Tensor::empty(out_shape, x.dtype());
  cpu::dispatch_float(x.dtype(), "linear", [&]<typename T>() {
    ConstMap<T> X(x.data<T>(), rows, in), W(w.data<T>(), out_features, in);
    Map<T> Y(y.data<T>(), rows, out_features);
    Y.noalias() = X * W.transpose();
    if (b.defined()) {
      Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> bias(b.data<T>(), out_features);
      Y.rowwise() += bias;
    }
  });
  return y;
}

}  // namespace remat
