// The GPT reference model and its configurations.
#include "models/gpt.h"

#include <cmath>

namespace remat {

GptConfig gpt_config(const std::string& name) {
  GptConfig c;
  c.name = name;
  if (name == "tiny") {
    c.vocab = 64, c.channels = 32, c.heads = 4, c.layers = 2, c.seq_len = 16, c.batch = 2;
  } else if (name == "small") {
    c.vocab = 256, c.channels = 256, c.heads = 8, c.layers = 6, c.seq_len = 128, c.batch = 8;
  } else if (name == "gpt2") {
    c.vocab = 50304, c.channels = 768, c.heads = 12, c.layers = 12, c.seq_len = 1024, c.batch = 8;
  } else {
    REMAT_FAIL("unknown gpt config '", name, "': expected tiny, small or gpt2");
  }
  return c;
}

namespace {
// Every layer norm of the model feeds GEMMs alone (the qkv projection, the MLP's first linear, the
// head): under autocast they return bf16, the bits those GEMMs' casts gave.
constexpr AutocastOutput kGemmInput = AutocastOutput::compute;
}  // namespace

GptBlock::GptBlock(const GptConfig& c) : UnaryModule("GptBlock") {
  // GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers).
  double proj_std = 0.02 / std::sqrt(2.0 * static_cast<double>(c.layers));
  // The attention's and the MLP's output dropouts go with the residual additions (dropout_add: one
  // kernel each way where the two ops take two, or three in backward under autocast), so their own
  // are off; the masks are drawn at the same points of the random stream as theirs were.
  ln1 = register_module("ln1", std::make_shared<nn::LayerNorm>(c.channels, 1e-5, kGemmInput));
  attn = register_module("attn", std::make_shared<nn::CausalSelfAttention>(c.channels, c.heads, 0.0, proj_std));
  ln2 = register_module("ln2", std::make_shared<nn::LayerNorm>(c.channels, 1e-5, kGemmInput));
  mlp = register_module("mlp", std::make_shared<nn::Mlp>(c.channels, 4 * c.channels, 0.0, proj_std));
  residual_dropout = c.dropout;
  // Checkpoint levels: 1 single layers, 2 attention and MLP, 3 the transformer layer.
  for (auto& [path, m] : named_modules()) {
    if (m->type_name() == "Linear") m->set_checkpoint_level_of_module(1);
  }
  attn->set_checkpoint_level_of_module(2);
  mlp->set_checkpoint_level_of_module(2);
  set_checkpoint_level_of_module(3);
}

Tensor GptBlock::forward(const Tensor& x) {
  Tensor h = dropout_add((*attn)((*ln1)(x)), x, residual_dropout, is_training());
  return dropout_add((*mlp)((*ln2)(h)), h, residual_dropout, is_training());
}

void check_config(const GptConfig& c) {
  REMAT_CHECK(c.vocab > 0 && c.channels > 0 && c.heads > 0 && c.layers > 0 && c.seq_len > 0 && c.batch > 0,
              "gpt: expected positive sizes in config ", c.name, ", got vocab ", c.vocab, ", channels ", c.channels,
              ", heads ", c.heads, ", layers ", c.layers, ", seq_len ", c.seq_len, ", batch ", c.batch);
  REMAT_CHECK(c.channels % c.heads == 0, "gpt: expected channels (", c.channels, ") divisible by heads (", c.heads, ")");
  REMAT_CHECK(c.dropout >= 0 && c.dropout < 1, "gpt: expected dropout in [0, 1), got ", c.dropout);
  REMAT_CHECK(c.loss_chunk_rows >= 0, "gpt: expected loss_chunk_rows >= 0 (0: chosen by size), got ", c.loss_chunk_rows);
}

int64_t parameter_count(const GptConfig& c) {
  check_config(c);
  // In 128 bits: a config of huge sizes must be a clear error, not an overflow.
  __int128 C = c.channels;
  __int128 block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C);
  __int128 n = c.vocab * C + c.seq_len * C + c.layers * block + 2 * C;  // wte, wpe, blocks, ln_f
  REMAT_CHECK(n <= INT64_MAX, "gpt: config ", c.name, " would have more than 2^63 parameters");
  return static_cast<int64_t>(n);
}

double train_flops_per_token(const GptConfig& c) {
  check_config(c);
  const double C = static_cast<double>(c.channels), L = static_cast<double>(c.layers);
  const double matmul_weights = L * 12 * C * C + static_cast<double>(c.vocab) * C;  // qkv, proj, fc, fc2; head
  return 6 * matmul_weights + 12 * L * static_cast<double>(c.seq_len) * C;
}

Gpt::Gpt(const GptConfig& c) : Module("Gpt"), config(c) {
  check_config(c);
  nn::ParameterDTypeScope dtype(c.dtype);
  wte = register_module("wte", std::make_shared<nn::Embedding>(c.vocab, c.channels));
  wpe = register_module("wpe", std::make_shared<nn::Embedding>(c.seq_len, c.channels));
  drop = register_module("drop", std::make_shared<nn::Dropout>(c.dropout));
  blocks = register_module("blocks", std::make_shared<nn::ModuleList>());
  for (int64_t i = 0; i < c.layers; ++i) blocks->push_back(std::make_shared<GptBlock>(c));
  ln_f = register_module("ln_f", std::make_shared<nn::LayerNorm>(c.channels, 1e-5, kGemmInput));
  set_checkpoint_level_of_module(5);  // the whole network
}

Tensor Gpt::hidden(const Tensor& idx) {
  REMAT_CHECK(idx.dim() == 2 && idx.size(1) <= config.seq_len, "gpt: expected token ids [B, T] with T <= ",
              config.seq_len, ", got ", idx.meta_str());
  int64_t t = idx.size(1);
  Tensor pos = Tensor::arange(t, DType::i64, idx.device());
  Tensor h = (*drop)(add((*wte)(idx), (*wpe)(pos)));
  for (size_t i = 0; i < blocks->size(); ++i) h = blocks->at<GptBlock>(i)(h);
  return (*ln_f)(h);
}

Tensor Gpt::logits(const Tensor& idx) {
  auto guard = enter();
  return matmul(hidden(idx), wte->weight, false, true);  // tied LM head: h @ wte^T
}

Tensor Gpt::loss(const Tensor& idx, const Tensor& targets) {
  int64_t n = idx.numel();
  if (config.fused_loss) {
    // The head goes with the loss, after the model's forward (and outside its checkpoint regions,
    // as the unfused loss is): a region over the whole model does not re-run it.
    Tensor h;
    {
      auto guard = enter();
      h = hidden(idx);
    }
    return linear_cross_entropy(reshape(h, {n, config.channels}), wte->weight, reshape(targets, {n}), -100,
                                config.loss_chunk_rows);
  }
  Tensor lg = logits(idx);
  return cross_entropy(reshape(lg, {n, config.vocab}), reshape(targets, {n}));
}

}  // namespace remat
