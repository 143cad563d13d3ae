// The kernel interface every backend implements (CPU now, CUDA in kernels/cuda/). Dispatch is an
// explicit switch on the device in backend_for(); a backend lacking an op says so in supports().
// Kernels take contiguous inputs (callers make them so) and return new contiguous tensors.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "op_list.h"
#include "../runtime/tensor.h"

namespace remat {

enum class UnaryFn : uint8_t { add_scalar, mul_scalar, pow_scalar, neg, exp, log, tanh, sqrt, rsqrt, relu, gelu, silu, sigmoid };
enum class BinaryFn : uint8_t { add, sub, mul, div };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual bool supports(OpKind op) const = 0;
  // Whether attention and its backward take q, k, v, o and dO as strided views (unit stride over D
  // only; else the caller passes contiguous copies). Such a backend may return o (and the
  // gradients) as [B, H, T, D] views of [B, T, H, D] memory, so that merging the heads needs no
  // copy: the CPU's kernel and CUDA's tensor-core kernels do.
  virtual bool attention_reads_strided() const { return false; }

  // Elementwise. unary_backward returns dy * f'(x), reading x or y = f(x), whichever f needs.
  virtual Tensor unary(UnaryFn fn, const Tensor& x, double scalar) = 0;
  virtual Tensor unary_backward(UnaryFn fn, const Tensor& dy, const Tensor& x, const Tensor& y, double scalar) = 0;
  // The same, written over dy (the caller holds dy's storage alone); false where this backend
  // does not, and then dy is untouched.
  virtual bool unary_backward_in_place(UnaryFn, Tensor& /*dy*/, const Tensor& /*x*/, const Tensor& /*y*/, double) {
    return false;
  }
  // Broadcasting binary op; strided (broadcast) inputs allowed. a and b of one dtype; or, where
  // binary_mixes_dtypes(), contiguous f32 and bf16 of one shape (either first), the result f32 with
  // the bits of casting the bf16 one to f32 first: autocast's residual additions, without the cast.
  virtual Tensor binary(BinaryFn fn, const Tensor& a, const Tensor& b) = 0;
  virtual bool binary_mixes_dtypes() const { return false; }

  // Reductions over `axes` (sorted, unique) keeping them as size-1 dims.
  virtual Tensor reduce_sum(const Tensor& x, const std::vector<int64_t>& axes) = 0;
  // The same sum in x's accumulation dtype: for bf16 x an f32 result, rounded once (linear's bias
  // gradient under autocast). A backend without bf16 arithmetic (the CPU's) sums in x's dtype,
  // which is then its accumulation dtype.
  virtual Tensor reduce_sum_accumulated(const Tensor& x, const std::vector<int64_t>& axes) { return reduce_sum(x, axes); }
  virtual Tensor reduce_max(const Tensor& x, const std::vector<int64_t>& axes) = 0;
  // dx for max: dy spread evenly over the positions that attain the max.
  virtual Tensor reduce_max_backward(const Tensor& dy, const Tensor& x, const Tensor& y) = 0;

  // A contiguous copy of any strided view (permute, expand, slice).
  virtual Tensor copy_strided(const Tensor& x) = 0;
  // Writes `src` into the slice [start, start + src.size(axis)) of `dst` along `axis`.
  virtual void copy_into_slice(Tensor& dst, const Tensor& src, int64_t axis, int64_t start) = 0;

  // C[..., M, N] = op(A)[..., M, K] @ op(B)[..., K, N]; batch dims of A and B equal, or B 2-D.
  virtual Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) = 0;
  // c[M, N] = op(a) op(b) for 2-D a and b, written into c, or added to it (`accumulate`): c in a's
  // dtype or, for bf16 a and b, in f32 (a sum over chunks of K with one rounding at the end:
  // linear_cross_entropy's dW). The same bits as matmul where c is a's dtype and nothing is added.
  virtual void matmul_into(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool accumulate) = 0;
  // y[R, O] = x[R, I] W[O, I]^T + b[O] (b may be undefined).
  virtual Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) = 0;
  // linear's f32 parameter gradients from dy[R, O] and x[R, I] (f32, or bf16 under autocast with
  // f32 weights): {dW[O, I] = dy^T x, db[O] = the column sums of dy}. By default matmul_into and
  // reduce_sum_accumulated, the bits of each computed alone; the CUDA backend may take both from one
  // GEMM (set_cuda_bias_grad_epilogue).
  virtual std::pair<Tensor, Tensor> linear_weight_bias_grads(const Tensor& dy, const Tensor& x);

  // Rows of C channels: y, mean[R], rstd[R]; y in `out` (x's dtype, or autocast's compute dtype),
  // the bits of a cast of the result in x's dtype.
  virtual std::vector<Tensor> layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, DType out) = 0;
  // dx, dw, db; dy in any floating dtype, the bits of casting it to x's dtype first. With
  // `dx_into` (x's dtype and shape, contiguous) dx is added into it, as dx_into + dx with the bits
  // of that addition, and returned in its place (BackwardContext::take_partial_grad).
  virtual std::vector<Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const Tensor& dx_into = Tensor()) = 0;
  virtual Tensor softmax(const Tensor& x) = 0;  // over the last axis
  virtual Tensor softmax_backward(const Tensor& dy, const Tensor& y) = 0;

  // q, k, v [B, H, T, D] -> o [B, H, T, D], lse [B, H, T].
  virtual std::vector<Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                        double scale) = 0;
  // dq, dk, dv.
  virtual std::vector<Tensor> attention_backward(const Tensor& d_o, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& o, const Tensor& lse,
                                                 bool causal, double scale) = 0;

  // y = x * keep / (1 - p), keep drawn from Philox (seed, offset); also the backward (same mask).
  // y in `out`: x's dtype, or a narrower one with the bits of casting x to it first (dropout_add's
  // backward: the f32 gradient of the sum, for a bf16 x).
  virtual Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, DType out) = 0;
  // residual + dropout(x) with dropout's mask: x and residual of one shape, contiguous, of one
  // dtype or (where binary_mixes_dtypes) bf16 x and f32 residual; y in residual's dtype, with the
  // bits of dropout and then add.
  virtual Tensor dropout_add(const Tensor& x, const Tensor& residual, double p, uint64_t seed, uint64_t offset) = 0;

  // out[..., C] = weight[idx[...], :]; backward accumulates rows in a fixed order.
  virtual Tensor embedding(const Tensor& idx, const Tensor& weight) = 0;
  virtual Tensor embedding_backward(const Tensor& dy, const Tensor& idx, int64_t vocab) = 0;

  // Cross-entropy, by rows so that a batch can come in chunks (linear_cross_entropy computes the
  // head's logits a chunk of rows at a time). `rows` names the chunk: error messages give the
  // batch's row, and the mean divides by the used rows of the batch's targets. The loss, row
  // losses, lse and dloss are in the logits' accumulation dtype (f32 for bf16 logits); the logits'
  // gradient in their own dtype. Rows whose target is ignore_index count neither in the loss nor
  // in the mean.
  struct CrossEntropyRows {
    int64_t ignore_index = -100;
    int64_t first_row = 0;  // the chunk's first row in the batch
    Tensor batch_targets;   // the batch's targets [N]; undefined: the call's own
  };
  // logits [R, V], targets [R] -> row_loss [R] (lse - logit of the target; 0 where ignored), lse [R].
  virtual std::vector<Tensor> cross_entropy_rows(const Tensor& logits, const Tensor& targets,
                                                 const CrossEntropyRows& rows) = 0;
  // The mean of the used rows' losses (a scalar); NaN when every row is ignored, as in PyTorch.
  virtual Tensor cross_entropy_mean(const Tensor& row_loss, const Tensor& targets, int64_t vocab,
                                    int64_t ignore_index) = 0;
  // logits [N, V], targets [N] -> mean loss (scalar) and lse [N]: rows, then their mean.
  std::vector<Tensor> cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index);
  // d(logits) = (softmax - onehot(target)) * dloss / (used rows of the batch).
  virtual Tensor cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                                        const Tensor& lse, const CrossEntropyRows& rows) = 0;
  // The same, written over the logits (the caller holds their storage alone); false where this
  // backend does not, and then the logits are untouched.
  virtual bool cross_entropy_backward_in_place(const Tensor& /*dloss*/, Tensor& /*logits*/, const Tensor& /*targets*/,
                                               const Tensor& /*lse*/, const CrossEntropyRows& /*rows*/) {
    return false;
  }

  // Images are [N, C, H, W]. conv2d: w [Cout, Cin, kh, kw], b [Cout] or undefined.
  virtual Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) = 0;
  // dx, dw, db (db undefined when has_bias is false).
  virtual std::vector<Tensor> conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                              int padding, bool has_bias) = 0;
  // y, mean [N, G], rstd [N, G]; statistics over each group of C/G channels and all positions.
  virtual std::vector<Tensor> group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, double eps) = 0;
  virtual std::vector<Tensor> group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                  const Tensor& mean, const Tensor& rstd, int groups) = 0;
  // Nearest-neighbour upsampling and average pooling by an integer factor (H, W divisible for pooling).
  virtual Tensor upsample_nearest(const Tensor& x, int factor) = 0;
  virtual Tensor upsample_nearest_backward(const Tensor& dy, int factor) = 0;
  virtual Tensor avg_pool(const Tensor& x, int factor) = 0;
  virtual Tensor avg_pool_backward(const Tensor& dy, int factor) = 0;
  // adaLN modulation: x [B, T, C], shift and scale [B, C]: y = x * (1 + scale) + shift.
  virtual Tensor modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) = 0;
  // dx, dshift, dscale.
  virtual std::vector<Tensor> modulate_backward(const Tensor& dy, const Tensor& x, const Tensor& scale) = 0;
  // t [B] -> [B, dim]: cos(t f_i) then sin(t f_i), f_i = max_period^(-i / (dim / 2)).
  virtual Tensor timestep_embedding(const Tensor& t, int dim, double max_period) = 0;
  virtual Tensor timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) = 0;

  // The same values in another floating dtype (f32, f64, bf16), rounding to nearest even.
  virtual Tensor cast(const Tensor& x, DType dtype) = 0;

  // Optimizer updates, in place on param and state (all f32 or all f64, contiguous).
  struct AdamWStep {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;  // 1-based, for bias correction
  };
  virtual void adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s) = 0;
  // Many parameters' updates at once, all on this backend's device, with the same bits as
  // adamw_update on each: the CPU loops over them, a GPU runs one kernel per chunk of tensors
  // (multi-tensor AdamW: a handful of launches a step instead of one per parameter).
  struct AdamWTensors {
    Tensor* param;
    const Tensor* grad;
    Tensor* m;
    Tensor* v;
    AdamWStep step;
    // Where given, param's bf16 copy (autocast's cache) gets the updated values, rounded as a cast
    // rounds them, in the same pass (param f32): no cast of the weight in the next forward.
    Tensor* compute_copy = nullptr;
  };
  virtual void adamw_update_all(const std::vector<AdamWTensors>& items);
  // Each tensor's sum of squares, accumulated in f64 (for global-norm gradient clipping); on a GPU
  // the sums come back to the host together, one synchronisation for all of them.
  virtual std::vector<double> sum_squares(const std::vector<Tensor>& xs) = 0;
  // Global-norm clipping without reading the norm, where the backend can (a GPU): in place, the
  // bits of clip_grad_norm (models/optim.h: the sums of squares added in order, the norm, and when
  // it exceeds max_norm each tensor times max_norm / (norm + 1e-6) in its dtype), the norm left in
  // `norm` (0-d f64 on the device). Returns false, touching nothing, where it cannot (the default):
  // the caller then clips on the host.
  virtual bool clip_by_total_norm(const std::vector<Tensor>& xs, double max_norm, Tensor& norm);
};

// The kernel methods of a backend class: REMAT_BACKEND_KERNELS(override) in its body, so that
// every backend declares the same set (a missing or mistyped one fails to compile).
#define REMAT_BACKEND_KERNELS(SPEC) \
  Tensor unary(UnaryFn fn, const Tensor& x, double scalar) SPEC; \
  Tensor unary_backward(UnaryFn fn, const Tensor& dy, const Tensor& x, const Tensor& y, double scalar) SPEC; \
  Tensor binary(BinaryFn fn, const Tensor& a, const Tensor& b) SPEC; \
  Tensor reduce_sum(const Tensor& x, const std::vector<int64_t>& axes) SPEC; \
  Tensor reduce_max(const Tensor& x, const std::vector<int64_t>& axes) SPEC; \
  Tensor reduce_max_backward(const Tensor& dy, const Tensor& x, const Tensor& y) SPEC; \
  Tensor copy_strided(const Tensor& x) SPEC; \
  void copy_into_slice(Tensor& dst, const Tensor& src, int64_t axis, int64_t start) SPEC; \
  Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) SPEC; \
  void matmul_into(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, bool accumulate) SPEC; \
  Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) SPEC; \
  std::vector<Tensor> layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps, DType out) SPEC; \
  std::vector<Tensor> layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd, const Tensor& dx_into) SPEC; \
  Tensor softmax(const Tensor& x) SPEC; \
  Tensor softmax_backward(const Tensor& dy, const Tensor& y) SPEC; \
  std::vector<Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) SPEC; \
  std::vector<Tensor> attention_backward(const Tensor& d_o, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& lse, bool causal, double scale) SPEC; \
  Tensor dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, DType out) SPEC; \
  Tensor dropout_add(const Tensor& x, const Tensor& residual, double p, uint64_t seed, uint64_t offset) SPEC; \
  Tensor embedding(const Tensor& idx, const Tensor& weight) SPEC; \
  Tensor embedding_backward(const Tensor& dy, const Tensor& idx, int64_t vocab) SPEC; \
  std::vector<Tensor> cross_entropy_rows(const Tensor& logits, const Tensor& targets, const CrossEntropyRows& rows) SPEC; \
  Tensor cross_entropy_mean(const Tensor& row_loss, const Tensor& targets, int64_t vocab, int64_t ignore_index) SPEC; \
  Tensor cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse, const CrossEntropyRows& rows) SPEC; \
  Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) SPEC; \
  std::vector<Tensor> conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride, int padding, bool has_bias) SPEC; \
  std::vector<Tensor> group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, double eps) SPEC; \
  std::vector<Tensor> group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd, int groups) SPEC; \
  Tensor upsample_nearest(const Tensor& x, int factor) SPEC; \
  Tensor upsample_nearest_backward(const Tensor& dy, int factor) SPEC; \
  Tensor avg_pool(const Tensor& x, int factor) SPEC; \
  Tensor avg_pool_backward(const Tensor& dy, int factor) SPEC; \
  Tensor modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) SPEC; \
  std::vector<Tensor> modulate_backward(const Tensor& dy, const Tensor& x, const Tensor& scale) SPEC; \
  Tensor timestep_embedding(const Tensor& t, int dim, double max_period) SPEC; \
  Tensor timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) SPEC; \
  Tensor cast(const Tensor& x, DType dtype) SPEC; \
  void adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s) SPEC; \
  std::vector<double> sum_squares(const std::vector<Tensor>& xs) SPEC;

// The CUDA kernels (kernels/cuda/), or null where remat has no CUDA part (not built, or its module
// did not load).
Backend* cuda_kernels();

// The backend of a device; throws when that backend is not built.
Backend& backend_for(Device device);

// Each tensor's sum of squares in f64 (0 for an undefined tensor), in order, through its device's
// backend: one read-back per device, not one per tensor (gradient clipping's terms).
std::vector<double> sum_squares_by_device(const std::vector<Tensor>& xs);

// AdamW updates of parameters on any devices: each device's through its backend's
// adamw_update_all, in the items' order.
void adamw_update_by_device(const std::vector<Backend::AdamWTensors>& items);
// Throws "<backend> has no kernel for op <name>" when the device's backend lacks the op.
Backend& backend_for(OpKind op, Device device);

}  // namespace remat
