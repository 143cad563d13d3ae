// The CUDA backend: own kernels for every op, cuBLAS for GEMM, cuDNN for convolutions (im2col + GEMM
// where cuDNN is absent or declines). Deterministic: reductions run in a fixed order (no atomics),
// cuBLAS uses a fixed workspace, cuDNN deterministic algorithms.
// Host-only header: the kernels live in the .cu files beside it.
#pragma once

#include "../backend.h"

namespace remat {

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }
  bool supports(OpKind op) const override;

  REMAT_BACKEND_KERNELS(override)
  // The tensor-core kernels read strided heads as they lie; the other paths copy them (attention.cu).
  bool attention_reads_strided() const override { return true; }
  Tensor reduce_sum_accumulated(const Tensor& x, const std::vector<int64_t>& axes) override;
  std::pair<Tensor, Tensor> linear_weight_bias_grads(const Tensor& dy, const Tensor& x) override;
  bool binary_mixes_dtypes() const override { return true; }
  void adamw_update_all(const std::vector<AdamWTensors>& items) override;
  bool clip_by_total_norm(const std::vector<Tensor>& xs, double max_norm, Tensor& norm) override;
  bool unary_backward_in_place(UnaryFn fn, Tensor& dy, const Tensor& x, const Tensor& y, double scalar) override;
  bool cross_entropy_backward_in_place(const Tensor& dloss, Tensor& logits, const Tensor& targets, const Tensor& lse,
                                       const CrossEntropyRows& rows) override;
};

// Shared by the .cu files: makes the tensor's GPU the current device before a launch.
namespace cuda {
void set_device_of(const Tensor& t);
}  // namespace cuda
}  // namespace remat
