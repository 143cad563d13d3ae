// matmul (batched, transposed operands) and linear (GEMM + bias), with their backward as GEMMs.
#include <algorithm>
#include <tuple>

#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

Tensor transpose_last(const Tensor& t) { return contiguous(transpose(t, -1, -2)); }

// C = op(A) op(B). Under bf16 autocast a 2-D f32 B with an untransposed A (a tied LM head, a
// projection by a parameter) comes in as it is, like linear's weight (LinearNode says why): cast
// as the node runs, its gradient in f32 from the GEMM.
class MatmulNode final : public Node {
 public:
  MatmulNode(bool ta, bool tb, DType compute, bool b_parameter)
      : ta_(ta), tb_(tb), compute_(compute), b_parameter_(b_parameter) {}
  OpKind kind() const override { return OpKind::matmul; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Backend& backend = backend_for(kind(), in[0].device());
    return {backend.matmul(detail::dense(in[0]), detail::in_dtype(backend, in[1], compute_, b_parameter_), ta_, tb_)};
  }
  std::vector<int> saved_indices(size_t) const override { return {0, 1}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    // C = op(A) op(B): d op(A) = dC op(B)^T, d op(B) = op(A)^T dC.
    Tensor g = detail::dense(ctx.grad_output(0));
    Tensor a = ctx.saved(0), b = ctx.saved(1);
    const bool master = b.dtype() != compute_;  // an f32 b computed in compute_ (2-D, a untransposed)
    Backend& backend = backend_for(kind(), g.device());
    Tensor ga, gb;
    if (ctx.needs_input_grad(0)) {
      Tensor d_op_a =
          master ? backend.matmul(g, detail::in_dtype(backend, b, compute_, b_parameter_), false, !tb_)
                 : matmul(g, b, false, !tb_);
      ga = ta_ ? transpose_last(d_op_a) : d_op_a;
    }
    if (ctx.needs_input_grad(1)) {
      if (b.dim() == 2 && !ta_) {
        // A 2-D b (shared by the batch when a has more axes: a tied head, a projection): one GEMM
        // over all rows, no per-batch temporary, and for op(b) = b^T no transposed copy either.
        // op(b) = b: db = a^T g; op(b) = b^T: db = g^T a (the GEMM linear_cross_entropy's dW runs).
        Tensor a2 = reshape(a, {-1, a.size(-1)}), g2 = reshape(g, {-1, g.size(-1)});
        if (master) {
          gb = Tensor::empty(b.shape(), b.dtype(), b.device());
          if (tb_) backend.matmul_into(gb, g2, detail::dense(a2), true, false, false);
          else backend.matmul_into(gb, detail::dense(a2), g2, true, false, false);
        } else {
          gb = tb_ ? matmul(g2, a2, true, false) : matmul(a2, g2, true, false);
        }
      } else {
        Tensor d_op_b = matmul(a, g, !ta_, false);
        if (b.dim() == 2 && d_op_b.dim() > 2) {
          const int64_t rows = d_op_b.size(-2), cols = d_op_b.size(-1);
          d_op_b = reshape(sum(reshape(d_op_b, {-1, rows, cols}), {0}), {rows, cols});
        }
        gb = tb_ ? transpose_last(d_op_b) : d_op_b;
      }
    }
    return {ga, gb};
  }

 private:
  bool ta_, tb_;
  DType compute_;     // a's dtype: b's too, or autocast's with an f32 b
  bool b_parameter_;  // that f32 b is a parameter: its copy comes from autocast's cache
};

// y = x W^T + b. Under autocast the node may take the f32 weight and bias themselves (the master
// weights) and compute in x's dtype: it casts them as it runs, so their bf16 copies are
// temporaries rather than tape values held until backward (gpt2: 170 MB of bf16 weights at
// `none`), and backward gives dW and db in f32 straight from the GEMM and the column sum, each
// rounded once, instead of rounding them to bf16 and casting back (backward casts the weight
// again for dx in place of casting dW back, and db's cast goes: a launch a linear fewer).
class LinearNode final : public Node {
 public:
  LinearNode(bool has_bias, DType compute, bool weight_parameter, bool bias_parameter)
      : has_bias_(has_bias), compute_(compute), weight_parameter_(weight_parameter), bias_parameter_(bias_parameter) {}
  OpKind kind() const override { return OpKind::linear; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Backend& backend = backend_for(kind(), in[0].device());
    Tensor bias = has_bias_ ? detail::in_dtype(backend, in[2], compute_, bias_parameter_) : Tensor();
    return {backend.linear(detail::dense(in[0]), detail::in_dtype(backend, in[1], compute_, weight_parameter_), bias)};
  }
  std::vector<int> saved_indices(size_t) const override { return {0, 1}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    int64_t out_features = g.size(-1);
    Tensor g2 = reshape(g, {-1, out_features});
    const Tensor& weight = ctx.saved(1);
    const bool master = weight.dtype() != compute_;  // f32 weight and bias, computed in compute_
    Backend& backend = backend_for(kind(), g.device());
    std::vector<Tensor> grads(has_bias_ ? 3 : 2);
    const bool bias_grad = has_bias_ && ctx.needs_input_grad(2);
    if (ctx.needs_input_grad(1) && bias_grad && weight.dtype() == DType::f32) {
      // Both f32 gradients at once (the CUDA backend can take db from dW's GEMM as it reads dy).
      Tensor x = ctx.saved(0);
      std::tie(grads[1], grads[2]) = backend.linear_weight_bias_grads(g2, detail::dense(reshape(x, {-1, x.size(-1)})));
    } else if (ctx.needs_input_grad(1)) {
      Tensor x = ctx.saved(0);
      Tensor x2 = reshape(x, {-1, x.size(-1)});
      if (master) {  // dW = dy^T x in f32 (matmul_into's f32 result for bf16 products)
        grads[1] = Tensor::empty(weight.shape(), weight.dtype(), weight.device());
        backend.matmul_into(grads[1], g2, detail::dense(x2), true, false, false);
      } else {
        grads[1] = matmul(g2, x2, true, false);  // dW = dy^T x
      }
    }
    if (bias_grad && !grads[2].defined()) {  // db = sum over rows of dy
      grads[2] = master ? backend.reduce_sum_accumulated(g2, {0}).view({out_features}, {1}, 0) : sum(g2, {0});
    }
    // dx reads only dy and W: the saved input (as large as dx for an MLP's down projection) goes
    // before dx is allocated, which lowers backward's peak where it starts (the last block's MLP).
    ctx.release_saved(0);
    if (ctx.needs_input_grad(0))  // dx = dy W
      grads[0] = master
                     ? backend.matmul(g, detail::in_dtype(backend, weight, compute_, weight_parameter_), false, false)
                     : matmul(g, weight);
    return grads;
  }

 private:
  bool has_bias_;
  DType compute_;  // the dtype of x and y: the weight's, or autocast's with f32 master weights
  bool weight_parameter_, bias_parameter_;  // f32 parameters: their copies come from autocast's cache
};

}  // namespace

Tensor matmul(const Tensor& a_in, const Tensor& b_in, bool trans_a, bool trans_b) {
  Tensor a = detail::autocast_compute(a_in);
  // Under bf16 autocast a 2-D f32 b goes to the node as it is (MatmulNode says why).
  const bool master = detail::takes_f32_weight(a, b_in) && !trans_a && b_in.dim() == 2;
  Tensor b = master ? b_in : detail::autocast_compute(b_in);
  detail::check_float(a, "matmul", "a");
  detail::check_float(b, "matmul", "b");
  if (!master) detail::check_same(a, b, "matmul");
  REMAT_CHECK(a.device() == b.device(), "matmul: expected a and b on the same device, got ", a.meta_str(), " and ",
              b.meta_str());
  REMAT_CHECK(a.dim() >= 2 && b.dim() >= 2, "matmul: expected tensors with at least 2 dims, got ",
              shape_str(a.shape()), " x ", shape_str(b.shape()));
  int64_t k_a = trans_a ? a.size(-2) : a.size(-1);
  int64_t k_b = trans_b ? b.size(-1) : b.size(-2);
  REMAT_CHECK(k_a == k_b, "matmul: expected a.shape[", trans_a ? -2 : -1, "] == b.shape[", trans_b ? -1 : -2,
              "], got ", shape_str(a.shape()), " x ", shape_str(b.shape()));
  bool batch_ok = b.dim() == 2 ||
                  (a.dim() == b.dim() && std::equal(a.shape().begin(), a.shape().end() - 2, b.shape().begin()));
  REMAT_CHECK(batch_ok, "matmul: expected equal batch dims or a 2-D b, got ", shape_str(a.shape()), " x ",
              shape_str(b.shape()));
  return detail::apply<MatmulNode>({a, b}, trans_a, trans_b, a.dtype(), master && detail::caches_compute_copy(b))[0];
}

Tensor linear(const Tensor& x_in, const Tensor& weight_in, const Tensor& bias_in) {
  // Under autocast, f32 weights (and bias) go to the node as they are, which computes in the
  // autocast dtype (LinearNode says why); anything else is cast here as any GEMM-like op's inputs.
  Tensor x = detail::autocast_compute(x_in);
  const bool master = detail::takes_f32_weight(x, weight_in) && (!bias_in.defined() || bias_in.dtype() == DType::f32);
  Tensor weight = master ? weight_in : detail::autocast_compute(weight_in);
  Tensor bias = master ? bias_in : detail::autocast_compute(bias_in);
  detail::check_float(x, "linear", "x");
  detail::check_float(weight, "linear", "weight");
  if (!master) detail::check_same(x, weight, "linear");
  REMAT_CHECK(x.device() == weight.device(), "linear: expected x and weight on the same device, got ", x.meta_str(),
              " and ", weight.meta_str());
  REMAT_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "linear: expected x[..., I] and weight[O, I] with matching I, got ", shape_str(x.shape()), " and ",
              shape_str(weight.shape()));
  if (bias.defined()) {
    detail::check_float(bias, "linear", "bias");
    detail::check_same(weight, bias, "linear");
    REMAT_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "linear: expected bias[", weight.size(0), "], got ",
                shape_str(bias.shape()));
    return detail::apply<LinearNode>({x, weight, bias}, true, x.dtype(), master && detail::caches_compute_copy(weight),
                                     master && detail::caches_compute_copy(bias))[0];
  }
  return detail::apply<LinearNode>({x, weight}, false, x.dtype(), master && detail::caches_compute_copy(weight),
                                   false)[0];
}

}  // namespace remat
