// The CUDA backend: own kernels for every op, cuBLAS for GEMM, cuDNN for convolutions. Deterministic:
// reductions run in a fixed order (no atomics), cuBLAS uses a fixed workspace, cuDNN fixed algorithms.
// Host-only header: the kernels live in the .cu files beside it.
#pragma once

#include "kernels/backend.h"

namespace remat {

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }
  bool supports(OpKind op) const override;

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

// Shared by the .cu files: makes the tensor's GPU the current device before a launch.
namespace cuda {
void set_device_of(const Tensor& t);
}  // namespace cuda
}  // namespace remat
