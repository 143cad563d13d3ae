// Mixed precision: inside an AutocastScope, GEMM-like ops (linear, matmul, attention, conv2d) cast
// their f32 inputs to the compute dtype (bf16 on GPUs), normalisations, softmax and the loss run
// in f32, and a binary op on two floating dtypes computes in the wider one (add and sub of f32 and
// bf16 of one shape without a cast node where the backend widens in its kernel). Parameters, their
// gradients and the optimizer stay f32 (master weights); the casts are ops on the tape, so
// checkpoint replays repeat them exactly. linear in bf16 (and matmul by a 2-D f32 weight) takes
// f32 weights as they are and casts them inside its node (autograd/ops/matmul.cpp says why). A
// norm that only feeds GEMMs may return the compute dtype itself (AutocastOutput in ops.h), and
// dropout_add adds a bf16 branch to an f32 residual as add does: the casts' bits without them.
#pragma once

#include <string>

#include "../runtime/tensor.h"

namespace remat {

// The compute dtype of ops recorded on this thread; f32 when no scope is active.
DType autocast_dtype();
bool autocast_active();

class AutocastScope {
 public:
  // `dtype` must be floating; f32 switches autocast off inside the scope.
  explicit AutocastScope(DType dtype);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  DType previous_;
};

// "f32" or "bf16" (the CLI's --dtype); bf16 needs a cuda device, the CPU kernels compute in f32/f64.
DType parse_compute_dtype(const std::string& text, Device device);

namespace detail {
// For GEMM-like ops: f32 tensors in the compute dtype (others, and undefined ones, unchanged).
Tensor autocast_compute(const Tensor& t);
// For precision-sensitive ops: tensors of the compute dtype back in f32.
Tensor autocast_full(const Tensor& t);
// For binary ops: both in the wider floating dtype when they differ and autocast is active.
void autocast_match(Tensor& a, Tensor& b);
}  // namespace detail

}  // namespace remat
