// Elementwise ops: broadcasting add/sub/mul/div, scalar variants and unary functions.
#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

OpKind op_of(BinaryFn fn) {
  switch (fn) {
    case BinaryFn::add: return OpKind::add;
    case BinaryFn::sub: return OpKind::sub;
    case BinaryFn::mul: return OpKind::mul;
    case BinaryFn::div: return OpKind::div;
  }
  return OpKind::add;
}

OpKind op_of(UnaryFn fn) {
  switch (fn) {
    case UnaryFn::add_scalar: return OpKind::add_scalar;
    case UnaryFn::mul_scalar: return OpKind::mul_scalar;
    case UnaryFn::pow_scalar: return OpKind::pow_scalar;
    case UnaryFn::neg: return OpKind::neg;
    case UnaryFn::exp: return OpKind::exp;
    case UnaryFn::log: return OpKind::log;
    case UnaryFn::tanh: return OpKind::tanh;
    case UnaryFn::sqrt: return OpKind::sqrt;
    case UnaryFn::rsqrt: return OpKind::rsqrt;
    case UnaryFn::relu: return OpKind::relu;
    case UnaryFn::gelu: return OpKind::gelu;
    case UnaryFn::silu: return OpKind::silu;
    case UnaryFn::sigmoid: return OpKind::sigmoid;
  }
  return OpKind::neg;
}

// a op b. Under autocast an addition or subtraction of an f32 and a bf16 tensor of one shape (the
// residual stream plus a block's bf16 output) takes both as they are where the backend widens the
// bf16 one as it reads it (binary_mixes_dtypes): the bits of casting it first, without the cast's
// pass over memory; the bf16 operand's gradient is then cast here, as the cast's backward would.
class BinaryNode final : public Node {
 public:
  BinaryNode(BinaryFn fn, Shape a_shape, Shape b_shape, DType a_dtype, DType b_dtype)
      : fn_(fn), a_shape_(std::move(a_shape)), b_shape_(std::move(b_shape)), a_dtype_(a_dtype), b_dtype_(b_dtype) {}
  OpKind kind() const override { return op_of(fn_); }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    Backend& backend = backend_for(kind(), in[0].device());
    if (a_dtype_ != b_dtype_) return {backend.binary(fn_, detail::dense(in[0]), detail::dense(in[1]))};
    return {backend.binary(fn_, in[0], in[1])};
  }
  std::vector<int> saved_indices(size_t) const override {
    switch (fn_) {
      case BinaryFn::add:
      case BinaryFn::sub: return {};
      case BinaryFn::mul:
      case BinaryFn::div: return {0, 1};
    }
    return {};
  }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    const Tensor& g = ctx.grad_output(0);
    Tensor ga, gb;
    switch (fn_) {
      case BinaryFn::add:
        if (ctx.needs_input_grad(0)) ga = detail::sum_to(g, a_shape_);
        if (ctx.needs_input_grad(1)) gb = detail::sum_to(g, b_shape_);
        break;
      case BinaryFn::sub:
        if (ctx.needs_input_grad(0)) ga = detail::sum_to(g, a_shape_);
        if (ctx.needs_input_grad(1)) gb = detail::sum_to(neg(g), b_shape_);
        break;
      case BinaryFn::mul:
        if (ctx.needs_input_grad(0)) ga = detail::sum_to(mul(g, ctx.saved(1)), a_shape_);  // self: grad * other
        if (ctx.needs_input_grad(1)) gb = detail::sum_to(mul(g, ctx.saved(0)), b_shape_);  // other: grad * self
        break;
      case BinaryFn::div: {
        Tensor b = ctx.saved(1);
        Tensor g_over_b = div(g, b);
        if (ctx.needs_input_grad(0)) ga = detail::sum_to(g_over_b, a_shape_);                      // grad / other
        if (ctx.needs_input_grad(1)) gb = detail::sum_to(neg(div(mul(g_over_b, ctx.saved(0)), b)), b_shape_);  // -grad * self / other^2
        break;
      }
    }
    // Mixed dtypes (add and sub only): each gradient in its operand's dtype.
    if (ga.defined() && ga.dtype() != a_dtype_) ga = backend_for(kind(), ga.device()).cast(detail::dense(ga), a_dtype_);
    if (gb.defined() && gb.dtype() != b_dtype_) gb = backend_for(kind(), gb.device()).cast(detail::dense(gb), b_dtype_);
    return {ga, gb};
  }

 private:
  BinaryFn fn_;
  Shape a_shape_, b_shape_;
  DType a_dtype_, b_dtype_;
};

class UnaryNode final : public Node {
 public:
  UnaryNode(UnaryFn fn, double scalar) : fn_(fn), scalar_(scalar) {}
  OpKind kind() const override { return op_of(fn_); }
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[0].device()).unary(fn_, detail::dense(in[0]), scalar_)};
  }
  // Which tensor the derivative reads: the input (0), the output (1), or neither.
  std::vector<int> saved_indices(size_t) const override {
    switch (fn_) {
      case UnaryFn::add_scalar:
      case UnaryFn::mul_scalar:
      case UnaryFn::neg: return {};
      case UnaryFn::pow_scalar:
      case UnaryFn::log:
      case UnaryFn::relu:
      case UnaryFn::gelu:
      case UnaryFn::silu: return {0};
      case UnaryFn::exp:
      case UnaryFn::tanh:
      case UnaryFn::sqrt:
      case UnaryFn::rsqrt:
      case UnaryFn::sigmoid: return {1};
    }
    return {};
  }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.take_grad_output(0));
    std::vector<int> saved = saved_indices(1);
    Tensor x, y;
    if (!saved.empty()) (saved[0] == 0 ? x : y) = detail::dense(ctx.saved(0));
    Backend& backend = backend_for(kind(), g.device());
    // A gradient nothing else holds takes dx in place (same values: each element is read, then written).
    if (detail::sole_owner(g) && backend.unary_backward_in_place(fn_, g, x, y, scalar_)) return {g};
    return {backend.unary_backward(fn_, g, x, y, scalar_)};
  }

 private:
  UnaryFn fn_;
  double scalar_;
};

class CastNode final : public Node {
 public:
  CastNode(DType from, DType to) : from_(from), to_(to) {}
  OpKind kind() const override { return OpKind::cast; }
  // The backends' casts read their input as contiguous memory: a view (autocast's cast of permuted
  // attention heads, an expanded gradient) is made dense first.
  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    return {backend_for(kind(), in[0].device()).cast(detail::dense(in[0]), to_)};
  }
  std::vector<int> saved_indices(size_t) const override { return {}; }
  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    Tensor g = detail::dense(ctx.grad_output(0));
    return {backend_for(kind(), g.device()).cast(g, from_)};
  }

 private:
  DType from_, to_;
};

Tensor binary_op(BinaryFn fn, const Tensor& a_in, const Tensor& b_in) {
  const char* name = op_name(op_of(fn));
  detail::check_float(a_in, name, "a");
  detail::check_float(b_in, name, "b");
  Tensor a = a_in, b = b_in;
  const bool f32_and_bf16 = (a.dtype() == DType::f32 && b.dtype() == DType::bf16) ||
                            (a.dtype() == DType::bf16 && b.dtype() == DType::f32);
  const bool mixed = autocast_active() && (fn == BinaryFn::add || fn == BinaryFn::sub) && f32_and_bf16 &&
                     a.shape() == b.shape() && a.device() == b.device() &&
                     backend_for(op_of(fn), a.device()).binary_mixes_dtypes();
  if (!mixed) {
    detail::autocast_match(a, b);
    detail::check_same(a, b, name);
  }
  broadcast_shapes(a.shape(), b.shape(), name);
  return detail::apply<BinaryNode>({a, b}, fn, a.shape(), b.shape(), a.dtype(), b.dtype())[0];
}

Tensor unary_op(UnaryFn fn, const Tensor& x, double scalar = 0.0) {
  detail::check_float(x, op_name(op_of(fn)), "x");
  return detail::apply<UnaryNode>({x}, fn, scalar)[0];
}

}  // namespace

Tensor cast(const Tensor& x, DType dtype) {
  detail::check_float(x, "cast", "x");
  REMAT_CHECK(is_floating(dtype), "cast: expected a floating target dtype, got ", dtype_name(dtype));
  if (x.dtype() == dtype) return x;
  return detail::apply<CastNode>({x}, x.dtype(), dtype)[0];
}

Tensor add(const Tensor& a, const Tensor& b) { return binary_op(BinaryFn::add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary_op(BinaryFn::sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary_op(BinaryFn::mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary_op(BinaryFn::div, a, b); }
Tensor add_scalar(const Tensor& x, double s) { return unary_op(UnaryFn::add_scalar, x, s); }
Tensor mul_scalar(const Tensor& x, double s) { return unary_op(UnaryFn::mul_scalar, x, s); }
Tensor pow_scalar(const Tensor& x, double e) { return unary_op(UnaryFn::pow_scalar, x, e); }
Tensor neg(const Tensor& x) { return unary_op(UnaryFn::neg, x); }
Tensor exp(const Tensor& x) { return unary_op(UnaryFn::exp, x); }
Tensor log(const Tensor& x) { return unary_op(UnaryFn::log, x); }
Tensor tanh(const Tensor& x) { return unary_op(UnaryFn::tanh, x); }
Tensor sqrt(const Tensor& x) { return unary_op(UnaryFn::sqrt, x); }
Tensor rsqrt(const Tensor& x) { return unary_op(UnaryFn::rsqrt, x); }
Tensor relu(const Tensor& x) { return unary_op(UnaryFn::relu, x); }
Tensor gelu(const Tensor& x) { return unary_op(UnaryFn::gelu, x); }
Tensor silu(const Tensor& x) { return unary_op(UnaryFn::silu, x); }
Tensor sigmoid(const Tensor& x) { return unary_op(UnaryFn::sigmoid, x); }

}  // namespace remat
