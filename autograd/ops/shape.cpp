// Shape ops: reshape, permute, slice, concat, split, expand, contiguous. Views where cheap.
#include <algorithm>

#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

class ReshapeNode final : public Node {
 public:
  ReshapeNode(Shape in_shape, Shape out_shape) : in_(std::move(in_shape)), out_(std::move(out_shape)) {}
  OpKind kind() const override { return OpKind::reshape; }
  // A view wherever the input's layout allows one (view_strides), else one copy.
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor& x = in[0];
    if (std::optional<Strides> strides = view_strides(x.shape(), x.strides(), out_)) return {x.view(out_, *strides, x.offset())};
    Tensor dense = detail::dense(x);
    return {dense.view(out_, contiguous_strides(out_), dense.offset())};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override { return {reshape(ctx.grad_output(0), in_)}; }

 private:
  Shape in_, out_;
};

class PermuteNode final : public Node {
 public:
  explicit PermuteNode(std::vector<int64_t> dims) : dims_(std::move(dims)) {}
  OpKind kind() const override { return OpKind::permute; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor& x = in[0];
    Shape shape(dims_.size());
    Strides strides(dims_.size());
    for (size_t i = 0; i < dims_.size(); ++i) {
      shape[i] = x.shape()[dims_[i]];
      strides[i] = x.strides()[dims_[i]];
    }
    return {x.view(shape, strides, x.offset())};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    std::vector<int64_t> inverse(dims_.size());
    for (size_t i = 0; i < dims_.size(); ++i) inverse[dims_[i]] = static_cast<int64_t>(i);
    return {permute(ctx.grad_output(0), inverse)};
  }

 private:
  std::vector<int64_t> dims_;
};

class SliceNode final : public Node {
 public:
  SliceNode(Shape in_shape, int64_t axis, int64_t start, int64_t end)
      : in_(std::move(in_shape)), axis_(axis), start_(start), end_(end) {}
  OpKind kind() const override { return OpKind::slice; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor& x = in[0];
    Shape shape = x.shape();
    shape[axis_] = end_ - start_;
    return {x.view(shape, x.strides(), x.offset() + start_ * x.strides()[axis_])};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    const Tensor& g = ctx.grad_output(0);
    Tensor dx = Tensor::zeros(in_, g.dtype(), g.device());
    backend_for(kind(), g.device()).copy_into_slice(dx, detail::dense(g), axis_, start_);
    return {dx};
  }

 private:
  Shape in_;
  int64_t axis_, start_, end_;
};

class ConcatNode final : public Node {
 public:
  ConcatNode(int64_t axis, std::vector<int64_t> sizes) : axis_(axis), sizes_(std::move(sizes)) {}
  OpKind kind() const override { return OpKind::concat; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Shape shape = in[0].shape();
    shape[axis_] = 0;
    for (int64_t s : sizes_) shape[axis_] += s;
    Tensor out = Tensor::empty(shape, in[0].dtype(), in[0].device());
    Backend& be = backend_for(kind(), out.device());
    int64_t start = 0;
    for (size_t i = 0; i < in.size(); ++i) {
      be.copy_into_slice(out, detail::dense(in[i]), axis_, start);
      start += sizes_[i];
    }
    return {out};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    std::vector<Tensor> grads;
    int64_t start = 0;
    for (size_t i = 0; i < sizes_.size(); ++i) {
      grads.push_back(ctx.needs_input_grad(i) ? slice(ctx.grad_output(0), axis_, start, start + sizes_[i]) : Tensor());
      start += sizes_[i];
    }
    return grads;
  }

 private:
  int64_t axis_;
  std::vector<int64_t> sizes_;
};

class SplitNode final : public Node {
 public:
  SplitNode(int64_t axis, std::vector<int64_t> sizes) : axis_(axis), sizes_(std::move(sizes)) {}
  OpKind kind() const override { return OpKind::split; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor& x = in[0];
    std::vector<Tensor> outs;
    int64_t start = 0;
    for (int64_t s : sizes_) {
      Shape shape = x.shape();
      shape[axis_] = s;
      outs.push_back(x.view(shape, x.strides(), x.offset() + start * x.strides()[axis_]));
      start += s;
    }
    return outs;
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    if (Tensor whole = side_by_side(ctx); whole.defined()) return {whole};
    // Outputs without a gradient contribute zeros of their shape.
    std::vector<Tensor> parts;
    const Tensor* any = nullptr;
    for (size_t i = 0; i < sizes_.size(); ++i)
      if (ctx.grad_output(i).defined()) any = &ctx.grad_output(i);
    for (size_t i = 0; i < sizes_.size(); ++i) {
      if (ctx.grad_output(i).defined()) {
        parts.push_back(ctx.grad_output(i));
        continue;
      }
      Shape shape = any->shape();
      shape[axis_] = sizes_[i];
      parts.push_back(Tensor::zeros(shape, any->dtype(), any->device()));
    }
    return {concat(parts, axis_)};
  }

 private:
  // The outputs' gradients as x's gradient without a copy where they already lie as x's parts do:
  // one buffer, the same strides, each part where its slice of x starts (attention's gradients of
  // a fused projection's heads: kernels/attention_layout.h). Undefined otherwise.
  Tensor side_by_side(const BackwardContext& ctx) const {
    const Tensor& first = ctx.grad_output(0);
    if (!first.defined()) return Tensor();
    int64_t start = 0;
    for (size_t i = 0; i < sizes_.size(); ++i) {
      const Tensor& g = ctx.grad_output(i);
      if (!g.defined() || g.storage() != first.storage() || g.strides() != first.strides() ||
          g.dtype() != first.dtype() || g.offset() != first.offset() + start * first.strides()[axis_])
        return Tensor();
      start += sizes_[i];
    }
    Shape shape = first.shape();
    shape[axis_] = start;
    return first.view(shape, first.strides(), first.offset());
  }

  int64_t axis_;
  std::vector<int64_t> sizes_;
};

class ExpandNode final : public Node {
 public:
  ExpandNode(Shape in_shape, Shape out_shape) : in_(std::move(in_shape)), out_(std::move(out_shape)) {}
  OpKind kind() const override { return OpKind::expand; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor& x = in[0];
    size_t lead = out_.size() - in_.size();
    Strides strides(out_.size(), 0);
    for (size_t i = 0; i < in_.size(); ++i) strides[lead + i] = in_[i] == 1 ? 0 : x.strides()[i];
    return {x.view(out_, strides, x.offset())};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    return {detail::sum_to(ctx.grad_output(0), in_)};
  }

 private:
  Shape in_, out_;
};

class ContiguousNode final : public Node {
 public:
  OpKind kind() const override { return OpKind::contiguous; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override { return {detail::dense(in[0])}; }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override { return {ctx.grad_output(0)}; }
};

}  // namespace

Tensor reshape(const Tensor& x, Shape shape) {
  detail::check_defined(x, "reshape", "x");
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      REMAT_CHECK(infer < 0, "reshape: only one dimension can be -1, got ", shape_str(shape));
      infer = static_cast<int64_t>(i);
    } else {
      REMAT_CHECK(shape[i] >= 0, "reshape: expected sizes >= 0 or -1, got ", shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    REMAT_CHECK(known > 0 && x.numel() % known == 0, "reshape: cannot infer -1 in ", shape_str(shape), " for ",
                x.numel(), " elements");
    shape[infer] = x.numel() / known;
  }
  REMAT_CHECK(numel_of(shape) == x.numel(), "reshape: expected ", x.numel(), " elements (from ",
              shape_str(x.shape()), "), got shape ", shape_str(shape));
  if (shape == x.shape()) return x;
  return detail::apply<ReshapeNode>({x}, x.shape(), shape)[0];
}

Tensor permute(const Tensor& x, std::vector<int64_t> dims) {
  detail::check_defined(x, "permute", "x");
  REMAT_CHECK(static_cast<int64_t>(dims.size()) == x.dim(), "permute: expected ", x.dim(), " dims, got ", dims.size());
  std::vector<bool> seen(dims.size(), false);
  for (int64_t& d : dims) {
    d = wrap_axis(d, x.dim(), "permute");
    REMAT_CHECK(!seen[d], "permute: dimension ", d, " is listed twice");
    seen[d] = true;
  }
  return detail::apply<PermuteNode>({x}, dims)[0];
}

Tensor transpose(const Tensor& x, int64_t dim0, int64_t dim1) {
  std::vector<int64_t> dims(x.dim());
  for (int64_t i = 0; i < x.dim(); ++i) dims[i] = i;
  std::swap(dims[wrap_axis(dim0, x.dim(), "transpose")], dims[wrap_axis(dim1, x.dim(), "transpose")]);
  return permute(x, dims);
}

Tensor slice(const Tensor& x, int64_t axis, int64_t start, int64_t end) {
  detail::check_defined(x, "slice", "x");
  axis = wrap_axis(axis, x.dim(), "slice");
  int64_t n = x.shape()[axis];
  REMAT_CHECK(0 <= start && start <= end && end <= n, "slice: expected 0 <= start <= end <= ", n, " along axis ",
              axis, ", got [", start, ", ", end, ")");
  return detail::apply<SliceNode>({x}, x.shape(), axis, start, end)[0];
}

Tensor concat(const std::vector<Tensor>& xs, int64_t axis) {
  REMAT_CHECK(!xs.empty(), "concat: expected at least one tensor");
  for (const Tensor& t : xs) detail::check_defined(t, "concat", "an input");
  axis = wrap_axis(axis, xs[0].dim(), "concat");
  std::vector<int64_t> sizes;
  for (const Tensor& t : xs) {
    detail::check_same(xs[0], t, "concat");
    bool ok = t.dim() == xs[0].dim();
    for (int64_t d = 0; ok && d < t.dim(); ++d) ok = d == axis || t.shape()[d] == xs[0].shape()[d];
    REMAT_CHECK(ok, "concat: expected shapes equal except along axis ", axis, ", got ", shape_str(xs[0].shape()),
                " and ", shape_str(t.shape()));
    sizes.push_back(t.shape()[axis]);
  }
  return detail::apply<ConcatNode>(xs, axis, sizes)[0];
}

std::vector<Tensor> split(const Tensor& x, int64_t axis, std::vector<int64_t> sizes) {
  detail::check_defined(x, "split", "x");
  axis = wrap_axis(axis, x.dim(), "split");
  int64_t total = 0;
  for (int64_t s : sizes) {
    REMAT_CHECK(s >= 0, "split: expected non-negative sizes");
    total += s;
  }
  REMAT_CHECK(!sizes.empty() && total == x.shape()[axis], "split: expected sizes summing to ", x.shape()[axis],
              " along axis ", axis, ", got a total of ", total);
  return detail::apply<SplitNode>({x}, axis, sizes);
}

Tensor expand(const Tensor& x, Shape shape) {
  detail::check_defined(x, "expand", "x");
  bool ok = shape.size() >= x.shape().size();
  size_t lead = ok ? shape.size() - x.shape().size() : 0;
  for (size_t i = 0; ok && i < x.shape().size(); ++i) ok = x.shape()[i] == 1 || x.shape()[i] == shape[lead + i];
  REMAT_CHECK(ok, "expand: cannot expand ", shape_str(x.shape()), " to ", shape_str(shape));
  if (shape == x.shape()) return x;
  return detail::apply<ExpandNode>({x}, x.shape(), shape)[0];
}

Tensor contiguous(const Tensor& x) {
  detail::check_defined(x, "contiguous", "x");
  if (x.is_contiguous()) return x;
  return detail::apply<ContiguousNode>({x})[0];
}

}  // namespace remat
