// The CPU backend: Eigen for GEMM, plain loops with OpenMP for the rest. Deterministic: every
// reduction runs in a fixed order, threads only split independent outputs.
#pragma once

#include "kernels/backend.h"

namespace remat {

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  bool supports(OpKind) const override { return true; }

  Tensor unary(UnaryFn fn, const Tensor& x, double scalar) override;
  Tensor unary_backward(UnaryFn fn, const Tensor& dy, const Tensor& x, const Tensor& y, double scalar) override;
  Tensor binary(BinaryFn fn, const Tensor& a, const Tensor& b) override;
  Tensor reduce_sum(const Tensor& x, const std::vector<int64_t>& axes) override;
  Tensor reduce_max(const Tensor& x, const std::vector<int64_t>& axes) override;
  Tensor reduce_max_backward(const Tensor& dy, const Tensor& x, const Tensor& y) override;
  Tensor copy_strided(const Tensor& x) override;
  void copy_into_slice(Tensor& dst, const Tensor& src, int64_t axis, int64_t start) override;
  Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) override;
  Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) override;
  std::vector<Tensor> layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) override;
  std::vector<Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                                          const Tensor& rstd) override;
  Tensor softmax(const Tensor& x) override;
  Tensor softmax_backward(const Tensor& dy, const Tensor& y) override;
  std::vector<Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) override;
  std::vector<Tensor> attention_backward(const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& o, const Tensor& lse, bool causal, double scale) override;
  Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset) override;
  Tensor embedding(const Tensor& idx, const Tensor& weight) override;
  Tensor embedding_backward(const Tensor& dy, const Tensor& idx, int64_t vocab) override;
  std::vector<Tensor> cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) override;
  Tensor cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                int64_t ignore_index) override;
  Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) override;
  std::vector<Tensor> conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride, int padding,
                                      bool has_bias) override;
  std::vector<Tensor> group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, double eps) override;
  std::vector<Tensor> group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                                          const Tensor& rstd, int groups) override;
  Tensor upsample_nearest(const Tensor& x, int factor) override;
  Tensor upsample_nearest_backward(const Tensor& dy, int factor) override;
  Tensor avg_pool(const Tensor& x, int factor) override;
  Tensor avg_pool_backward(const Tensor& dy, int factor) override;
  Tensor modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) override;
  std::vector<Tensor> modulate_backward(const Tensor& dy, const Tensor& x, const Tensor& scale) override;
  Tensor timestep_embedding(const Tensor& t, int dim, double max_period) override;
  Tensor timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) override;
  Tensor cast(const Tensor& x, DType dtype) override;
  void adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s) override;
  double sum_squares(const Tensor& x) override;
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
