// Reductions: sum, mean, max over axes, and sum_to (the backward of broadcasting).
#include <algorithm>

#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

std::vector<int64_t> normalize_axes(std::vector<int64_t> axes, int64_t rank, const char* op) {
  if (axes.empty())
    for (int64_t d = 0; d < rank; ++d) axes.push_back(d);
  for (int64_t& a : axes) a = wrap_axis(a, rank, op);
  std::sort(axes.begin(), axes.end());
  REMAT_CHECK(std::adjacent_find(axes.begin(), axes.end()) == axes.end(), op, ": an axis is listed twice");
  return axes;
}

Shape reduced_shape(const Shape& shape, const std::vector<int64_t>& axes, bool keepdim) {
  Shape out;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    bool reduced = std::binary_search(axes.begin(), axes.end(), d);
    if (!reduced) out.push_back(shape[d]);
    else if (keepdim) out.push_back(1);
  }
  return out;
}

Shape keepdim_shape(const Shape& shape, const std::vector<int64_t>& axes) { return reduced_shape(shape, axes, true); }

// sum and mean: mean is sum scaled by 1/count, both in one node type.
class SumNode final : public Node {
 public:
  SumNode(std::vector<int64_t> axes, bool keepdim, Shape in_shape, bool mean)
      : axes_(std::move(axes)), keepdim_(keepdim), in_shape_(std::move(in_shape)), mean_(mean) {}
  OpKind kind() const override { return mean_ ? OpKind::mean : OpKind::sum; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Backend& be = backend_for(kind(), in[0].device());
    Tensor s = be.reduce_sum(detail::dense(in[0]), axes_);
    if (mean_) s = be.unary(UnaryFn::mul_scalar, s, 1.0 / static_cast<double>(count()));
    Shape out = reduced_shape(in_shape_, axes_, keepdim_);
    return {s.view(out, contiguous_strides(out), 0)};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = reshape(ctx.grad_output(0), keepdim_shape(in_shape_, axes_));
    if (mean_) g = mul_scalar(g, 1.0 / static_cast<double>(count()));
    return {expand(g, in_shape_)};
  }

 private:
  int64_t count() const {
    int64_t n = 1;
    for (int64_t a : axes_) n *= in_shape_[a];
    return n;
  }
  std::vector<int64_t> axes_;
  bool keepdim_;
  Shape in_shape_;
  bool mean_;
};

class MaxNode final : public Node {
 public:
  MaxNode(std::vector<int64_t> axes, bool keepdim, Shape in_shape)
      : axes_(std::move(axes)), keepdim_(keepdim), in_shape_(std::move(in_shape)) {}
  OpKind kind() const override { return OpKind::max; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Tensor m = backend_for(kind(), in[0].device()).reduce_max(detail::dense(in[0]), axes_);
    Shape out = reduced_shape(in_shape_, axes_, keepdim_);
    return {m.view(out, contiguous_strides(out), 0)};
  }
  std::vector<int> saved_indices(size_t) const override { return {0, 1}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Shape kd = keepdim_shape(in_shape_, axes_);
    Tensor g = detail::dense(ctx.grad_output(0));
    Tensor y = ctx.saved(1);
    return {backend_for(kind(), g.device())
                .reduce_max_backward(g.view(kd, contiguous_strides(kd), g.offset()), detail::dense(ctx.saved(0)),
                                     y.view(kd, contiguous_strides(kd), y.offset()))};
  }

 private:
  std::vector<int64_t> axes_;
  bool keepdim_;
  Shape in_shape_;
};

}  // namespace

Tensor sum(const Tensor& x, std::vector<int64_t> axes, bool keepdim) {
  detail::check_float(x, "sum", "x");
  auto ax = normalize_axes(std::move(axes), x.dim(), "sum");
  return detail::apply<SumNode>({x}, ax, keepdim, x.shape(), false)[0];
}

Tensor mean(const Tensor& x, std::vector<int64_t> axes, bool keepdim) {
  detail::check_float(x, "mean", "x");
  auto ax = normalize_axes(std::move(axes), x.dim(), "mean");
  return detail::apply<SumNode>({x}, ax, keepdim, x.shape(), true)[0];
}

Tensor max(const Tensor& x, std::vector<int64_t> axes, bool keepdim) {
  detail::check_float(x, "max", "x");
  auto ax = normalize_axes(std::move(axes), x.dim(), "max");
  for (int64_t a : ax) REMAT_CHECK(x.shape()[a] > 0, "max: expected a non-empty axis ", a, ", got ", x.meta_str());
  return detail::apply<MaxNode>({x}, ax, keepdim, x.shape())[0];
}

Tensor detail::sum_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  int64_t lead = g.dim() - static_cast<int64_t>(shape.size());
  REMAT_ASSERT(lead >= 0, "sum_to ", shape_str(g.shape()), " -> ", shape_str(shape));
  std::vector<int64_t> axes;
  for (int64_t d = 0; d < g.dim(); ++d)
    if (d < lead || (shape[d - lead] == 1 && g.shape()[d] != 1)) axes.push_back(d);
  Tensor s = axes.empty() ? g : sum(g, axes, true);
  return reshape(s, shape);
}

}  // namespace remat
