// Fused neural-network ops: layer_norm, softmax, attention, dropout, dropout_add, embedding,
// cross_entropy.
#include <cmath>

#include "autograd/ops/op_helpers.h"
#include "runtime/random.h"

namespace remat {

namespace {

class LayerNormNode final : public Node {
 public:
  LayerNormNode(double eps, DType out) : eps_(eps), out_(out) {}
  OpKind kind() const override { return OpKind::layer_norm; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return backend_for(kind(), in[0].device())
        .layer_norm(detail::dense(in[0]), detail::dense(in[1]), detail::dense(in[2]), eps_, out_);
  }
  bool output_differentiable(size_t i) const override { return i == 0; }  // mean and rstd are statistics
  std::vector<int> saved_indices(size_t) const override { return {0, 1, 4, 5}; }  // x, weight, mean, rstd
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    // dx goes straight into x's gradient so far where nothing else holds it (a pre-norm block's
    // residual stream: the residual addition's gradient), without the engine's addition after.
    Tensor into;
    if (detail::sole_owner(ctx.partial_grad(0))) into = ctx.take_partial_grad(0);
    auto grads = backend_for(kind(), g.device())
                     .layer_norm_backward(g, detail::dense(ctx.saved(0)), detail::dense(ctx.saved(1)), ctx.saved(2),
                                          ctx.saved(3), into);
    for (size_t i = 0; i < 3; ++i)
      if (!ctx.needs_input_grad(i)) grads[i] = Tensor();
    return grads;
  }

 private:
  double eps_;
  DType out_;  // y's dtype: x's, or the compute dtype (AutocastOutput::compute)
};

class SoftmaxNode final : public Node {
 public:
  OpKind kind() const override { return OpKind::softmax; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[0].device()).softmax(detail::dense(in[0]))};
  }
  std::vector<int> saved_indices(size_t) const override { return {1}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    return {backend_for(kind(), g.device()).softmax_backward(g, ctx.saved(0))};
  }
};

class AttentionNode final : public Node {
 public:
  AttentionNode(bool causal, double scale) : causal_(causal), scale_(scale) {}
  OpKind kind() const override { return OpKind::attention; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Backend& backend = backend_for(kind(), in[0].device());
    return backend.attention(heads(backend, in[0]), heads(backend, in[1]), heads(backend, in[2]), causal_, scale_);
  }
  bool output_differentiable(size_t i) const override { return i == 0; }  // lse is a statistic
  std::vector<int> saved_indices(size_t) const override { return {0, 1, 2, 3, 4}; }  // q, k, v, o, lse
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = ctx.grad_output(0);
    Backend& backend = backend_for(kind(), g.device());
    auto grads = backend.attention_backward(heads(backend, g), heads(backend, ctx.saved(0)),
                                            heads(backend, ctx.saved(1)), heads(backend, ctx.saved(2)),
                                            heads(backend, ctx.saved(3)), ctx.saved(4), causal_, scale_);
    for (size_t i = 0; i < 3; ++i)
      if (!ctx.needs_input_grad(i)) grads[i] = Tensor();
    return grads;
  }

 private:
  // The heads of a fused projection are strided views: a backend that reads them so gets them
  // as they are (no copy per call), any other a contiguous copy.
  static Tensor heads(Backend& backend, const Tensor& t) {
    return backend.attention_reads_strided() ? t : detail::dense(t);
  }

  bool causal_;
  double scale_;
};

class DropoutNode final : public Node {
 public:
  DropoutNode(double p, RngState rng) : p_(p), rng_(rng) {}
  OpKind kind() const override { return OpKind::dropout; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor x = detail::dense(in[0]);
    return {backend_for(kind(), x.device()).dropout(x, p_, rng_.seed, rng_.offset, x.dtype())};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }  // the mask is regenerated from (seed, offset)
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    return {backend_for(kind(), g.device()).dropout(g, p_, rng_.seed, rng_.offset, g.dtype())};
  }

 private:
  double p_;
  RngState rng_;
};

// residual + dropout(x) as one op (dropout_add in autograd/ops.h says when): the gradient passes
// to the residual as it is and to x through the mask, in x's dtype, as add's and dropout's
// backwards give it.
class DropoutAddNode final : public Node {
 public:
  DropoutAddNode(double p, RngState rng, DType x_dtype) : p_(p), rng_(rng), x_dtype_(x_dtype) {}
  OpKind kind() const override { return OpKind::dropout_add; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[0].device())
                .dropout_add(detail::dense(in[0]), detail::dense(in[1]), p_, rng_.seed, rng_.offset)};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    const Tensor& g = ctx.grad_output(0);
    Tensor gx;
    if (ctx.needs_input_grad(0))
      gx = backend_for(kind(), g.device()).dropout(detail::dense(g), p_, rng_.seed, rng_.offset, x_dtype_);
    return {gx, ctx.needs_input_grad(1) ? g : Tensor()};
  }

 private:
  double p_;
  RngState rng_;
  DType x_dtype_;
};

class EmbeddingNode final : public Node {
 public:
  explicit EmbeddingNode(int64_t vocab) : vocab_(vocab) {}
  OpKind kind() const override { return OpKind::embedding; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[1].device()).embedding(detail::dense(in[0]), detail::dense(in[1]))};
  }
  std::vector<int> saved_indices(size_t) const override { return {0}; }  // the indices
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    return {Tensor(), backend_for(kind(), g.device()).embedding_backward(g, detail::dense(ctx.saved(0)), vocab_)};
  }

 private:
  int64_t vocab_;
};

class CrossEntropyNode final : public Node {
 public:
  explicit CrossEntropyNode(int64_t ignore_index) : ignore_index_(ignore_index) {}
  OpKind kind() const override { return OpKind::cross_entropy; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return backend_for(kind(), in[0].device()).cross_entropy(detail::dense(in[0]), detail::dense(in[1]), ignore_index_);
  }
  bool output_differentiable(size_t i) const override { return i == 0; }
  std::vector<int> saved_indices(size_t) const override { return {0, 1, 3}; }  // logits, targets, lse
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    Tensor logits = detail::dense(ctx.saved(0)), targets = detail::dense(ctx.saved(1)), lse = ctx.saved(2);
    // The logits are read here for the last time: once the graph lets go of them and nothing else
    // holds them, their gradient may take their place (gpt2's bf16 logits at B 8, T 1024: 786 MiB
    // that the step's peak, at the start of backward, then does without).
    ctx.release_saved(0);
    Backend& backend = backend_for(kind(), g.device());
    const Backend::CrossEntropyRows rows{.ignore_index = ignore_index_, .first_row = 0, .batch_targets = {}};
    if (detail::sole_owner(logits) && backend.cross_entropy_backward_in_place(g, logits, targets, lse, rows)) {
      logits.storage()->set_category(MemoryCategory::gradient);  // the bytes hold a gradient now
      return {logits, Tensor()};
    }
    return {backend.cross_entropy_backward(g, logits, targets, lse, rows), Tensor()};
  }

 private:
  int64_t ignore_index_;
};

}  // namespace

Tensor layer_norm(const Tensor& x_in, const Tensor& weight, const Tensor& bias, double eps, AutocastOutput output) {
  Tensor x = detail::autocast_full(x_in);
  detail::check_float(x, "layer_norm", "x");
  detail::check_float(weight, "layer_norm", "weight");
  detail::check_float(bias, "layer_norm", "bias");
  detail::check_same(x, weight, "layer_norm");
  detail::check_same(x, bias, "layer_norm");
  REMAT_CHECK(x.dim() >= 1 && weight.shape() == Shape{x.size(-1)} && bias.shape() == Shape{x.size(-1)},
              "layer_norm: expected weight and bias of shape [", x.dim() ? x.size(-1) : 0, "] for x ",
              shape_str(x.shape()), ", got ", shape_str(weight.shape()), " and ", shape_str(bias.shape()));
  REMAT_CHECK(eps > 0, "layer_norm: expected eps > 0, got ", eps);
  // f32 x under autocast is all that narrows: f64 stays f64, as autocast leaves f64 GEMMs alone.
  const bool narrow = output == AutocastOutput::compute && autocast_active() && x.dtype() == DType::f32;
  return detail::apply<LayerNormNode>({x, weight, bias}, eps, narrow ? autocast_dtype() : x.dtype())[0];
}

Tensor softmax(const Tensor& x_in) {
  Tensor x = detail::autocast_full(x_in);
  detail::check_float(x, "softmax", "x");
  REMAT_CHECK(x.dim() >= 1, "softmax: expected at least 1 dim, got a scalar");
  return detail::apply<SoftmaxNode>({x})[0];
}

Tensor attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal, double scale) {
  Tensor q = detail::autocast_compute(q_in), k = detail::autocast_compute(k_in), v = detail::autocast_compute(v_in);
  for (const Tensor* t : {&q, &k, &v}) detail::check_float(*t, "attention", "q, k and v");
  detail::check_same(q, k, "attention");
  detail::check_same(q, v, "attention");
  REMAT_CHECK(q.dim() == 4 && q.shape() == k.shape() && q.shape() == v.shape(),
              "attention: expected q, k, v of one shape [B, H, T, D], got ", shape_str(q.shape()), ", ",
              shape_str(k.shape()), ", ", shape_str(v.shape()));
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  return detail::apply<AttentionNode>({q, k, v}, causal, scale)[0];
}

Tensor dropout(const Tensor& x, double p, bool training) {
  detail::check_float(x, "dropout", "x");
  REMAT_CHECK(p >= 0.0 && p < 1.0, "dropout: expected 0 <= p < 1, got ", p);
  if (!training || p == 0.0) return x;
  return detail::apply<DropoutNode>({x}, p, next_rng(static_cast<uint64_t>(x.numel())))[0];
}

Tensor dropout_add(const Tensor& x, const Tensor& residual, double p, bool training) {
  detail::check_float(x, "dropout_add", "x");
  detail::check_float(residual, "dropout_add", "residual");
  REMAT_CHECK(p >= 0.0 && p < 1.0, "dropout_add: expected 0 <= p < 1, got ", p);
  if (!training || p == 0.0) return add(residual, x);
  const bool one_dtype = x.dtype() == residual.dtype();
  const bool widening = autocast_active() && x.dtype() == DType::bf16 && residual.dtype() == DType::f32 &&
                        backend_for(OpKind::dropout_add, x.device()).binary_mixes_dtypes();
  // Anything else (broadcasting, dtypes add would cast) is the two ops.
  if (x.shape() != residual.shape() || x.device() != residual.device() || !(one_dtype || widening))
    return add(residual, dropout(x, p, training));
  // The mask draws what dropout(x) would: the same stream position, so the same mask.
  return detail::apply<DropoutAddNode>({x, residual}, p, next_rng(static_cast<uint64_t>(x.numel())), x.dtype())[0];
}

Tensor embedding(const Tensor& idx, const Tensor& weight) {
  detail::check_index(idx, "embedding", "indices");
  detail::check_float(weight, "embedding", "weight");
  REMAT_CHECK(weight.dim() == 2, "embedding: expected weight [V, C], got ", shape_str(weight.shape()));
  REMAT_CHECK(idx.device() == weight.device(), "embedding: expected indices on ", weight.device().str(), ", got ",
              idx.device().str());
  return detail::apply<EmbeddingNode>({idx, weight}, weight.size(0))[0];
}

Tensor cross_entropy(const Tensor& logits_in, const Tensor& targets, int64_t ignore_index) {
  // bf16 logits on a GPU stay bf16 under autocast: the kernels read them into f32 exactly and keep
  // the log-sum-exp and the loss in f32, so the result is the f32 cast's to the bit, without an f32
  // copy of the logits made and saved for backward (1.5 GiB for gpt2's vocabulary at B 8, T 1024),
  // and the gradient comes out in bf16 rounded as the cast's backward rounded it.
  const bool reads_bf16 = logits_in.dtype() == DType::bf16 && logits_in.device().is_cuda();
  Tensor logits = reads_bf16 ? logits_in : detail::autocast_full(logits_in);
  detail::check_float(logits, "cross_entropy", "logits");
  detail::check_index(targets, "cross_entropy", "targets");
  REMAT_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "cross_entropy: expected logits [N, V] and targets [N], got ", shape_str(logits.shape()), " and ",
              shape_str(targets.shape()));
  REMAT_CHECK(logits.device() == targets.device(), "cross_entropy: expected targets on ", logits.device().str(),
              ", got ", targets.device().str());
  return detail::apply<CrossEntropyNode>({logits, targets}, ignore_index)[0];
}

}  // namespace remat
