// The DiT reference model.
#include "models/dit.h"

#include <cmath>

#include "models/images.h"

namespace remat {

namespace {

// [B, L, C] -> [B, H, L, D] and back.
Tensor to_heads(const Tensor& m, int64_t heads) {
  int64_t b = m.size(0), l = m.size(1), c = m.size(2);
  return permute(reshape(m, {b, l, heads, c / heads}), {0, 2, 1, 3});
}
Tensor from_heads(const Tensor& m) {
  int64_t b = m.size(0), h = m.size(1), l = m.size(2), d = m.size(3);
  return reshape(permute(m, {0, 2, 1, 3}), {b, l, h * d});
}

// x + gate[:, None, :] * y
Tensor gated(const Tensor& x, const Tensor& gate, const Tensor& y) {
  return add(x, mul(reshape(gate, {gate.size(0), 1, gate.size(1)}), y));
}

// 2-D sin-cos position embedding (DiT, after MAE): a quarter of the channels each for the sine and
// cosine of the patch row and of its column, at geometric frequencies. It initialises the learned
// embedding so that attention can tell patches apart by place from the first step; with small
// random positions the model learned colours long before it learned where patches sit.
Tensor sincos_position_embedding(int64_t grid, int64_t channels) {
  std::vector<double> values(static_cast<size_t>(grid * grid * channels), 0.0);
  int64_t quarter = channels / 4;
  for (int64_t y = 0; y < grid; ++y)
    for (int64_t x = 0; x < grid; ++x) {
      double* row = values.data() + (y * grid + x) * channels;
      for (int64_t i = 0; i < quarter; ++i) {
        double omega = std::pow(10000.0, -static_cast<double>(i) / static_cast<double>(quarter));
        row[i] = std::sin(y * omega);
        row[quarter + i] = std::cos(y * omega);
        row[2 * quarter + i] = std::sin(x * omega);
        row[3 * quarter + i] = std::cos(x * omega);
      }
    }
  MemoryCategoryScope scope(MemoryCategory::parameter);
  return Tensor::from_vector(values, {grid * grid, channels}).to(nn::parameter_dtype());
}

}  // namespace

DitConfig dit_config(const std::string& name) {
  DitConfig c;
  c.name = name;
  if (name == "tiny") {
    c.image = 8, c.patch = 2, c.channels = 32, c.heads = 4, c.double_blocks = 2, c.single_blocks = 2, c.batch = 4;
  } else if (name == "small") {
    c.image = 32, c.patch = 2, c.channels = 256, c.heads = 8, c.double_blocks = 2, c.single_blocks = 4, c.batch = 16;
  } else {
    REMAT_FAIL("unknown dit config '", name, "': expected tiny or small");
  }
  return c;
}

Tensor patchify(const Tensor& images, int64_t p) {
  int64_t b = images.size(0), c = images.size(1), s = images.size(2), g = s / p;
  REMAT_CHECK(images.dim() == 4 && images.size(3) == s && s % p == 0, "patchify: expected square images with a side ",
              "divisible by ", p, ", got ", shape_str(images.shape()));
  Tensor x = reshape(images, {b, c, g, p, g, p});
  x = permute(x, {0, 2, 4, 1, 3, 5});  // [B, gy, gx, C, py, px]
  return reshape(x, {b, g * g, c * p * p});
}

Tensor unpatchify(const Tensor& tokens, int64_t p, int64_t c, int64_t s) {
  int64_t b = tokens.size(0), g = s / p;
  Tensor x = reshape(tokens, {b, g, g, c, p, p});
  x = permute(x, {0, 3, 1, 4, 2, 5});  // [B, C, gy, py, gx, px]
  return reshape(x, {b, c, s, s});
}

AdaModulation::AdaModulation(int64_t channels, int chunks_, bool zero) : Module("AdaModulation"), chunks(chunks_) {
  lin = register_module("lin", std::make_shared<nn::Linear>(channels, chunks * channels, true, zero ? 0.0 : 0.02));
}

std::vector<Tensor> AdaModulation::operator()(const Tensor& c) {
  auto guard = enter();
  int64_t width = c.size(1);
  return split((*lin)(silu(c)), 1, std::vector<int64_t>(chunks, width));
}

DitDoubleBlock::Stream DitDoubleBlock::make_stream(const std::string& prefix, const DitConfig& cfg) {
  int64_t c = cfg.channels;
  double out_std = cfg.ada_zero ? 0.02 / std::sqrt(2.0 * (cfg.double_blocks + cfg.single_blocks)) : 0.02;
  Stream s;
  s.mod = register_module(prefix + "_mod", std::make_shared<AdaModulation>(c, 6, cfg.ada_zero));
  s.qkv = register_module(prefix + "_qkv", std::make_shared<nn::Linear>(c, 3 * c));
  s.proj = register_module(prefix + "_proj", std::make_shared<nn::Linear>(c, c, true, out_std));
  s.fc = register_module(prefix + "_fc", std::make_shared<nn::Linear>(c, 4 * c));
  s.fc_out = register_module(prefix + "_fc_out", std::make_shared<nn::Linear>(4 * c, c, true, out_std));
  return s;
}

DitDoubleBlock::DitDoubleBlock(const DitConfig& cfg) : Module("DitDoubleBlock"), heads_(cfg.heads) {
  img_ = make_stream("img", cfg);
  txt_ = make_stream("txt", cfg);
  ln_one_ = nn::init_constant({cfg.channels}, 1.0);
  register_buffer("ln_one", &ln_one_, /*persistent=*/false);
  ln_zero_ = nn::init_constant({cfg.channels}, 0.0);
  register_buffer("ln_zero", &ln_zero_, /*persistent=*/false);
}

std::pair<Tensor, Tensor> DitDoubleBlock::operator()(const Tensor& img, const Tensor& txt, const Tensor& c) {
  auto guard = enter();
  int64_t n = img.size(1), m = txt.size(1), width = img.size(2);
  auto mi = (*img_.mod)(c), mt = (*txt_.mod)(c);  // shift1, scale1, gate1, shift2, scale2, gate2
  auto norm = [&](const Tensor& x, const Tensor& shift, const Tensor& scale) {
    return modulate(layer_norm(x, ln_one_, ln_zero_, 1e-6), shift, scale);
  };
  auto qi = split((*img_.qkv)(norm(img, mi[0], mi[1])), 2, {width, width, width});
  auto qt = split((*txt_.qkv)(norm(txt, mt[0], mt[1])), 2, {width, width, width});
  // Joint attention over the conditioning tokens followed by the image tokens.
  std::vector<Tensor> qkv;
  for (int k = 0; k < 3; ++k) qkv.push_back(to_heads(concat({qt[k], qi[k]}, 1), heads_));
  Tensor joint = from_heads(attention(qkv[0], qkv[1], qkv[2], /*causal=*/false));
  auto parts = split(joint, 1, {m, n});
  Tensor txt1 = gated(txt, mt[2], (*txt_.proj)(parts[0]));
  Tensor img1 = gated(img, mi[2], (*img_.proj)(parts[1]));
  Tensor img2 = gated(img1, mi[5], (*img_.fc_out)(gelu((*img_.fc)(norm(img1, mi[3], mi[4])))));
  Tensor txt2 = gated(txt1, mt[5], (*txt_.fc_out)(gelu((*txt_.fc)(norm(txt1, mt[3], mt[4])))));
  return {img2, txt2};
}

DitSingleBlock::DitSingleBlock(const DitConfig& cfg)
    : Module("DitSingleBlock"), heads_(cfg.heads), channels_(cfg.channels) {
  int64_t c = cfg.channels;
  double out_std = cfg.ada_zero ? 0.02 / std::sqrt(2.0 * (cfg.double_blocks + cfg.single_blocks)) : 0.02;
  mod_ = register_module("mod", std::make_shared<AdaModulation>(c, 3, cfg.ada_zero));
  lin1_ = register_module("lin1", std::make_shared<nn::Linear>(c, 3 * c + 4 * c));
  lin2_ = register_module("lin2", std::make_shared<nn::Linear>(c + 4 * c, c, true, out_std));
  ln_one_ = nn::init_constant({c}, 1.0);
  register_buffer("ln_one", &ln_one_, /*persistent=*/false);
  ln_zero_ = nn::init_constant({c}, 0.0);
  register_buffer("ln_zero", &ln_zero_, /*persistent=*/false);
}

Tensor DitSingleBlock::operator()(const Tensor& x, const Tensor& c) {
  auto guard = enter();
  int64_t w = channels_;
  auto m = (*mod_)(c);  // shift, scale, gate
  Tensor h = modulate(layer_norm(x, ln_one_, ln_zero_, 1e-6), m[0], m[1]);
  auto parts = split((*lin1_)(h), 2, {w, w, w, 4 * w});
  Tensor attn = from_heads(attention(to_heads(parts[0], heads_), to_heads(parts[1], heads_), to_heads(parts[2], heads_), false));
  Tensor out = (*lin2_)(concat({attn, gelu(parts[3])}, 2));  // attention and MLP in parallel (Flux)
  return gated(x, m[2], out);
}

void check_config(const DitConfig& c) {
  REMAT_CHECK(c.image > 0 && c.patch > 0 && c.channels > 0 && c.heads > 0 && c.double_blocks >= 0 &&
                  c.single_blocks >= 0 && c.classes > 0 && c.batch > 0,
              "dit: expected positive sizes in config ", c.name, ", got image ", c.image, ", patch ", c.patch,
              ", channels ", c.channels, ", heads ", c.heads, ", blocks ", c.double_blocks, " + ", c.single_blocks,
              ", classes ", c.classes, ", batch ", c.batch);
  REMAT_CHECK(c.image % c.patch == 0 && c.channels % c.heads == 0 && c.channels % 2 == 0,
              "dit: expected image divisible by patch, channels by heads and even, got image ", c.image, ", patch ",
              c.patch, ", channels ", c.channels, ", heads ", c.heads);
}

int64_t parameter_count(const DitConfig& c) {
  check_config(c);
  // In 128 bits: a config of huge sizes must be a clear error, not an overflow.
  __int128 C = c.channels, pv = 3 * static_cast<__int128>(c.patch) * c.patch, g = c.image / c.patch;
  auto linear = [](__int128 in, __int128 out) { return in * out + out; };
  __int128 stream = linear(C, 6 * C) + linear(C, 3 * C) + linear(C, C) + linear(C, 4 * C) + linear(4 * C, C);
  __int128 single = linear(C, 3 * C) + linear(C, 7 * C) + linear(5 * C, C);
  __int128 n = linear(pv, C) + g * g * C + 2 * linear(C, C) + c.classes * C + c.double_blocks * 2 * stream +
               c.single_blocks * single + linear(C, 2 * C) + linear(C, pv);
  REMAT_CHECK(n <= INT64_MAX, "dit: config ", c.name, " would have more than 2^63 parameters");
  return static_cast<int64_t>(n);
}

Dit::Dit(const DitConfig& cfg) : Module("Dit"), config(cfg) {
  check_config(cfg);
  int64_t c = cfg.channels, patch_values = 3 * cfg.patch * cfg.patch;
  nn::ParameterDTypeScope dtype(cfg.dtype);
  // Xavier-normal patch embedding, so that content and position start at comparable scales.
  double patch_std = std::sqrt(2.0 / static_cast<double>(patch_values + c));
  patch_embed = register_module("patch_embed", std::make_shared<nn::Linear>(patch_values, c, true, patch_std));
  pos = sincos_position_embedding(cfg.image / cfg.patch, c);
  register_parameter("pos", &pos);
  time_in = register_module("time_in", std::make_shared<nn::Linear>(c, c));
  time_out = register_module("time_out", std::make_shared<nn::Linear>(c, c));
  label_embed = register_module("label_embed", std::make_shared<nn::Embedding>(cfg.classes, c));
  double_blocks = register_module("double_blocks", std::make_shared<nn::ModuleList>());
  for (int64_t i = 0; i < cfg.double_blocks; ++i) double_blocks->push_back(std::make_shared<DitDoubleBlock>(cfg));
  single_blocks = register_module("single_blocks", std::make_shared<nn::ModuleList>());
  for (int64_t i = 0; i < cfg.single_blocks; ++i) single_blocks->push_back(std::make_shared<DitSingleBlock>(cfg));
  final_mod = register_module("final_mod", std::make_shared<AdaModulation>(c, 2, cfg.ada_zero));
  final_linear = register_module("final_linear", std::make_shared<nn::Linear>(c, patch_values, true, cfg.ada_zero ? 0.0 : 0.02));
  ln_one_ = nn::init_constant({c}, 1.0);
  register_buffer("ln_one", &ln_one_, /*persistent=*/false);
  ln_zero_ = nn::init_constant({c}, 0.0);
  register_buffer("ln_zero", &ln_zero_, /*persistent=*/false);
  for (auto& [name, block] : double_blocks->children()) block->set_checkpoint_level_of_module(3);
  for (auto& [name, block] : single_blocks->children()) block->set_checkpoint_level_of_module(3);
  set_checkpoint_level_of_module(5);
}

Tensor Dit::forward(const Tensor& x_t, const Tensor& t, const Tensor& labels) {
  auto guard = enter();
  REMAT_CHECK(x_t.dim() == 4 && x_t.size(1) == 3 && x_t.size(2) == config.image && x_t.size(3) == config.image,
              "dit: expected images [B, 3, ", config.image, ", ", config.image, "], got ", shape_str(x_t.shape()));
  int64_t b = x_t.size(0), width = config.channels;
  // Images and times arrive in f32 (the data); an f64 model computes in f64 from here on.
  Tensor x_in = is_floating(x_t.dtype()) && x_t.dtype() != pos.dtype() ? cast(x_t, pos.dtype()) : x_t;
  Tensor t_in = is_floating(t.dtype()) && t.dtype() != pos.dtype() ? cast(t, pos.dtype()) : t;
  Tensor img = add((*patch_embed)(patchify(x_in, config.patch)), pos);
  Tensor label = class_embedding(*label_embed, labels, config.classes);  // [B, C]
  Tensor c = add((*time_out)(silu((*time_in)(timestep_embedding(mul_scalar(t_in, 1000.0), static_cast<int>(width))))), label);
  Tensor txt = reshape(label, {b, 1, width});                               // the conditioning stream
  for (size_t i = 0; i < double_blocks->size(); ++i) std::tie(img, txt) = double_blocks->at<DitDoubleBlock>(i)(img, txt, c);
  Tensor x = concat({txt, img}, 1);
  for (size_t i = 0; i < single_blocks->size(); ++i) x = single_blocks->at<DitSingleBlock>(i)(x, c);
  Tensor tokens = split(x, 1, {1, x.size(1) - 1})[1];
  auto m = (*final_mod)(c);
  Tensor out = (*final_linear)(modulate(layer_norm(tokens, ln_one_, ln_zero_, 1e-6), m[0], m[1]));
  return unpatchify(out, config.patch, 3, config.image);
}

}  // namespace remat
