// A diffusion transformer in the MMDiT/Flux style. Images [B, 3, S, S] are patchified into N
// tokens of p*p*3 values; a conditioning stream holds the class-label token; adaLN modulation comes
// from the timestep + class embedding c [B, C]. `double_blocks` keep separate weights for image and
// conditioning tokens and attend jointly; `single_blocks` process the concatenated sequence; a
// final adaLN + linear predicts the velocity, unpatchified back to [B, 3, S, S].
#pragma once

#include <memory>
#include <string>

#include "nn/layers.h"

namespace remat {

struct DitConfig {
  std::string name = "custom";
  int64_t image = 32, patch = 2, channels = 256, heads = 8, double_blocks = 2, single_blocks = 4, classes = 4;
  int64_t batch = 16;
  bool ada_zero = true;  // adaLN-Zero: modulation and output layers start at zero (blocks start as identity)
  DType dtype = DType::f32;  // of the parameters and activations (f64 for exact gradient checks on the cpu)
};

// tiny (tests: 8x8, C 32, 2 double + 2 single) and small (32x32 RGB, patch 2, C 256, 8 heads, 2 + 4).
DitConfig dit_config(const std::string& name);
// Throws a clear error for a config no Dit can be built from; Dit's constructor calls it first.
void check_config(const DitConfig& c);
int64_t parameter_count(const DitConfig& c);  // without building the model

// shift/scale/gate chunks [B, C] from c [B, C]: Linear(SiLU(c)) split into `chunks`.
class AdaModulation final : public Module {
 public:
  AdaModulation(int64_t channels, int chunks, bool zero);
  std::vector<Tensor> operator()(const Tensor& c);
  std::shared_ptr<nn::Linear> lin;
  int chunks;
};

class DitDoubleBlock final : public Module {
 public:
  explicit DitDoubleBlock(const DitConfig& config);
  // Image tokens [B, N, C], conditioning tokens [B, M, C], c [B, C] -> both streams updated.
  std::pair<Tensor, Tensor> operator()(const Tensor& img, const Tensor& txt, const Tensor& c);

 private:
  struct Stream {
    std::shared_ptr<AdaModulation> mod;
    std::shared_ptr<nn::Linear> qkv, proj, fc, fc_out;
  };
  Stream make_stream(const std::string& prefix, const DitConfig& config);
  int64_t heads_;
  Stream img_, txt_;
  Tensor ln_one_, ln_zero_;  // LayerNorm without affine parameters
};

class DitSingleBlock final : public Module {
 public:
  explicit DitSingleBlock(const DitConfig& config);
  Tensor operator()(const Tensor& x, const Tensor& c);  // [B, N + M, C]

 private:
  int64_t heads_, channels_;
  std::shared_ptr<AdaModulation> mod_;
  std::shared_ptr<nn::Linear> lin1_, lin2_;  // C -> 3C + 4C (qkv and MLP in); C + 4C -> C
  Tensor ln_one_, ln_zero_;
};

class Dit final : public Module {
 public:
  explicit Dit(const DitConfig& config);
  // Velocity for noisy images x_t [B, 3, S, S] at times t [B] with labels [B] (i64).
  Tensor forward(const Tensor& x_t, const Tensor& t, const Tensor& labels);

  DitConfig config;
  std::shared_ptr<nn::Linear> patch_embed, time_in, time_out, final_linear;
  std::shared_ptr<nn::Embedding> label_embed;
  std::shared_ptr<AdaModulation> final_mod;
  std::shared_ptr<nn::ModuleList> double_blocks, single_blocks;
  Tensor pos;  // learned position embedding [N, C]

 private:
  Tensor ln_one_, ln_zero_;
};

// [B, C, S, S] <-> [B, (S/p)^2, C p p], as reshapes and permutes (differentiable).
Tensor patchify(const Tensor& images, int64_t patch);
Tensor unpatchify(const Tensor& tokens, int64_t patch, int64_t channels, int64_t size);

}  // namespace remat
