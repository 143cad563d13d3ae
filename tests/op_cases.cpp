// The op catalogue of the tests (see op_cases.h).
#include "op_cases.h"

#include <cmath>

namespace remat::testing {

namespace {

Tensor index_tensor(std::vector<int64_t> values, Shape shape) { return Tensor::from_vector(values, shape); }

// Values kept away from 0 so that relu's kink never falls inside the finite-difference step.
Tensor away_from_zero(const Shape& shape) {
  Tensor t = uniform64(shape, 0.2, 1.5);
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = (i % 2 ? -p[i] : p[i]);
  return t;
}

// Multiples of 2^-10 in [-2, 2): with a step of 2^-20 every probe point is exact in f32 too.
Tensor dyadic64(const Shape& shape) {
  Tensor t = uniform64(shape, -2.0, 2.0);
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = std::floor(p[i] * 1024.0) / 1024.0;
  return t;
}

}  // namespace

std::vector<OpCase> cases_for(OpKind op) {
  auto unary = [](const char* d, Fn f, Tensor x) { return std::vector<OpCase>{{d, std::move(f), {x}}}; };
  switch (op) {
    case OpKind::add:
      return {{"same shape", [](auto& in) { return add(in[0], in[1]); }, {randn64({3, 4}), randn64({3, 4})}},
              {"broadcast [2,1,4] + [3,1]", [](auto& in) { return add(in[0], in[1]); }, {randn64({2, 1, 4}), randn64({3, 1})}}};
    case OpKind::sub:
      return {{"broadcast [3,4] - [4]", [](auto& in) { return sub(in[0], in[1]); }, {randn64({3, 4}), randn64({4})}}};
    case OpKind::mul:
      return {{"broadcast [2,3,4] * [3,1]", [](auto& in) { return mul(in[0], in[1]); }, {randn64({2, 3, 4}), randn64({3, 1})}},
              {"same tensor twice", [](auto& in) { return mul(in[0], in[0]); }, {randn64({5})}}};
    case OpKind::div:
      return {{"broadcast [3,4] / [4]", [](auto& in) { return div(in[0], in[1]); }, {randn64({3, 4}), uniform64({4}, 0.5, 2.0)}}};
    case OpKind::add_scalar: return unary("x + 2.5", [](auto& in) { return add_scalar(in[0], 2.5); }, randn64({3, 4}));
    case OpKind::mul_scalar: return unary("x * -1.5", [](auto& in) { return mul_scalar(in[0], -1.5); }, randn64({3, 4}));
    case OpKind::pow_scalar: return unary("x ^ 2.5", [](auto& in) { return pow_scalar(in[0], 2.5); }, uniform64({3, 4}, 0.5, 1.5));
    case OpKind::neg: return unary("-x", [](auto& in) { return neg(in[0]); }, randn64({3, 4}));
    case OpKind::exp: return unary("exp", [](auto& in) { return exp(in[0]); }, randn64({3, 4}));
    case OpKind::log: return unary("log", [](auto& in) { return log(in[0]); }, uniform64({3, 4}, 0.5, 2.0));
    case OpKind::tanh: return unary("tanh", [](auto& in) { return tanh(in[0]); }, randn64({3, 4}));
    case OpKind::sqrt: return unary("sqrt", [](auto& in) { return sqrt(in[0]); }, uniform64({3, 4}, 0.5, 2.0));
    case OpKind::rsqrt: return unary("rsqrt", [](auto& in) { return rsqrt(in[0]); }, uniform64({3, 4}, 0.5, 2.0));
    case OpKind::relu: return unary("relu", [](auto& in) { return relu(in[0]); }, away_from_zero({3, 4}));
    case OpKind::gelu: return unary("gelu", [](auto& in) { return gelu(in[0]); }, randn64({3, 4}));
    case OpKind::silu: return unary("silu", [](auto& in) { return silu(in[0]); }, randn64({3, 4}));
    case OpKind::sigmoid: return unary("sigmoid", [](auto& in) { return sigmoid(in[0]); }, randn64({3, 4}));
    case OpKind::sum:
      return {{"all axes", [](auto& in) { return sum(in[0]); }, {randn64({2, 3, 4})}},
              {"axes {0,2} keepdim", [](auto& in) { return sum(in[0], {0, 2}, true); }, {randn64({2, 3, 4})}}};
    case OpKind::mean:
      return {{"axis -1", [](auto& in) { return mean(in[0], {-1}); }, {randn64({2, 3, 4})}}};
    case OpKind::max:
      return {{"axis 1", [](auto& in) { return max(in[0], {1}); }, {randn64({2, 3, 4})}},
              {"all axes keepdim", [](auto& in) { return max(in[0], {}, true); }, {randn64({2, 3})}}};
    case OpKind::reshape:
      return {{"[2,3,4] -> [4,-1]", [](auto& in) { return reshape(mul_scalar(in[0], 1.0), {4, -1}); }, {randn64({2, 3, 4})}},
              {"of a permuted view", [](auto& in) { return reshape(transpose(in[0], 0, 1), {-1}); }, {randn64({3, 4})}}};
    case OpKind::permute:
      return {{"[2,3,4] by (2,0,1)", [](auto& in) { return permute(in[0], {2, 0, 1}); }, {randn64({2, 3, 4})}}};
    case OpKind::slice:
      return {{"axis 1 [1,3)", [](auto& in) { return slice(in[0], 1, 1, 3); }, {randn64({2, 4, 3})}}};
    case OpKind::concat:
      return {{"axis 1 of three", [](auto& in) { return concat({in[0], in[1], in[2]}, 1); },
               {randn64({2, 1, 3}), randn64({2, 2, 3}), randn64({2, 3, 3})}}};
    case OpKind::split:
      return {{"axis 0 into 1+2, both used", [](auto& in) {
                 auto parts = split(in[0], 0, {1, 2});
                 return add(mul_scalar(parts[0], 3.0), sum(parts[1], {0}, true));
               }, {randn64({3, 4})}},
              {"only the second part used", [](auto& in) { return split(in[0], 1, {2, 2})[1]; }, {randn64({3, 4})}}};
    case OpKind::expand:
      return {{"[3,1] -> [2,3,4]", [](auto& in) { return expand(in[0], {2, 3, 4}); }, {randn64({3, 1})}}};
    case OpKind::contiguous:
      return {{"of a transposed view", [](auto& in) { return contiguous(transpose(in[0], 0, 1)); }, {randn64({3, 4})}}};
    case OpKind::matmul: {
      std::vector<OpCase> cs;
      for (bool ta : {false, true})
        for (bool tb : {false, true}) {
          Shape sa = ta ? Shape{2, 4, 3} : Shape{2, 3, 4};
          Shape sb = tb ? Shape{2, 5, 4} : Shape{2, 4, 5};
          cs.push_back({"batched ta=" + std::to_string(ta) + " tb=" + std::to_string(tb),
                        [ta, tb](auto& in) { return matmul(in[0], in[1], ta, tb); }, {randn64(sa), randn64(sb)}});
          Shape sb2 = tb ? Shape{5, 4} : Shape{4, 5};
          cs.push_back({"2-D b ta=" + std::to_string(ta) + " tb=" + std::to_string(tb),
                        [ta, tb](auto& in) { return matmul(in[0], in[1], ta, tb); }, {randn64(sa), randn64(sb2)}});
        }
      return cs;
    }
    case OpKind::linear:
      return {{"3-D x with bias", [](auto& in) { return linear(in[0], in[1], in[2]); },
               {randn64({2, 3, 4}), randn64({5, 4}), randn64({5})}},
              {"no bias", [](auto& in) { return linear(in[0], in[1]); }, {randn64({3, 4}), randn64({2, 4})}}};
    case OpKind::layer_norm:
      return {{"[2,3,8]", [](auto& in) { return layer_norm(in[0], in[1], in[2]); },
               {randn64({2, 3, 8}), randn64({8}), randn64({8})}}};
    case OpKind::softmax:
      return {{"last axis of [3,5]", [](auto& in) { return softmax(in[0]); }, {randn64({3, 5})}}};
    case OpKind::attention:
      return {{"causal [1,2,5,3]", [](auto& in) { return attention(in[0], in[1], in[2], true); },
               {randn64({1, 2, 5, 3}), randn64({1, 2, 5, 3}), randn64({1, 2, 5, 3})}},
              {"non-causal [2,1,4,3]", [](auto& in) { return attention(in[0], in[1], in[2], false); },
               {randn64({2, 1, 4, 3}), randn64({2, 1, 4, 3}), randn64({2, 1, 4, 3})}}};
    case OpKind::dropout:
      return unary("p = 0.3", [](auto& in) { return dropout(in[0], 0.3); }, randn64({4, 8}));
    case OpKind::dropout_add:
      return {{"p = 0.3", [](auto& in) { return dropout_add(in[0], in[1], 0.3); }, {randn64({4, 8}), randn64({4, 8})}}};
    case OpKind::embedding:
      return {{"weight gradient with repeated ids",
               [](auto& in) { return embedding(in[0], in[1]); },
               {index_tensor({1, 3, 1, 0, 3, 3}, {2, 3}), randn64({5, 4})}}};
    case OpKind::cross_entropy:
      return {{"with an ignored row", [](auto& in) { return cross_entropy(in[0], in[1], -100); },
               {randn64({4, 6}), index_tensor({2, -100, 5, 0}, {4})}}};
    case OpKind::linear_cross_entropy:
      // In chunks of 2 rows: the chunks' sums of dW, the batch's divisor in every chunk, the
      // ignored row in the second chunk.
      return {{"chunks of 2 rows, an ignored row", [](auto& in) { return linear_cross_entropy(in[0], in[1], in[2], -100, 2); },
               {randn64({5, 3}), randn64({6, 3}), index_tensor({2, 4, -100, 5, 0}, {5})}},
              {"one chunk", [](auto& in) { return linear_cross_entropy(in[0], in[1], in[2]); },
               {randn64({4, 3}), randn64({6, 3}), index_tensor({1, 0, 5, 3}, {4})}}};
    case OpKind::conv2d:
      return {{"3x3 stride 1 padding 1 with bias", [](auto& in) { return conv2d(in[0], in[1], in[2], 1, 1); },
               {randn64({2, 3, 5, 4}), randn64({4, 3, 3, 3}), randn64({4})}},
              {"2x2 stride 2 no bias", [](auto& in) { return conv2d(in[0], in[1], Tensor(), 2, 0); },
               {randn64({1, 2, 4, 6}), randn64({3, 2, 2, 2})}}};
    case OpKind::group_norm:
      return {{"6 channels in 3 groups", [](auto& in) { return group_norm(in[0], in[1], in[2], 3); },
               {randn64({2, 6, 3, 2}), randn64({6}), randn64({6})}}};
    case OpKind::upsample_nearest:
      return unary("factor 2", [](auto& in) { return upsample_nearest(in[0], 2); }, randn64({1, 2, 3, 2}));
    case OpKind::avg_pool:
      return unary("factor 2", [](auto& in) { return avg_pool(in[0], 2); }, randn64({1, 2, 4, 6}));
    case OpKind::modulate:
      return {{"[2,3,4] by [2,4]", [](auto& in) { return modulate(in[0], in[1], in[2]); },
               {randn64({2, 3, 4}), randn64({2, 4}), randn64({2, 4})}}};
    case OpKind::timestep_embedding:
      return unary("dim 8", [](auto& in) { return timestep_embedding(in[0], 8); }, uniform64({3}, 0.0, 5.0));
    case OpKind::cast:
      // Through f32 for f64 inputs (the gradient check), through bf16 for f32 inputs (device parity).
      return {{"there and back", [](auto& in) {
                 DType mid = in[0].dtype() == DType::f64 ? DType::f32 : DType::bf16;
                 return mul(cast(cast(in[0], mid), in[0].dtype()), in[0]);
               }, {dyadic64({3, 4})}, std::ldexp(1.0, -20)}};
    case OpKind::custom: {
      CustomOp square{"square",
                      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mul(in[0], in[0])}; },
                      [](const std::vector<Tensor>& g, const std::vector<Tensor>& saved) {
                        return std::vector<Tensor>{mul_scalar(mul(g[0], saved[0]), 2.0)};
                      },
                      {0}};
      return {{"a user-defined square", [square](auto& in) { return custom(square, {in[0]})[0]; }, {randn64({3, 4})}}};
    }
  }
  return {};
}

}  // namespace remat::testing
