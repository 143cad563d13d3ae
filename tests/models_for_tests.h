// Small models for checkpoint tests: MLP blocks and pre-LN transformer blocks with dropout.
// Shapes: x [B, C] for MLP blocks, [B, T, C] for transformer blocks.
#pragma once

#include <cstring>
#include <functional>
#include <vector>

#include "extension.h"  // the tests reach the tape and the backends too

namespace remat::testing {

struct MlpBlock {
  Tensor w1, b1, w2, b2;
  MlpBlock(int64_t c, int64_t hidden) {
    MemoryCategoryScope params(MemoryCategory::parameter);
    w1 = (Tensor::randn({hidden, c}) * 0.2).detach().set_requires_grad(true);
    b1 = Tensor::zeros({hidden}).set_requires_grad(true);
    w2 = (Tensor::randn({c, hidden}) * 0.2).detach().set_requires_grad(true);
    b2 = Tensor::zeros({c}).set_requires_grad(true);
  }
  Tensor operator()(const Tensor& x) const { return add(x, linear(gelu(linear(x, w1, b1)), w2, b2)); }
  std::vector<Tensor> params() const { return {w1, b1, w2, b2}; }
};

struct TransformerBlock {
  int64_t heads;
  double p_drop;
  Tensor ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc, b_fc, w_out, b_out;
  TransformerBlock(int64_t c, int64_t heads_, double p) : heads(heads_), p_drop(p) {
    MemoryCategoryScope params(MemoryCategory::parameter);
    auto w = [](Shape s) { return (Tensor::randn(s) * 0.1).detach().set_requires_grad(true); };
    auto ones = [](int64_t n) { return Tensor::ones({n}).set_requires_grad(true); };
    auto zeros = [](int64_t n) { return Tensor::zeros({n}).set_requires_grad(true); };
    ln1_w = ones(c), ln1_b = zeros(c), w_qkv = w({3 * c, c}), b_qkv = zeros(3 * c), w_proj = w({c, c});
    b_proj = zeros(c), ln2_w = ones(c), ln2_b = zeros(c), w_fc = w({4 * c, c}), b_fc = zeros(4 * c);
    w_out = w({c, 4 * c}), b_out = zeros(c);
  }
  Tensor operator()(const Tensor& x) const {
    int64_t b = x.size(0), t = x.size(1), c = x.size(2), d = c / heads;
    auto qkv = split(linear(layer_norm(x, ln1_w, ln1_b), w_qkv, b_qkv), 2, {c, c, c});
    auto heads_of = [&](const Tensor& m) { return permute(reshape(m, {b, t, heads, d}), {0, 2, 1, 3}); };
    Tensor y = attention(heads_of(qkv[0]), heads_of(qkv[1]), heads_of(qkv[2]), true);
    y = reshape(permute(y, {0, 2, 1, 3}), {b, t, c});
    Tensor h = add(x, dropout(linear(y, w_proj, b_proj), p_drop));
    Tensor m = linear(gelu(linear(layer_norm(h, ln2_w, ln2_b), w_fc, b_fc)), w_out, b_out);
    return add(h, dropout(m, p_drop));
  }
  std::vector<Tensor> params() const {
    return {ln1_w, ln1_b, w_qkv, b_qkv, w_proj, b_proj, ln2_w, ln2_b, w_fc, b_fc, w_out, b_out};
  }
};

// Raw bytes of every gradient, for bitwise comparison (a missing gradient is an empty entry).
inline std::vector<std::vector<char>> grad_bytes(const std::vector<Tensor>& leaves) {
  std::vector<std::vector<char>> out;
  for (const Tensor& t : leaves) {
    Tensor g = t.grad();
    std::vector<char> bytes;
    if (g.defined()) {
      Tensor c = g.as_contiguous().to(Device::cpu());
      bytes.resize(c.nbytes());
      std::memcpy(bytes.data(), c.raw_data(), c.nbytes());
    }
    out.push_back(std::move(bytes));
  }
  return out;
}

// Runs loss_fn with a fixed random stream, backpropagates, and returns the gradient bytes.
inline std::vector<std::vector<char>> run_grads(const std::vector<Tensor>& leaves, const std::function<Tensor()>& loss_fn,
                                                uint64_t seed = 1234) {
  for (const Tensor& t : leaves) const_cast<Tensor&>(t).zero_grad();
  set_rng_state({seed, 0});
  Tensor loss = loss_fn();
  backward(loss);
  return grad_bytes(leaves);
}

}  // namespace remat::testing
