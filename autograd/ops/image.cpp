// Image and diffusion ops: conv2d, group_norm, nearest upsampling, average pooling, adaLN
// modulation, sinusoidal timestep embedding.
#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

class Conv2dNode final : public Node {
 public:
  Conv2dNode(int stride, int padding, bool has_bias) : stride_(stride), padding_(padding), has_bias_(has_bias) {}
  OpKind kind() const override { return OpKind::conv2d; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Tensor b = has_bias_ ? detail::dense(in[2]) : Tensor();
    return {backend_for(kind(), in[0].device()).conv2d(detail::dense(in[0]), detail::dense(in[1]), b, stride_, padding_)};
  }
  std::vector<int> saved_indices(size_t) const override { return {0, 1}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    auto grads = backend_for(kind(), g.device())
                     .conv2d_backward(g, detail::dense(ctx.saved(0)), detail::dense(ctx.saved(1)), stride_, padding_, has_bias_);
    if (!has_bias_) grads.pop_back();
    for (size_t i = 0; i < grads.size(); ++i)
      if (!ctx.needs_input_grad(i)) grads[i] = Tensor();
    return grads;
  }

 private:
  int stride_, padding_;
  bool has_bias_;
};

class GroupNormNode final : public Node {
 public:
  GroupNormNode(int groups, double eps) : groups_(groups), eps_(eps) {}
  OpKind kind() const override { return OpKind::group_norm; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return backend_for(kind(), in[0].device())
        .group_norm(detail::dense(in[0]), detail::dense(in[1]), detail::dense(in[2]), groups_, eps_);
  }
  bool output_differentiable(size_t i) const override { return i == 0; }
  std::vector<int> saved_indices(size_t) const override { return {0, 1, 4, 5}; }  // x, weight, mean, rstd
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    auto grads = backend_for(kind(), g.device())
                     .group_norm_backward(g, detail::dense(ctx.saved(0)), detail::dense(ctx.saved(1)), ctx.saved(2),
                                          ctx.saved(3), groups_);
    for (size_t i = 0; i < 3; ++i)
      if (!ctx.needs_input_grad(i)) grads[i] = Tensor();
    return grads;
  }

 private:
  int groups_;
  double eps_;
};

class ResampleNode final : public Node {
 public:
  ResampleNode(OpKind kind, int factor) : kind_(kind), factor_(factor) {}
  OpKind kind() const override { return kind_; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Backend& be = backend_for(kind_, in[0].device());
    Tensor x = detail::dense(in[0]);
    return {kind_ == OpKind::upsample_nearest ? be.upsample_nearest(x, factor_) : be.avg_pool(x, factor_)};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    Backend& be = backend_for(kind_, g.device());
    return {kind_ == OpKind::upsample_nearest ? be.upsample_nearest_backward(g, factor_) : be.avg_pool_backward(g, factor_)};
  }

 private:
  OpKind kind_;
  int factor_;
};

class ModulateNode final : public Node {
 public:
  OpKind kind() const override { return OpKind::modulate; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[0].device()).modulate(detail::dense(in[0]), detail::dense(in[1]), detail::dense(in[2]))};
  }
  std::vector<int> saved_indices(size_t) const override { return {0, 2}; }  // x, scale
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    auto grads = backend_for(kind(), g.device()).modulate_backward(g, detail::dense(ctx.saved(0)), detail::dense(ctx.saved(1)));
    for (size_t i = 0; i < 3; ++i)
      if (!ctx.needs_input_grad(i)) grads[i] = Tensor();
    return grads;
  }
};

class TimestepEmbeddingNode final : public Node {
 public:
  TimestepEmbeddingNode(int dim, double max_period) : dim_(dim), max_period_(max_period) {}
  OpKind kind() const override { return OpKind::timestep_embedding; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[0].device()).timestep_embedding(detail::dense(in[0]), dim_, max_period_)};
  }
  std::vector<int> saved_indices(size_t) const override { return {0}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    return {backend_for(kind(), g.device()).timestep_embedding_backward(g, detail::dense(ctx.saved(0)), dim_, max_period_)};
  }

 private:
  int dim_;
  double max_period_;
};

void check_image(const Tensor& x, const char* op) {
  detail::check_float(x, op, "x");
  REMAT_CHECK(x.dim() == 4, op, ": expected an image batch [N, C, H, W], got ", shape_str(x.shape()));
}

}  // namespace

Tensor conv2d(const Tensor& x_in, const Tensor& weight_in, const Tensor& bias_in, int stride, int padding) {
  Tensor x = detail::autocast_compute(x_in), weight = detail::autocast_compute(weight_in),
         bias = detail::autocast_compute(bias_in);
  check_image(x, "conv2d");
  detail::check_float(weight, "conv2d", "weight");
  detail::check_same(x, weight, "conv2d");
  REMAT_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1), "conv2d: expected weight [Cout, ", x.size(1),
              ", kh, kw] for x ", shape_str(x.shape()), ", got ", shape_str(weight.shape()));
  REMAT_CHECK(stride >= 1 && padding >= 0, "conv2d: expected stride >= 1 and padding >= 0, got ", stride, " and ", padding);
  REMAT_CHECK(x.size(2) + 2 * padding >= weight.size(2) && x.size(3) + 2 * padding >= weight.size(3),
              "conv2d: the kernel ", shape_str(weight.shape()), " is larger than the padded input ", shape_str(x.shape()));
  if (bias.defined()) {
    detail::check_same(x, bias, "conv2d");
    REMAT_CHECK(bias.shape() == Shape{weight.size(0)}, "conv2d: expected bias [", weight.size(0), "], got ",
                shape_str(bias.shape()));
    return detail::apply<Conv2dNode>({x, weight, bias}, stride, padding, true)[0];
  }
  return detail::apply<Conv2dNode>({x, weight}, stride, padding, false)[0];
}

Tensor group_norm(const Tensor& x_in, const Tensor& weight, const Tensor& bias, int groups, double eps) {
  Tensor x = detail::autocast_full(x_in);
  detail::check_float(x, "group_norm", "x");
  detail::check_same(x, weight, "group_norm");
  detail::check_same(x, bias, "group_norm");
  REMAT_CHECK(x.dim() >= 2 && groups >= 1 && x.size(1) % groups == 0, "group_norm: expected channels (",
              x.dim() >= 2 ? x.size(1) : 0, ") divisible by groups (", groups, ")");
  REMAT_CHECK(weight.shape() == Shape{x.size(1)} && bias.shape() == Shape{x.size(1)},
              "group_norm: expected weight and bias of shape [", x.size(1), "], got ", shape_str(weight.shape()), " and ",
              shape_str(bias.shape()));
  REMAT_CHECK(eps > 0, "group_norm: expected eps > 0, got ", eps);
  return detail::apply<GroupNormNode>({x, weight, bias}, groups, eps)[0];
}

Tensor upsample_nearest(const Tensor& x, int factor) {
  check_image(x, "upsample_nearest");
  REMAT_CHECK(factor >= 1, "upsample_nearest: expected factor >= 1, got ", factor);
  return detail::apply<ResampleNode>({x}, OpKind::upsample_nearest, factor)[0];
}

Tensor avg_pool(const Tensor& x, int factor) {
  check_image(x, "avg_pool");
  REMAT_CHECK(factor >= 1 && x.size(2) % factor == 0 && x.size(3) % factor == 0, "avg_pool: expected H and W divisible by ",
              factor, ", got ", shape_str(x.shape()));
  return detail::apply<ResampleNode>({x}, OpKind::avg_pool, factor)[0];
}

Tensor modulate(const Tensor& x_in, const Tensor& shift_in, const Tensor& scale_in) {
  Tensor x = detail::autocast_full(x_in), shift = detail::autocast_full(shift_in), scale = detail::autocast_full(scale_in);
  detail::check_float(x, "modulate", "x");
  detail::check_same(x, shift, "modulate");
  detail::check_same(x, scale, "modulate");
  const Shape per_sample{x.dim() == 3 ? x.size(0) : 0, x.dim() == 3 ? x.size(2) : 0};
  REMAT_CHECK(x.dim() == 3 && shift.shape() == per_sample && scale.shape() == shift.shape(),
              "modulate: expected x [B, T, C] with shift and scale [B, C], got ", shape_str(x.shape()), ", ",
              shape_str(shift.shape()), ", ", shape_str(scale.shape()));
  return detail::apply<ModulateNode>({x, shift, scale})[0];
}

Tensor timestep_embedding(const Tensor& t, int dim, double max_period) {
  detail::check_float(t, "timestep_embedding", "t");
  REMAT_CHECK(t.dim() == 1, "timestep_embedding: expected times [B], got ", shape_str(t.shape()));
  REMAT_CHECK(dim >= 2 && dim % 2 == 0, "timestep_embedding: expected an even dim >= 2, got ", dim);
  REMAT_CHECK(max_period > 1, "timestep_embedding: expected max_period > 1, got ", max_period);
  return detail::apply<TimestepEmbeddingNode>({t}, dim, max_period)[0];
}

}  // namespace remat
