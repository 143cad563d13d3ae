// CPU GEMM ops: batched matmul with transposed operands, and linear (GEMM + bias), on cpu::gemm.
#include <algorithm>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/gemm.h"

namespace remat {

Tensor CpuBackend::matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  int64_t ra = a.size(-2), ca = a.size(-1), rb = b.size(-2), cb = b.size(-1);
  int64_t m = trans_a ? ca : ra, n = trans_b ? rb : cb, k = trans_a ? ra : ca;
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
      cpu::gemm<T>(trans_a, trans_b, m, n, k, T(1), pa, ca, pb, cb, T(0), pc, n);  // threaded by the BLAS
      return;
    }
    if (shared_b && !trans_a) {
      // [batch * m, k] @ op(b): one GEMM with the batch folded into the rows.
      cpu::gemm<T>(false, trans_b, batch * m, n, k, T(1), pa, ca, pb, cb, T(0), pc, n);
      return;
    }
    // Many small GEMMs: one per thread (the BLAS stays single-threaded inside a parallel region).
#pragma omp parallel for if (batch * m * n > cpu::kParallelGrain)
    for (int64_t i = 0; i < batch; ++i)
      cpu::gemm<T>(trans_a, trans_b, m, n, k, T(1), pa + i * ra * ca, ca, pb + (shared_b ? 0 : i * rb * cb), cb, T(0),
                   pc + i * m * n, n);
  });
  return out;
}

void CpuBackend::matmul_into(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool accumulate) {
  REMAT_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && c.dtype() == a.dtype() && b.dtype() == a.dtype(),
              "matmul_into: expected 2-D a, b and c of one dtype on the cpu, got ", a.meta_str(), ", ", b.meta_str(),
              " and ", c.meta_str());
  int64_t ra = a.size(0), ca = a.size(1), cb = b.size(1);
  int64_t m = trans_a ? ca : ra, n = trans_b ? b.size(0) : cb, k = trans_a ? ra : ca;
  REMAT_CHECK(c.size(0) == m && c.size(1) == n, "matmul_into: expected c [", m, ", ", n, "], got ", c.meta_str());
  cpu::dispatch_float(a.dtype(), "matmul", [&]<typename T>() {
    cpu::gemm<T>(trans_a, trans_b, m, n, k, T(1), a.data<T>(), ca, b.data<T>(), cb, accumulate ? T(1) : T(0),
                 c.data<T>(), n);
  });
  c.storage()->bump_version();
}

Tensor CpuBackend::linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  int64_t in = x.size(-1), rows = x.numel() / (in == 0 ? 1 : in), out_features = w.size(0);
  Shape out_shape = x.shape();
  out_shape.back() = out_features;
  Tensor y = Tensor::empty(out_shape, x.dtype());
  cpu::dispatch_float(x.dtype(), "linear", [&]<typename T>() {
    T* py = y.data<T>();
    // y = x W^T (+ b), the bias added as the GEMM stores y where it can (gemm_bias).
    if (b.defined())
      cpu::gemm_bias<T>(false, true, rows, out_features, in, x.data<T>(), in, w.data<T>(), in, b.data<T>(), py,
                        out_features);
    else
      cpu::gemm<T>(false, true, rows, out_features, in, T(1), x.data<T>(), in, w.data<T>(), in, T(0), py, out_features);
  });
  return y;
}

}  // namespace remat
