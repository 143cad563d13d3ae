// Policies and application APIs on the GPT reference model and on small module trees:
// bitwise gradients, placement, levels in train/eval, parameter names, SAC counts, errors.
#include <catch.hpp>
#include <memory>

#include "models/gpt.h"
#include "models_for_tests.h"

using namespace remat;
using namespace remat::testing;
using Catch::Matchers::Contains;

namespace {

GptConfig tiny4() {
  GptConfig c = gpt_config("tiny");
  c.layers = 4;  // enough blocks for block_skip to differ from full
  return c;
}

struct GptFixture {
  Gpt model;
  Tensor idx, targets;
  GptFixture() : model((manual_seed(21), tiny4())) {
    std::vector<int64_t> ids, next;
    for (int i = 0; i < 2 * 16; ++i) {
      ids.push_back((i * 7 + 3) % 64);
      next.push_back((i * 5 + 1) % 64);
    }
    idx = Tensor::from_vector(ids, {2, 16});
    targets = Tensor::from_vector(next, {2, 16});
  }
  std::vector<std::vector<char>> grads() {
    return run_grads(model.parameters(), [&] { return model.loss(idx, targets); });
  }
};

// A module tree with two block containers (one nested deeper) for placement tests.
class Block final : public nn::UnaryModule {
 public:
  Block() : UnaryModule("Block") { lin = register_module("lin", std::make_shared<nn::Linear>(4, 4)); }
  Tensor forward(const Tensor& x) override { return add(x, tanh((*lin)(x))); }
  std::shared_ptr<nn::Linear> lin;
};

class TwoStreams final : public Module {
 public:
  TwoStreams() : Module("TwoStreams") {
    double_blocks = register_module("double_blocks", std::make_shared<nn::ModuleList>());
    for (int i = 0; i < 5; ++i) double_blocks->push_back(std::make_shared<Block>());
    auto inner = register_module("backbone", std::make_shared<nn::ModuleList>());
    single_blocks = inner->register_module("single_blocks", std::make_shared<nn::ModuleList>());
    for (int i = 0; i < 4; ++i) single_blocks->push_back(std::make_shared<Block>());
  }
  Tensor forward(const Tensor& x) {
    auto guard = enter();
    Tensor h = x;
    for (size_t i = 0; i < double_blocks->size(); ++i) h = double_blocks->at<Block>(i)(h);
    for (size_t i = 0; i < single_blocks->size(); ++i) h = single_blocks->at<Block>(i)(h);
    return h;
  }
  std::shared_ptr<nn::ModuleList> double_blocks, single_blocks;
};

std::vector<std::string> param_names(const Module& m) {
  std::vector<std::string> out;
  for (auto& [name, p] : m.named_parameters()) out.push_back(name);
  return out;
}

std::vector<bool> checkpointed(const nn::ModuleList& list) {
  std::vector<bool> out;
  for (auto& [name, child] : list.children()) out.push_back(is_checkpointed(*child));
  return out;
}

// The FastVideo `ops` rule as a small custom policy: save attention outputs and every other matrix
// product (the first, third, ... in execution order), recompute the rest.
Policy fastvideo_rule() {
  auto products = std::make_shared<int>(0);
  return {"fastvideo_ops", [products](const PolicyContext& ctx) {
            if (ctx.kind == OpKind::attention) return Decision::must_save;
            if (ctx.kind == OpKind::matmul || ctx.kind == OpKind::linear)
              return ++*products % 2 == 1 ? Decision::must_save : Decision::prefer_recompute;
            return Decision::prefer_recompute;
          }};
}

}  // namespace

TEST_CASE("gpt tiny gradients are bitwise equal to no checkpointing under every policy string", "[policy][gpt]") {
  GptFixture f;
  auto plain = f.grads();
  for (const char* policy : {"full", "ops", "block_skip:2", "block_skip:3", "level:1", "level:2", "level:3", "level:4",
                             "level:5", "sac:matmul,attention", "sac:layer_norm"}) {
    apply_policy(f.model, parse_policy(policy));
    reset_checkpoint_counters();
    auto got = f.grads();
    INFO("policy " << policy);
    CHECK(got == plain);
    CHECK(checkpoint_counters().ops_forward > 0);
  }
  remove_checkpointing(f.model);
}

TEST_CASE("gpt tiny with the fused loss in chunks: bitwise equal to no checkpointing under every policy",
          "[policy][gpt][fused-loss]") {
  GptConfig c = tiny4();
  c.fused_loss = true;
  c.loss_chunk_rows = 12;  // 32 rows: chunks of 12, 12 and 8
  manual_seed(21);
  Gpt model(c);
  GptFixture f;  // the same weights and tokens, the head and loss unfused
  auto loss_fn = [&] { return model.loss(f.idx, f.targets); };
  auto plain = run_grads(model.parameters(), loss_fn);
  // The same model unfused: loss and gradients within rounding (the chunks' GEMMs, dW summed by
  // chunks).
  set_rng_state({1234, 0});
  double fused_loss = model.loss(f.idx, f.targets).item();
  set_rng_state({1234, 0});
  CHECK(fused_loss == Approx(f.model.loss(f.idx, f.targets).item()).epsilon(1e-6));
  f.grads();
  std::vector<Tensor> fused_params = model.parameters(), unfused_params = f.model.parameters();
  for (size_t i = 0; i < fused_params.size(); ++i) {
    std::vector<float> a = fused_params[i].grad().to_vector<float>(), b = unfused_params[i].grad().to_vector<float>();
    for (size_t j = 0; j < a.size(); ++j) CHECK(a[j] == Approx(b[j]).margin(1e-6).epsilon(1e-4));
  }
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3", "level:5", "sac:matmul,attention"}) {
    apply_policy(model, parse_policy(policy));
    reset_checkpoint_counters();
    auto got = run_grads(model.parameters(), loss_fn);
    INFO("policy " << policy);
    CHECK(got == plain);
    CHECK(checkpoint_counters().ops_replayed > 0);
    CHECK(checkpoint_counters().bytes_dropped > 0);
    // The fused op's outputs are saved under ops (it is one of the products), never re-run.
    CHECK(checkpoint_counters().replayed_by_op[static_cast<int>(OpKind::linear_cross_entropy)] == 0);
  }
  remove_checkpointing(model);
}

TEST_CASE("a stateful callback policy, the FastVideo rule, hook-style and wrapper-style give bitwise equal gradients",
          "[policy][gpt]") {
  GptFixture f;
  auto plain = f.grads();
  SECTION("stateful callback: saves every third op it sees") {
    auto seen = std::make_shared<int>(0);
    CheckpointOptions o;
    o.policy = {"every_third", [seen](const PolicyContext&) {
                  return ++*seen % 3 == 0 ? Decision::prefer_save : Decision::prefer_recompute;
                }};
    checkpoint(f.model, o);
    CHECK(f.grads() == plain);
    CHECK(*seen > 0);
  }
  SECTION("the FastVideo ops rule") {
    CheckpointOptions o;
    o.policy = fastvideo_rule();
    checkpoint(f.model, o);
    CHECK(f.grads() == plain);
  }
  SECTION("hook-style on one chosen submodule") {
    checkpoint(*f.model.find("blocks.1.mlp"));
    CHECK(f.grads() == plain);
  }
  SECTION("wrapper-style with a check_fn") {
    int n = apply_activation_checkpointing(f.model, [](Module& m) { return m.type_name() == "CausalSelfAttention"; });
    CHECK(n == 4);
    CHECK(f.grads() == plain);
  }
}

TEST_CASE("block_skip places regions at index % n == 0 in every container, counted per container", "[policy]") {
  manual_seed(22);
  TwoStreams m;
  CHECK(apply_activation_checkpointing(m, "block_skip", 2) == 3 + 2);
  CHECK(checkpointed(*m.double_blocks) == std::vector<bool>{true, false, true, false, true});
  CHECK(checkpointed(*m.single_blocks) == std::vector<bool>{true, false, true, false});
  remove_checkpointing(m);
  CHECK(apply_activation_checkpointing(m, "block_skip", 3) == 2 + 2);
  CHECK(checkpointed(*m.double_blocks) == std::vector<bool>{true, false, false, true, false});
  CHECK(checkpointed(*m.single_blocks) == std::vector<bool>{true, false, false, true});
  remove_checkpointing(m);
  CHECK(apply_activation_checkpointing(m, "full") == 9);
  remove_checkpointing(m);
  CHECK(apply_activation_checkpointing(m, "block_skip", 1) == 9);  // n_layer = 1 equals full
  // And the gradients stay exact.
  remove_checkpointing(m);
  Tensor x = Tensor::randn({3, 4}).set_requires_grad(true);
  std::vector<Tensor> leaves = m.parameters();
  auto plain = run_grads(leaves, [&] { return sum(m.forward(x)); });
  apply_activation_checkpointing(m, "block_skip", 2);
  CHECK(run_grads(leaves, [&] { return sum(m.forward(x)); }) == plain);
}

TEST_CASE("level regions exist in training mode only and nest", "[policy][level]") {
  GptFixture f;
  set_checkpoint_level(f.model, 5);
  reset_checkpoint_counters();
  {
    Tensor loss = f.model.loss(f.idx, f.targets);
    auto& graph = *static_cast<Graph*>(loss.autograd_meta_ptr()->graph.get());
    const auto& regions = RegionManager::of(graph).regions();
    // 1 model + 4 blocks + 8 attention/MLP + 16 linears.
    CHECK(regions.size() == 1 + 4 + 8 + 16);
    int deepest = 0;
    for (const auto& r : regions) deepest = std::max(deepest, r.depth);
    CHECK(deepest == 3);  // model > block > attention > linear
  }
  f.model.eval();
  reset_checkpoint_counters();
  Tensor loss = f.model.loss(f.idx, f.targets);
  CHECK(checkpoint_counters().ops_forward == 0);  // no region in eval mode
  CHECK(loss.requires_grad());
  f.model.train();
  set_checkpoint_level(f.model, 0);
  reset_checkpoint_counters();
  f.model.loss(f.idx, f.targets);
  CHECK(checkpoint_counters().ops_forward == 0);
}

TEST_CASE("no application API changes module types or parameter names", "[policy]") {
  GptFixture f;
  auto names = param_names(f.model);
  auto type_of_block = f.model.blocks->children()[0].second->type_name();
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3", "sac:matmul"}) {
    apply_policy(f.model, parse_policy(policy));
    CHECK(param_names(f.model) == names);
  }
  remove_checkpointing(f.model);
  checkpoint(*f.model.find("blocks.0"));
  apply_activation_checkpointing(f.model, [](Module& m) { return m.type_name() == "Mlp"; });
  CHECK(param_names(f.model) == names);
  CHECK(f.model.blocks->children()[0].second->type_name() == type_of_block);
  CHECK(names.front() == "wte.weight");
  CHECK(names[2] == "blocks.0.ln1.weight");
}

TEST_CASE("SAC decides whether matmuls are replayed in backward", "[policy][sac]") {
  manual_seed(23);
  Tensor w1 = Tensor::randn({8, 8}).set_requires_grad(true), w2 = Tensor::randn({8, 8}).set_requires_grad(true),
         w3 = Tensor::randn({8, 8}).set_requires_grad(true);
  Tensor x = Tensor::randn({4, 8});
  auto net = [&] { return tanh(matmul(tanh(matmul(tanh(matmul(x, w1)), w2)), w3)); };
  auto matmuls_replayed = [&](Policy policy) {
    reset_checkpoint_counters();
    CheckpointOptions o;
    o.policy = std::move(policy);
    Tensor y = checkpoint(o, net);
    backward(sum(y));
    return checkpoint_counters().replayed_by_op[static_cast<int>(OpKind::matmul)];
  };
  // Saved: replay of the dropped tanh outputs starts from the kept matmul outputs.
  CHECK(matmuls_replayed(save_ops({OpKind::matmul})) == 0);
  // Recomputed: every matmul is replayed to rebuild the tanh output it feeds.
  CHECK(matmuls_replayed(save_ops({OpKind::exp})) == 3);
  CHECK(matmuls_replayed(save_nothing()) == 3);
  // Saving the tanh outputs leaves nothing to rebuild.
  CHECK(matmuls_replayed(save_ops({OpKind::tanh})) == 0);
}

TEST_CASE("tensors named with checkpoint_name are saved or recomputed by name", "[policy][sac]") {
  Tensor x = Tensor::randn({4, 4}).set_requires_grad(true);
  auto net = [&] {
    Tensor a = checkpoint_name(exp(x), "keep_me");
    Tensor b = checkpoint_name(tanh(a), "drop_me");
    return sigmoid(b);
  };
  auto replayed_with = [&](Policy p) {
    reset_checkpoint_counters();
    CheckpointOptions o;
    o.policy = std::move(p);
    backward(sum(checkpoint(o, net)));
    return checkpoint_counters().ops_replayed;
  };
  CHECK(replayed_with(save_names({"keep_me"})) == 2);       // tanh and sigmoid rebuilt; exp kept
  CHECK(replayed_with(recompute_names({"drop_me"})) == 1);  // only tanh rebuilt
  CHECK(replayed_with(save_all()) == 0);
}

TEST_CASE("what_is_saved lists saved and recomputed tensors per region with totals", "[policy][report]") {
  GptFixture f;
  SaveReport full = what_is_saved(f.model, "full", [&] { return f.model.loss(f.idx, f.targets); });
  SaveReport ops = what_is_saved(f.model, "ops", [&] { return f.model.loss(f.idx, f.targets); });
  SaveReport none = what_is_saved(f.model, "none", [&] { return f.model.loss(f.idx, f.targets); });
  CHECK(full.regions == 4);
  // Under full, the only tensors kept are block outputs that the next block (or ln_f) reads: the
  // sums of the MLP's dropped output and the residual (dropout_add).
  CHECK(full.saved_bytes == 4 * (2 * 16 * 32 * 4));
  CHECK(full.saved_by_op.at("dropout_add") == full.saved_bytes);
  CHECK(full.recomputed_bytes > 0);
  CHECK(none.entries.empty());
  CHECK(ops.regions == 1);
  // The ops preset keeps exactly the linear, matmul and attention outputs.
  for (const auto& e : ops.entries) CHECK(e.saved == (e.op == "linear" || e.op == "matmul" || e.op == "attention"));
  // Per block (f32): qkv [2,16,96], attention o [2,4,16,8] and lse [2,4,16], proj [2,16,32],
  // fc [2,16,128], mlp proj [2,16,32].
  int64_t per_block = 4 * (2 * 16 * 96 + 2 * 4 * 16 * 8 + 2 * 4 * 16 + 2 * 16 * 32 + 2 * 16 * 128 + 2 * 16 * 32);
  int64_t head = 4 * 2 * 16 * 64;  // the tied LM head's logits
  CHECK(ops.saved_bytes == 4 * per_block + head);
  CHECK(ops.saved_by_op.at("attention") == 4 * 4 * (2 * 4 * 16 * 8 + 2 * 4 * 16));
  CHECK_THAT(ops.to_string(), Contains("saved") && Contains("recomputed"));
  CHECK_FALSE(is_checkpointed(f.model));  // the report removes its hooks

  // A forward that spans graphs: an op on leaves alone after the blocks (as autocast's cast of the
  // tied head's weight is) starts a graph of its own, and the loss records there, importing the
  // blocks' output. The report follows the imports to the blocks' regions.
  Tensor other_head = Tensor::randn({64, 32}).set_requires_grad(true);
  auto split_loss = [&] {
    Tensor h = f.model.logits(f.idx);
    Tensor scaled_head = mul(other_head, Tensor::full({1}, 0.5));
    return sum(matmul(h, scaled_head));
  };
  {
    Tensor h = f.model.logits(f.idx);
    Tensor loss = sum(matmul(h, mul(other_head, Tensor::full({1}, 0.5))));
    REQUIRE(loss.autograd_meta_ptr()->graph != h.autograd_meta_ptr()->graph);
  }
  SaveReport split = what_is_saved(f.model, "full", split_loss);
  CHECK(split.regions == 4);
  CHECK(split.saved_bytes == full.saved_bytes);
  CHECK(split.recomputed_bytes == full.recomputed_bytes);
}

TEST_CASE("application errors say what was expected", "[policy][errors]") {
  GptFixture f;
  CHECK_THROWS_WITH(apply_activation_checkpointing(f.model, "selective"),
                    Contains("unknown type 'selective': expected one of full, ops, block_skip"));
  CHECK_THROWS_WITH(apply_activation_checkpointing(f.model, "block_skip", 0), Contains("expected n_layer >= 1, got 0"));
  nn::Sequential plain;
  plain.push_back(std::make_shared<nn::Linear>(2, 2));
  CHECK_THROWS_WITH(apply_activation_checkpointing(plain, "full"),
                    Contains("no block container found in Sequential; searched for children named blocks, "
                             "double_blocks, single_blocks"));
  checkpoint(*f.model.find("blocks.0"));
  CHECK_THROWS_WITH(checkpoint(*f.model.find("blocks.0")), Contains("already checkpointed"));
  CHECK_THROWS_WITH(checkpoint(*f.model.find("blocks.1"), std::map<std::string, std::string>{{"use_reentrant", "1"}}),
                    Contains("unknown checkpoint option 'use_reentrant'"));
  CHECK_THROWS_WITH(parse_policy("block_skip:0"), Contains("expected block_skip:N with 1 <= N"));
  CHECK_THROWS_WITH(parse_policy("level:6"), Contains("expected level:N with 0 <= N <= 5"));
  CHECK_THROWS_WITH(parse_policy("level:x"), Contains("expected level:<integer>"));
  CHECK_THROWS_WITH(parse_policy("sac:matmul,conv9"), Contains("unknown op 'conv9'"));
  CHECK_THROWS_WITH(parse_policy("fullest"), Contains("unknown policy 'fullest': expected none, full, ops"));
  CHECK_THROWS_WITH(set_checkpoint_level(f.model, 7), Contains("expected a level in 0..5, got 7"));
}

TEST_CASE("the post-forward hook closes the region when forward throws", "[policy][hooks]") {
  class Thrower final : public nn::UnaryModule {
   public:
    Thrower() : UnaryModule("Thrower") {}
    Tensor forward(const Tensor& x) override {
      Tensor y = exp(x);
      REMAT_CHECK(false, "boom");
      return y;
    }
  } thrower;
  int post_calls = 0;
  bool saw_throw = false;
  thrower.add_forward_hook({"probe", nullptr, [&](Module&, bool threw) {
                              ++post_calls;
                              saw_throw = threw;
                            }});
  checkpoint(thrower);
  Tensor x = Tensor::randn({2}).set_requires_grad(true);
  CHECK_THROWS_WITH(thrower(x), Contains("boom"));
  CHECK(post_calls == 1);
  CHECK(saw_throw);
  // The region was closed: a new region opens and closes normally afterwards.
  Tensor y = checkpoint([](const Tensor& t) { return tanh(t); }, x);
  backward(sum(y));
  CHECK(x.grad().defined());
}

TEST_CASE("autocast records its casts on the tape: f32 gradients, bitwise replays under policies", "[autocast][policy]") {
  GptFixture g;
  auto plain = g.grads();
  // bf16 is the GPU's compute dtype; on the CPU, f64 exercises the same casts and rules.
  auto mixed_loss = [&] {
    AutocastScope autocast(DType::f64);
    return g.model.loss(g.idx, g.targets);
  };
  auto mixed = run_grads(g.model.parameters(), mixed_loss);
  CHECK(mixed != plain);  // the GEMMs really ran in the other dtype
  for (const Tensor& p : g.model.parameters()) {
    REQUIRE(p.grad().defined());
    CHECK(p.grad().dtype() == DType::f32);  // master weights keep f32 gradients
  }
  // f64 GEMMs change the f32 results only by rounding.
  for (size_t i = 0; i < mixed.size(); ++i) {
    const float* a = reinterpret_cast<const float*>(mixed[i].data());
    const float* b = reinterpret_cast<const float*>(plain[i].data());
    for (size_t j = 0; j < mixed[i].size() / sizeof(float); ++j) CHECK(a[j] == Approx(b[j]).margin(1e-5).epsilon(1e-3));
  }
  for (const char* policy : {"full", "ops", "block_skip:2", "sqrt"}) {
    INFO(policy);
    apply_policy(g.model, parse_policy(policy));
    CHECK(run_grads(g.model.parameters(), mixed_loss) == mixed);
  }
  remove_checkpointing(g.model);
  CHECK_THROWS_WITH(AutocastScope(DType::i64), Contains("expected a floating compute dtype"));
}
