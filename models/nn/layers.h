// Neural-network layers on the module tree. Shapes: B batch, T time, C channels, H heads.
// Call a layer through operator(), which runs the module's forward hooks around forward().
#pragma once

#include <memory>
#include <vector>

#include "../../autograd/module.h"
#include "../../autograd/ops.h"

namespace remat::nn {

// A module with one tensor in and one tensor out.
class UnaryModule : public Module {
 public:
  using Module::Module;
  virtual Tensor forward(const Tensor& x) = 0;
  Tensor operator()(const Tensor& x) {
    auto guard = enter();
    return forward(x);
  }
};

// Parameter initialisers, counted as parameter memory: normal(0, std), and a constant. They create
// parameter_dtype() tensors: f32 unless a ParameterDTypeScope says otherwise (models open one with
// their config's dtype, so an f64 model is drawn in f64).
Tensor init_normal(const Shape& shape, double std);
Tensor init_constant(const Shape& shape, double value);
DType parameter_dtype();
class ParameterDTypeScope {
 public:
  explicit ParameterDTypeScope(DType dtype);
  ~ParameterDTypeScope();
  ParameterDTypeScope(const ParameterDTypeScope&) = delete;
  ParameterDTypeScope& operator=(const ParameterDTypeScope&) = delete;

 private:
  DType previous_;
};

// y = x W^T + b, W [out, in].
class Linear final : public UnaryModule {
 public:
  Linear(int64_t in, int64_t out, bool bias = true, double init_std = 0.02);
  Tensor forward(const Tensor& x) override;
  Tensor weight, bias;
};

// `output`: what it returns under autocast (AutocastOutput in autograd/ops.h): `compute` where
// its output only feeds a GEMM.
class LayerNorm final : public UnaryModule {
 public:
  explicit LayerNorm(int64_t channels, double eps = 1e-5, AutocastOutput output = AutocastOutput::f32);
  Tensor forward(const Tensor& x) override;
  Tensor weight, bias;
  double eps;
  AutocastOutput output;
};

// idx [...] -> [..., C].
class Embedding final : public UnaryModule {
 public:
  Embedding(int64_t vocab, int64_t channels, double init_std = 0.02);
  Tensor forward(const Tensor& idx) override;
  Tensor weight;
};

class Dropout final : public UnaryModule {
 public:
  explicit Dropout(double p);
  Tensor forward(const Tensor& x) override;  // identity in eval mode
  double p;
};

class Gelu final : public UnaryModule {
 public:
  Gelu() : UnaryModule("Gelu") {}
  Tensor forward(const Tensor& x) override { return gelu(x); }
};

// Causal multi-head self-attention: x [B, T, C] -> [B, T, C]; fused qkv projection, output
// projection scaled for the residual stream, dropout on the output.
class CausalSelfAttention final : public UnaryModule {
 public:
  CausalSelfAttention(int64_t channels, int64_t heads, double dropout, double proj_std);
  Tensor forward(const Tensor& x) override;
  int64_t heads;
  std::shared_ptr<Linear> qkv, proj;
  std::shared_ptr<Dropout> drop;
};

// x [..., C] -> fc (4C) -> GELU(tanh) -> proj (C) -> dropout.
class Mlp final : public UnaryModule {
 public:
  Mlp(int64_t channels, int64_t hidden, double dropout, double proj_std);
  Tensor forward(const Tensor& x) override;
  std::shared_ptr<Linear> fc, proj;
  std::shared_ptr<Gelu> act;
  std::shared_ptr<Dropout> drop;
};

// Children named "0", "1", ...; not callable itself (a container of blocks).
class ModuleList final : public Module {
 public:
  ModuleList() : Module("ModuleList") {}
  void push_back(std::shared_ptr<Module> m) { register_module(std::to_string(size()), std::move(m)); }
  size_t size() const { return children().size(); }
  template <typename M = Module>
  M& at(size_t i) const {
    auto* m = dynamic_cast<M*>(children().at(i).second.get());
    REMAT_CHECK(m != nullptr, "ModuleList: child ", i, " is a ", children().at(i).second->type_name());
    return *m;
  }
};

// Runs its children in order.
class Sequential final : public UnaryModule {
 public:
  Sequential() : UnaryModule("Sequential") {}
  void push_back(std::shared_ptr<UnaryModule> m) { register_module(std::to_string(children().size()), std::move(m)); }
  Tensor forward(const Tensor& x) override;
};

}  // namespace remat::nn
