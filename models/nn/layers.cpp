// Layer definitions: parameters with GPT-2 initialisation, forwards built from the ops.
#include "models/nn/layers.h"

#include <cmath>

namespace remat::nn {

namespace {
thread_local DType t_parameter_dtype = DType::f32;
}

DType parameter_dtype() { return t_parameter_dtype; }

ParameterDTypeScope::ParameterDTypeScope(DType dtype) : previous_(t_parameter_dtype) {
  REMAT_CHECK(dtype == DType::f32 || dtype == DType::f64, "parameters are created in f32 or f64, got ",
              dtype_name(dtype), " (convert a model with Module::to(dtype) instead)");
  t_parameter_dtype = dtype;
}

ParameterDTypeScope::~ParameterDTypeScope() { t_parameter_dtype = previous_; }

Tensor init_normal(const Shape& shape, double std) {
  MemoryCategoryScope scope(MemoryCategory::parameter);
  Tensor t = Tensor::randn(shape, t_parameter_dtype);
  if (t.dtype() == DType::f64) {
    double* p = t.data<double>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] *= std;
  } else {
    float* p = t.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(p[i] * std);
  }
  return t;
}

Tensor init_constant(const Shape& shape, double value) {
  MemoryCategoryScope scope(MemoryCategory::parameter);
  return Tensor::full(shape, value, t_parameter_dtype);
}

Linear::Linear(int64_t in, int64_t out, bool has_bias, double init_std) : UnaryModule("Linear") {
  REMAT_CHECK(in > 0 && out > 0, "Linear: expected positive sizes, got ", in, " -> ", out);
  weight = init_normal({out, in}, init_std);
  register_parameter("weight", &weight);
  if (has_bias) {
    bias = init_constant({out}, 0.0);
    register_parameter("bias", &bias);
  }
}

Tensor Linear::forward(const Tensor& x) { return linear(x, weight, bias); }

LayerNorm::LayerNorm(int64_t channels, double eps_, AutocastOutput output_)
    : UnaryModule("LayerNorm"), eps(eps_), output(output_) {
  weight = init_constant({channels}, 1.0);
  register_parameter("weight", &weight);
  bias = init_constant({channels}, 0.0);
  register_parameter("bias", &bias);
}

Tensor LayerNorm::forward(const Tensor& x) { return layer_norm(x, weight, bias, eps, output); }

Embedding::Embedding(int64_t vocab, int64_t channels, double init_std) : UnaryModule("Embedding") {
  weight = init_normal({vocab, channels}, init_std);
  register_parameter("weight", &weight);
}

Tensor Embedding::forward(const Tensor& idx) { return embedding(idx, weight); }

Dropout::Dropout(double p_) : UnaryModule("Dropout"), p(p_) {
  REMAT_CHECK(p >= 0 && p < 1, "Dropout: expected 0 <= p < 1, got ", p);
}

Tensor Dropout::forward(const Tensor& x) { return dropout(x, p, is_training()); }

CausalSelfAttention::CausalSelfAttention(int64_t channels, int64_t heads_, double p, double proj_std)
    : UnaryModule("CausalSelfAttention"), heads(heads_) {
  REMAT_CHECK(heads > 0 && channels % heads == 0, "CausalSelfAttention: expected channels divisible by heads, got ",
              channels, " and ", heads);
  qkv = register_module("qkv", std::make_shared<Linear>(channels, 3 * channels));
  proj = register_module("proj", std::make_shared<Linear>(channels, channels, true, proj_std));
  drop = register_module("drop", std::make_shared<Dropout>(p));
}

Tensor CausalSelfAttention::forward(const Tensor& x) {
  int64_t b = x.size(0), t = x.size(1), c = x.size(2), d = c / heads;
  auto parts = split((*qkv)(x), 2, {c, c, c});
  auto to_heads = [&](const Tensor& m) { return permute(reshape(m, {b, t, heads, d}), {0, 2, 1, 3}); };
  Tensor y = attention(to_heads(parts[0]), to_heads(parts[1]), to_heads(parts[2]), /*causal=*/true);
  y = reshape(permute(y, {0, 2, 1, 3}), {b, t, c});
  return (*drop)((*proj)(y));
}

Mlp::Mlp(int64_t channels, int64_t hidden, double p, double proj_std) : UnaryModule("Mlp") {
  fc = register_module("fc", std::make_shared<Linear>(channels, hidden));
  act = register_module("act", std::make_shared<Gelu>());
  proj = register_module("proj", std::make_shared<Linear>(hidden, channels, true, proj_std));
  drop = register_module("drop", std::make_shared<Dropout>(p));
}

// One statement per layer: a nested call would keep every intermediate (the 4C-wide GELU output
// among them) alive until the whole expression ends, above what the backward needs.
Tensor Mlp::forward(const Tensor& x) {
  Tensor h = (*fc)(x);
  h = (*act)(h);
  h = (*proj)(h);
  return (*drop)(h);
}

Tensor Sequential::forward(const Tensor& x) {
  Tensor h = x;
  for (auto& [name, child] : children()) {
    auto* m = dynamic_cast<UnaryModule*>(child.get());
    REMAT_CHECK(m != nullptr, "Sequential: child ", name, " (", child->type_name(), ") is not a one-tensor module");
    h = (*m)(h);
  }
  return h;
}

}  // namespace remat::nn
