// The UNet reference model.
#include "models/unet.h"

#include <cmath>

#include "models/images.h"

namespace remat {

namespace {

// A module whose forward is (x, temb) -> (x, skips) or (x, skips, temb) -> x: the paths.
class Path final : public Module {
 public:
  explicit Path(const std::string& name) : Module(name) {
    levels = register_module("levels", std::make_shared<nn::ModuleList>());
    // Its resolutions are the blocks of full, block_skip, sqrt, revolve and the budget planner.
    levels->set_block_container();
    set_checkpoint_level_of_module(4);
  }
  std::shared_ptr<nn::ModuleList> levels;
};

}  // namespace

UnetConfig unet_config(const std::string& name) {
  UnetConfig c;
  c.name = name;
  if (name == "tiny") {
    c.image = 8, c.base = 8, c.groups = 4, c.heads = 2, c.mults = {1, 2}, c.batch = 4;
  } else if (name == "small") {
    c.image = 32, c.base = 32, c.groups = 8, c.heads = 4, c.mults = {1, 2, 2}, c.batch = 16;
  } else {
    REMAT_FAIL("unknown unet config '", name, "': expected tiny or small");
  }
  return c;
}

ConvUnit::ConvUnit(int64_t cin, int64_t cout, int64_t groups_, double dropout_, double init_std)
    : UnaryModule("ConvUnit"), groups(groups_), dropout(dropout_) {
  gn_weight = nn::init_constant({cin}, 1.0);
  register_parameter("gn_weight", &gn_weight);
  gn_bias = nn::init_constant({cin}, 0.0);
  register_parameter("gn_bias", &gn_bias);
  weight = nn::init_normal({cout, cin, 3, 3}, init_std);
  register_parameter("weight", &weight);
  bias = nn::init_constant({cout}, 0.0);
  register_parameter("bias", &bias);
  set_checkpoint_level_of_module(1);
}

Tensor ConvUnit::forward(const Tensor& x) {
  Tensor h = silu(group_norm(x, gn_weight, gn_bias, static_cast<int>(groups)));
  return conv2d(remat::dropout(h, dropout, is_training()), weight, bias, 1, 1);
}

ResBlock::ResBlock(int64_t cin, int64_t cout, int64_t temb, const UnetConfig& cfg) : Module("ResBlock") {
  unit1 = register_module("unit1", std::make_shared<ConvUnit>(cin, cout, cfg.groups, 0.0, std::sqrt(1.0 / (9.0 * cin))));
  temb_proj = register_module("temb_proj", std::make_shared<nn::Linear>(temb, cout));
  unit2 = register_module("unit2", std::make_shared<ConvUnit>(cout, cout, cfg.groups, cfg.dropout, std::sqrt(0.1 / (9.0 * cout))));
  if (cin != cout) {
    skip_weight = nn::init_normal({cout, cin, 1, 1}, std::sqrt(1.0 / cin));
    register_parameter("skip_weight", &skip_weight);
  }
  set_checkpoint_level_of_module(2);
}

Tensor ResBlock::operator()(const Tensor& x, const Tensor& temb) {
  auto guard = enter();
  Tensor h = (*unit1)(x);
  Tensor t = (*temb_proj)(silu(temb));
  h = add(h, reshape(t, {t.size(0), t.size(1), 1, 1}));
  h = (*unit2)(h);
  return add(skip_weight.defined() ? conv2d(x, skip_weight) : x, h);
}

AttnBlock::AttnBlock(int64_t c, const UnetConfig& cfg) : UnaryModule("AttnBlock"), groups(cfg.groups), heads(cfg.heads) {
  gn_weight = nn::init_constant({c}, 1.0);
  register_parameter("gn_weight", &gn_weight);
  gn_bias = nn::init_constant({c}, 0.0);
  register_parameter("gn_bias", &gn_bias);
  qkv = register_module("qkv", std::make_shared<nn::Linear>(c, 3 * c));
  proj = register_module("proj", std::make_shared<nn::Linear>(c, c, true, 0.02));
  set_checkpoint_level_of_module(2);
}

Tensor AttnBlock::forward(const Tensor& x) {
  int64_t b = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), d = c / heads;
  Tensor h = permute(reshape(group_norm(x, gn_weight, gn_bias, static_cast<int>(groups)), {b, c, hw}), {0, 2, 1});
  auto parts = split((*qkv)(h), 2, {c, c, c});
  auto to_heads = [&](const Tensor& m) { return permute(reshape(m, {b, hw, heads, d}), {0, 2, 1, 3}); };
  Tensor y = attention(to_heads(parts[0]), to_heads(parts[1]), to_heads(parts[2]), false);
  y = (*proj)(reshape(permute(y, {0, 2, 1, 3}), {b, hw, c}));
  return add(x, reshape(permute(y, {0, 2, 1}), x.shape()));
}

UnetLevel::UnetLevel(int64_t cin, int64_t cout, int64_t temb, bool attend, const UnetConfig& cfg) : Module("UnetLevel") {
  res = register_module("res", std::make_shared<ResBlock>(cin, cout, temb, cfg));
  if (attend) attn = register_module("attn", std::make_shared<AttnBlock>(cout, cfg));
  set_checkpoint_level_of_module(3);
}

Tensor UnetLevel::operator()(const Tensor& x, const Tensor& temb) {
  auto guard = enter();
  Tensor h = (*res)(x, temb);
  return attn ? (*attn)(h) : h;
}

void check_config(const UnetConfig& c) {
  REMAT_CHECK(c.image > 0 && c.base > 0 && c.groups > 0 && c.heads > 0 && c.classes > 0 && c.batch > 0,
              "unet: expected positive sizes in config ", c.name, ", got image ", c.image, ", base ", c.base,
              ", groups ", c.groups, ", heads ", c.heads, ", classes ", c.classes, ", batch ", c.batch);
  REMAT_CHECK(!c.mults.empty() && c.mults.size() <= 16, "unet: expected 1 to 16 levels (mults), got ", c.mults.size());
  for (int64_t m : c.mults) {
    __int128 width = static_cast<__int128>(c.base) * m;  // in 128 bits: huge values are refused, not overflowed
    REMAT_CHECK(m > 0 && width <= (int64_t{1} << 40) && width % c.groups == 0 && width % c.heads == 0,
                "unet: expected every level's width (base ", c.base, " x mult ", m, ") from 1 to 2^40 and divisible ",
                "by groups (", c.groups, ") and heads (", c.heads, ")");
  }
  REMAT_CHECK(c.base % c.groups == 0, "unet: expected base (", c.base, ") divisible by groups (", c.groups, ")");
  REMAT_CHECK(c.image % (int64_t{1} << (c.mults.size() - 1)) == 0,
              "unet: expected the image side divisible by 2^(levels-1), got ", c.image);
  REMAT_CHECK(c.dropout >= 0 && c.dropout < 1, "unet: expected dropout in [0, 1), got ", c.dropout);
}

int64_t parameter_count(const UnetConfig& c) {
  check_config(c);
  // In 128 bits: a config of huge sizes must be a clear error, not an overflow.
  using Big = __int128;
  auto linear = [](Big in, Big out) { return in * out + out; };
  auto conv_unit = [](Big cin, Big cout) { return 2 * cin + cout * cin * 9 + cout; };
  Big temb = 4 * static_cast<Big>(c.base);
  auto level = [&](Big cin, Big cout, bool attend) {
    Big res = conv_unit(cin, cout) + linear(temb, cout) + conv_unit(cout, cout) + (cin != cout ? cout * cin : 0);
    Big attn = attend ? 2 * cout + linear(cout, 3 * cout) + linear(cout, cout) : 0;
    return res + attn;
  };
  Big n = static_cast<Big>(c.base) * 27 + c.base + linear(c.base, temb) + linear(temb, temb) + c.classes * temb;
  size_t levels = c.mults.size();
  std::vector<Big> widths;
  Big cin = c.base;
  for (size_t l = 0; l < levels; ++l) {
    widths.push_back(static_cast<Big>(c.base) * c.mults[l]);
    n += level(cin, widths[l], l == levels - 1);
    cin = widths[l];
  }
  for (size_t k = 0; k < levels; ++k) {
    size_t l = levels - 1 - k;
    n += level(cin + widths[l], widths[l], l == levels - 1);
    cin = widths[l];
  }
  n += conv_unit(cin, 3);
  REMAT_CHECK(n <= INT64_MAX, "unet: config ", c.name, " would have more than 2^63 parameters");
  return static_cast<int64_t>(n);
}

Unet::Unet(const UnetConfig& cfg) : Module("Unet"), config(cfg) {
  check_config(cfg);
  int64_t temb = 4 * cfg.base;
  nn::ParameterDTypeScope dtype(cfg.dtype);
  conv_in_w = nn::init_normal({cfg.base, 3, 3, 3}, std::sqrt(1.0 / 27.0));
  register_parameter("conv_in_w", &conv_in_w);
  conv_in_b = nn::init_constant({cfg.base}, 0.0);
  register_parameter("conv_in_b", &conv_in_b);
  time_in = register_module("time_in", std::make_shared<nn::Linear>(cfg.base, temb));
  time_out = register_module("time_out", std::make_shared<nn::Linear>(temb, temb));
  label_embed = register_module("label_embed", std::make_shared<nn::Embedding>(cfg.classes, temb));
  auto down_path = std::make_shared<Path>("DownPath"), up_path = std::make_shared<Path>("UpPath");
  down = register_module("down", down_path);
  up = register_module("up", up_path);
  size_t levels = cfg.mults.size();
  std::vector<int64_t> widths;
  int64_t cin = cfg.base;
  for (size_t l = 0; l < levels; ++l) {
    int64_t cout = cfg.base * cfg.mults[l];
    auto level = std::make_shared<UnetLevel>(cin, cout, temb, l == levels - 1, cfg);
    down_levels_.push_back(level.get());
    down_path->levels->push_back(level);
    widths.push_back(cout);
    cin = cout;
  }
  for (size_t k = 0; k < levels; ++k) {
    size_t l = levels - 1 - k;
    int64_t cout = widths[l];
    auto level = std::make_shared<UnetLevel>(cin + widths[l], cout, temb, l == levels - 1, cfg);
    up_levels_.push_back(level.get());
    up_path->levels->push_back(level);
    cin = cout;
  }
  conv_out = register_module("conv_out", std::make_shared<ConvUnit>(cin, 3, cfg.groups, 0.0, 0.0));  // zero init
  set_checkpoint_level_of_module(5);
}

Tensor Unet::forward(const Tensor& x_t, const Tensor& t, const Tensor& labels) {
  auto guard = enter();
  REMAT_CHECK(x_t.dim() == 4 && x_t.size(1) == 3 && x_t.size(2) == config.image && x_t.size(3) == config.image,
              "unet: expected images [B, 3, ", config.image, ", ", config.image, "], got ", shape_str(x_t.shape()));
  // Images and times arrive in f32 (the data); an f64 model computes in f64 from here on.
  Tensor x_in = is_floating(x_t.dtype()) && x_t.dtype() != conv_in_w.dtype() ? cast(x_t, conv_in_w.dtype()) : x_t;
  Tensor t_in = is_floating(t.dtype()) && t.dtype() != conv_in_w.dtype() ? cast(t, conv_in_w.dtype()) : t;
  Tensor temb = add((*time_out)(silu((*time_in)(timestep_embedding(mul_scalar(t_in, 1000.0), static_cast<int>(config.base))))),
                    class_embedding(*label_embed, labels, config.classes));
  Tensor h = conv2d(x_in, conv_in_w, conv_in_b, 1, 1);
  std::vector<Tensor> skips;
  {
    auto path = down->enter();
    for (size_t l = 0; l < down_levels_.size(); ++l) {
      h = (*down_levels_[l])(h, temb);
      skips.push_back(h);
      if (l + 1 < down_levels_.size()) h = avg_pool(h, 2);
    }
  }
  {
    auto path = up->enter();
    for (size_t k = 0; k < up_levels_.size(); ++k) {
      if (k > 0) h = upsample_nearest(h, 2);
      h = (*up_levels_[k])(concat({h, skips[skips.size() - 1 - k]}, 1), temb);
    }
  }
  return (*conv_out)(h);
}

}  // namespace remat
