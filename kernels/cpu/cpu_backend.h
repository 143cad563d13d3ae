// The CPU backend: Eigen for GEMM, plain loops with OpenMP for the rest. Deterministic: every
// reduction runs in a fixed order, threads only split independent outputs.
#pragma once

#include "../backend.h"

namespace remat {

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  bool supports(OpKind) const override { return true; }
  bool attention_reads_strided() const override { return true; }
  bool unary_backward_in_place(UnaryFn fn, Tensor& dy, const Tensor& x, const Tensor& y, double scalar) override;

  REMAT_BACKEND_KERNELS(override)
};

namespace cpu {

// Runs f.template operator()<T>() with T = float or double for the tensor's dtype.
template <typename F>
decltype(auto) dispatch_float(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    default: REMAT_FAIL(op, ": the cpu backend computes in f32 or f64, got ", dtype_name(dtype));
  }
}

// Reads index i of an i32 or i64 tensor.
inline int64_t index_at(const Tensor& idx, int64_t i) {
  return idx.dtype() == DType::i64 ? idx.data<int64_t>()[i] : idx.data<int32_t>()[i];
}

// OpenMP only pays off above a few thousand elements of work.
inline constexpr int64_t kParallelGrain = 1 << 14;

}  // namespace cpu
}  // namespace remat
