// GPT-2 style decoder: token + learned position embeddings, pre-LayerNorm blocks (causal
// multi-head attention, GELU(tanh) MLP, residuals, dropout), final LayerNorm, tied LM head.
// Shapes: idx [B, T] (i64) -> logits [B, T, V]. Blocks live in a container named `blocks`.
#pragma once

#include <memory>
#include <string>

#include "nn/layers.h"

namespace remat {

struct GptConfig {
  std::string name = "custom";
  int64_t vocab = 64, channels = 32, heads = 4, layers = 2, seq_len = 16, batch = 2;
  double dropout = 0.1;
  DType dtype = DType::f32;  // of the parameters and activations (f64 for exact gradient checks on the cpu)
  // The loss through linear_cross_entropy: the [B T, V] logits never whole (gpt2 at B 8, T 1024:
  // 786 MiB in bf16, 1.5 GiB in f32), for one more head GEMM a step.
  bool fused_loss = false;
  int64_t loss_chunk_rows = 0;  // rows of logits per chunk of the fused loss (0: chunks of at most 64 MiB)
};

// Named configurations: tiny (tests), small (CPU demo and bench), gpt2 (124M, GPU bench).
GptConfig gpt_config(const std::string& name);
// Throws a clear error for a config no model can be built from (sizes < 1, channels not divisible
// by heads, dropout outside [0, 1)); Gpt's constructor calls it first.
void check_config(const GptConfig& c);
// The number of parameters a Gpt of this config has, without building it.
int64_t parameter_count(const GptConfig& c);
// The model FLOPs of one training step (forward and backward) per token, as PaLM and llm.c count
// them for MFU: 6 per weight of every matmul (the blocks' linears and the tied LM head; no
// embedding lookups, norms or pointwise ops) plus 12 L T C for attention's two matmuls over the
// whole sequence (the causal half that is skipped counts too). Replays of checkpointing do not
// count: MFU measures what the model needs, not what the run did.
double train_flops_per_token(const GptConfig& c);

class GptBlock final : public nn::UnaryModule {
 public:
  GptBlock(const GptConfig& config);
  Tensor forward(const Tensor& x) override;
  std::shared_ptr<nn::LayerNorm> ln1, ln2;
  std::shared_ptr<nn::CausalSelfAttention> attn;
  std::shared_ptr<nn::Mlp> mlp;
  double residual_dropout;  // on attn's and mlp's outputs, applied with the residual additions
};

class Gpt final : public Module {
 public:
  explicit Gpt(const GptConfig& config);  // parameters drawn from the global random stream
  // Logits [B, T, V] for token ids [B, T].
  Tensor logits(const Tensor& idx);
  // Mean next-token cross-entropy of idx [B, T] against targets [B, T].
  Tensor loss(const Tensor& idx, const Tensor& targets);

  GptConfig config;
  std::shared_ptr<nn::Embedding> wte, wpe;
  std::shared_ptr<nn::Dropout> drop;
  std::shared_ptr<nn::ModuleList> blocks;
  std::shared_ptr<nn::LayerNorm> ln_f;

 private:
  // The final layer norm's output [B, T, C]: what the head reads (called inside forward's guard).
  Tensor hidden(const Tensor& idx);
};

}  // namespace remat
