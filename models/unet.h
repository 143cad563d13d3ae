// A small diffusion UNet: residual blocks (GroupNorm, SiLU, 3x3 conv, time-embedding projection,
// dropout), self-attention at the lowest resolution, average-pool down and nearest up sampling
// with skip connections. Checkpoint levels: 1 norm+act+conv units, 2 residual and attention
// blocks, 3 a resolution level, 4 the down and up paths, 5 the whole network.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nn/layers.h"

namespace remat {

struct UnetConfig {
  std::string name = "custom";
  int64_t image = 32, base = 32, groups = 8, heads = 4, classes = 4, batch = 16;
  std::vector<int64_t> mults = {1, 2, 2};
  double dropout = 0.1;
  DType dtype = DType::f32;  // of the parameters and activations (f64 for exact gradient checks on the cpu)
};

// tiny (tests: 8x8, base 8, 2 levels) and small (32x32 RGB, base 32, 3 levels).
UnetConfig unet_config(const std::string& name);
// Throws a clear error for a config no Unet can be built from; Unet's constructor calls it first.
void check_config(const UnetConfig& c);
int64_t parameter_count(const UnetConfig& c);  // without building the model

// GroupNorm -> SiLU -> (dropout) -> 3x3 conv. Level 1.
class ConvUnit final : public nn::UnaryModule {
 public:
  ConvUnit(int64_t cin, int64_t cout, int64_t groups, double dropout, double init_std);
  Tensor forward(const Tensor& x) override;
  Tensor gn_weight, gn_bias, weight, bias;
  int64_t groups;
  double dropout;
};

// Level 2.
class ResBlock final : public Module {
 public:
  ResBlock(int64_t cin, int64_t cout, int64_t temb, const UnetConfig& config);
  Tensor operator()(const Tensor& x, const Tensor& temb);
  std::shared_ptr<ConvUnit> unit1, unit2;
  std::shared_ptr<nn::Linear> temb_proj;
  Tensor skip_weight;  // 1x1 conv when channels change
};

// Level 2: x + proj(attention(norm(x))) over the H*W positions.
class AttnBlock final : public nn::UnaryModule {
 public:
  AttnBlock(int64_t channels, const UnetConfig& config);
  Tensor forward(const Tensor& x) override;
  Tensor gn_weight, gn_bias;
  std::shared_ptr<nn::Linear> qkv, proj;
  int64_t groups, heads;
};

// One resolution: a residual block and, at the lowest resolution, attention. Level 3.
class UnetLevel final : public Module {
 public:
  UnetLevel(int64_t cin, int64_t cout, int64_t temb, bool attend, const UnetConfig& config);
  Tensor operator()(const Tensor& x, const Tensor& temb);
  std::shared_ptr<ResBlock> res;
  std::shared_ptr<AttnBlock> attn;  // null above the lowest resolution
};

class Unet final : public Module {
 public:
  explicit Unet(const UnetConfig& config);
  // Velocity for noisy images x_t [B, 3, S, S] at times t [B] with labels [B] (i64).
  Tensor forward(const Tensor& x_t, const Tensor& t, const Tensor& labels);

  UnetConfig config;
  Tensor conv_in_w, conv_in_b;
  std::shared_ptr<nn::Linear> time_in, time_out;
  std::shared_ptr<nn::Embedding> label_embed;
  std::shared_ptr<Module> down, up;  // the two paths (level 4), holding `levels`
  std::shared_ptr<ConvUnit> conv_out;

 private:
  std::vector<UnetLevel*> down_levels_, up_levels_;
};

}  // namespace remat
