// Checkpoint regions: bitwise gradient equivalence, replay counts, memory from the allocator
// counters, nesting, and every misuse error with its message.
#include <catch.hpp>

#include "models_for_tests.h"

using namespace remat;
using namespace remat::testing;
using Catch::Matchers::Contains;

namespace {

template <typename Block>
std::vector<Tensor> all_params(const std::vector<Block>& blocks) {
  std::vector<Tensor> out;
  for (const Block& b : blocks)
    for (const Tensor& p : b.params()) out.push_back(p);
  return out;
}

std::vector<MlpBlock> mlp_chain(int n, int64_t c, int64_t hidden) {
  manual_seed(11);
  std::vector<MlpBlock> blocks;
  for (int i = 0; i < n; ++i) blocks.emplace_back(c, hidden);
  return blocks;
}

// Loss of a chain where block i is wrapped in a region when wrap(i) says so.
template <typename Block>
Tensor chain_loss(const std::vector<Block>& blocks, const Tensor& x, const std::function<bool(int)>& wrap) {
  Tensor h = x;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (wrap(static_cast<int>(i))) h = checkpoint(blocks[i], h);
    else h = blocks[i](h);
  }
  return mean(mul(h, h));
}

int64_t activation_current() { return memory_stats()[MemoryCategory::activation].current; }
int64_t activation_peak() { return memory_stats()[MemoryCategory::activation].peak; }

}  // namespace

TEST_CASE("a chain of 8 MLP blocks gets bitwise equal gradients under full checkpointing", "[checkpoint]") {
  auto blocks = mlp_chain(8, 16, 64);
  Tensor x = Tensor::randn({4, 16}).set_requires_grad(true);
  std::vector<Tensor> leaves = all_params(blocks);
  leaves.push_back(x);
  auto plain = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return false; }); });
  auto full = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return true; }); });
  auto every_other = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int i) { return i % 2 == 0; }); });
  CHECK(full == plain);
  CHECK(every_other == plain);
  for (const auto& g : plain) CHECK_FALSE(g.empty());
}

TEST_CASE("transformer blocks with dropout p=0.1 get bitwise equal gradients under checkpointing", "[checkpoint]") {
  manual_seed(12);
  std::vector<TransformerBlock> blocks;
  for (int i = 0; i < 3; ++i) blocks.emplace_back(16, 4, 0.1);
  Tensor x = Tensor::randn({2, 8, 16}).set_requires_grad(true);
  std::vector<Tensor> leaves = all_params(blocks);
  leaves.push_back(x);
  auto plain = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return false; }); });
  auto full = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return true; }); });
  CHECK(full == plain);
  // A different dropout stream changes the gradients: the equality above is not vacuous.
  auto other_seed = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return true; }); }, 999);
  CHECK(other_seed != plain);
}

TEST_CASE("regions with several inputs and outputs, non-tensor arguments and repeated outputs", "[checkpoint]") {
  manual_seed(13);
  Tensor a = Tensor::randn({3, 4}).set_requires_grad(true), b = Tensor::randn({3, 4}).set_requires_grad(true);
  Tensor frozen = Tensor::randn({3, 4});  // needs no gradient
  auto fn = [](const Tensor& u, const Tensor& v, double scale, int repeat, const std::string& mode, const Tensor& c) {
    Tensor y = mul(tanh(u), v) * scale;
    for (int i = 1; i < repeat; ++i) y = add(y, exp(mul_scalar(u, 0.1)));
    Tensor z = mode == "sum" ? sigmoid(add(u, v)) : relu(v);
    Tensor no_grad_out = exp(c);  // from a tensor that needs no gradient
    return std::vector<Tensor>{y, z, y, no_grad_out};
  };
  auto loss_of = [&](const std::vector<Tensor>& outs) {
    return add(add(sum(outs[0]), sum(mul_scalar(outs[2], 2.0))), add(sum(mul(outs[1], outs[1])), sum(outs[3])));
  };
  std::vector<Tensor> leaves{a, b};
  auto plain = run_grads(leaves, [&] { return loss_of(fn(a, b, 0.5, 3, "sum", frozen)); });
  auto ckpt = run_grads(leaves, [&] { return loss_of(checkpoint(fn, a, b, 0.5, 3, std::string("sum"), frozen)); });
  CHECK(ckpt == plain);
  // An output that no gradient reaches.
  auto partial_plain = run_grads(leaves, [&] { return sum(fn(a, b, 1.0, 1, "relu", frozen)[0]); });
  auto partial = run_grads(leaves, [&] { return sum(checkpoint(fn, a, b, 1.0, 1, std::string("relu"), frozen)[0]); });
  CHECK(partial == partial_plain);
}

TEST_CASE("nested regions two and three deep give bitwise equal gradients", "[checkpoint][nested]") {
  auto blocks = mlp_chain(8, 16, 64);
  Tensor x = Tensor::randn({4, 16}).set_requires_grad(true);
  std::vector<Tensor> leaves = all_params(blocks);
  leaves.push_back(x);
  auto plain = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return false; }); });
  auto two_deep = run_grads(leaves, [&] {
    Tensor h = x;
    for (int pair = 0; pair < 4; ++pair) {
      CheckpointScope outer;
      h = checkpoint(blocks[2 * pair], h);
      h = checkpoint(blocks[2 * pair + 1], h);
    }
    return mean(mul(h, h));
  });
  auto three_deep = run_grads(leaves, [&] {
    Tensor h = x;
    for (int half = 0; half < 2; ++half) {
      CheckpointScope top;
      for (int pair = 0; pair < 2; ++pair) {
        CheckpointScope middle;
        h = checkpoint(blocks[4 * half + 2 * pair], h);
        h = checkpoint(blocks[4 * half + 2 * pair + 1], h);
      }
    }
    return mean(mul(h, h));
  });
  CHECK(two_deep == plain);
  CHECK(three_deep == plain);
}

TEST_CASE("checkpoint_sequential with 1, 2 and 4 segments matches the plain chain", "[checkpoint]") {
  auto blocks = mlp_chain(8, 16, 32);
  Tensor x = Tensor::randn({4, 16}).set_requires_grad(true);
  std::vector<TensorFn> fns;
  for (const MlpBlock& b : blocks) fns.push_back(b);
  std::vector<Tensor> leaves = all_params(blocks);
  leaves.push_back(x);
  auto plain = run_grads(leaves, [&] { return chain_loss(blocks, x, [](int) { return false; }); });
  for (int segments : {1, 2, 4}) {
    reset_checkpoint_counters();
    auto got = run_grads(leaves, [&] {
      Tensor h = checkpoint_sequential(fns, segments, x);
      return mean(mul(h, h));
    });
    INFO("segments = " << segments);
    CHECK(got == plain);
    CHECK(checkpoint_counters().replays == segments - 1);  // the last segment runs plainly
  }
  CHECK_THROWS_WITH(checkpoint_sequential(fns, 0, x), Contains("expected 1 <= segments <= 8 (the number of functions), got 0"));
  CHECK_THROWS_WITH(checkpoint_sequential(fns, 9, x), Contains("got 9"));
}

TEST_CASE("replay stops early: only the ops whose saved tensors backward needs are replayed", "[checkpoint][replay]") {
  Tensor x = Tensor::randn({4, 4}, DType::f64).set_requires_grad(true);
  reset_checkpoint_counters();
  Tensor y;
  {
    CheckpointScope scope;
    Tensor a = exp(x);         // 1: saves its output
    Tensor b = tanh(a);        // 2: saves its output
    Tensor c = sigmoid(b);     // 3: saves its output
    Tensor d = add_scalar(c, 1.0);  // 4..8 save nothing
    Tensor e = mul_scalar(d, 2.0);
    Tensor f = neg(e);
    Tensor g = reshape(f, {16});
    y = add_scalar(g, 3.0);
  }
  RegionCounters forward = checkpoint_counters();
  CHECK(forward.ops_forward == 8);
  CHECK(forward.bytes_dropped == 3 * 16 * 8);  // a, b and c: 4x4 f64 each
  backward(sum(y));
  RegionCounters after = checkpoint_counters();
  CHECK(after.ops_replayed == 3);
  CHECK(after.replays == 1);
  CHECK(after.bytes_rebuilt == 3 * 16 * 8);
}

TEST_CASE("with full checkpointing of L blocks each needed op is replayed exactly once", "[checkpoint][replay]") {
  const int L = 6;
  auto blocks = mlp_chain(L, 8, 16);
  Tensor x = Tensor::randn({2, 8}).set_requires_grad(true);
  reset_checkpoint_counters();
  Tensor loss = chain_loss(blocks, x, [](int) { return true; });
  CHECK(checkpoint_counters().ops_forward == 4 * L);  // linear, gelu, linear, add per block
  backward(loss);
  // Per block, backward reads the first linear's output (saved by gelu) and gelu's output (saved by
  // the second linear); the second linear's output and the add feed nothing saved.
  CHECK(checkpoint_counters().ops_replayed == 2 * L);
  CHECK(checkpoint_counters().replays == L);
}

TEST_CASE("full checkpointing bounds the activation peak by kept inputs plus one block", "[checkpoint][memory]") {
  const int L = 8;
  const int64_t B = 32, C = 64, H = 256;
  auto blocks = mlp_chain(L, C, H);
  Tensor x = Tensor::randn({B, C}).set_requires_grad(true);
  auto run = [&](const std::function<bool(int)>& wrap, int64_t* after_forward) {
    reset_peak_memory();
    int64_t base = activation_current();
    Tensor loss = chain_loss(blocks, x, wrap);
    *after_forward = activation_current() - base;
    backward(loss);
    return activation_peak() - base;
  };
  // One block's working set: what a single plain block forward allocates.
  int64_t block_set;
  {
    reset_peak_memory();
    int64_t base = activation_current();
    Tensor y = blocks[0](x);
    block_set = activation_peak() - base;
  }
  CHECK(block_set == B * (H + H + C + C) * 4);
  int64_t kept_none, kept_full;
  int64_t peak_none = run([](int) { return false; }, &kept_none);
  int64_t peak_full = run([](int) { return true; }, &kept_full);
  INFO("none peak " << peak_none << ", full peak " << peak_full << ", kept after forward " << kept_full
                    << ", block working set " << block_set);
  CHECK(peak_full <= static_cast<int64_t>(1.1 * static_cast<double>(kept_full + block_set)));
  CHECK(peak_full < 0.4 * static_cast<double>(peak_none));

  // Nesting pairs of block regions inside outer regions keeps half the boundaries only.
  int64_t kept_nested = 0;
  reset_peak_memory();
  int64_t base = activation_current();
  {
    Tensor h = x;
    for (int pair = 0; pair < L / 2; ++pair) {
      CheckpointScope outer;
      h = checkpoint(blocks[2 * pair], h);
      h = checkpoint(blocks[2 * pair + 1], h);
    }
    Tensor loss = mean(mul(h, h));
    kept_nested = activation_current() - base;
    backward(loss);
  }
  int64_t peak_nested = activation_peak() - base;
  INFO("nested peak " << peak_nested << ", kept " << kept_nested);
  CHECK(kept_nested < kept_full);
  CHECK(peak_nested < peak_full);
}

TEST_CASE("a whole-chain region that saves linear outputs replays per backward node, below no checkpointing's peak",
          "[checkpoint][memory][replay]") {
  // FastVideo's `ops` shape: one region around the whole model, matrix products saved, the rest
  // (gelu, the residual adds) rebuilt. Rebuilding the whole region at the first unpack would hold
  // every dropped value at once on top of the saved ones, above no checkpointing's peak; replay per
  // backward node holds the saved outputs, the residual stream and one block's rebuilt values.
  const int L = 8;
  const int64_t B = 32, C = 64, H = 256;
  auto blocks = mlp_chain(L, C, H);
  Tensor x = Tensor::randn({B, C}).set_requires_grad(true);
  std::vector<Tensor> leaves = all_params(blocks);
  leaves.push_back(x);
  auto loss_of = [&](bool region) {
    Tensor h = x;
    std::unique_ptr<CheckpointScope> scope;
    if (region) {
      CheckpointOptions o;
      o.policy = save_ops({OpKind::linear});
      scope = std::make_unique<CheckpointScope>(o);
    }
    for (const MlpBlock& b : blocks) h = b(h);
    scope.reset();
    return mean(mul(h, h));
  };
  auto peak_of = [&](bool region) {
    reset_peak_memory();
    int64_t base = activation_current();
    backward(loss_of(region));
    return activation_peak() - base;
  };
  int64_t peak_none = peak_of(false);
  reset_checkpoint_counters();
  int64_t peak_ops = peak_of(true);
  RegionCounters c = checkpoint_counters();
  INFO("none peak " << peak_none << ", ops peak " << peak_ops);
  CHECK(c.bytes_dropped > 0);
  CHECK(c.replays == 1);                // one region, replayed once in this backward
  CHECK(c.replay_passes > L);           // in many passes: one per backward node that reads a dropped slot
  CHECK(c.ops_replayed == 2 * L - 1);   // gelu and add per block (the last add feeds no saved slot): each once
  // The second linear's saved output only serves to rebuild the residual stream: once the first
  // pass has rebuilt and held the stream, those outputs go (L - 1 of them; the last block's feeds
  // the loss directly, which backward reads before any replay).
  CHECK(c.bytes_released_early >= (L - 1) * B * C * 4);
  // Saved first-linear outputs (H per row and block) and the residual stream (C), against no
  // checkpointing's 2H + C (the first linear's output, gelu's, the residual): 0.56 here, plus one
  // block's replay working set: 0.63 measured (the second linear's outputs beside the rebuilt
  // stream would add 7 C-sized values: 0.73).
  CHECK(peak_ops < 0.65 * static_cast<double>(peak_none));
  auto plain = run_grads(leaves, [&] { return loss_of(false); });
  auto ops = run_grads(leaves, [&] { return loss_of(true); });
  CHECK(ops == plain);
}

TEST_CASE("a saved output goes when the last slot that reads it, through a view, goes and no replay needs it",
          "[checkpoint][memory][replay]") {
  // gpt's head under `ops`: the region (the model's logits) saves the head's product, and the loss,
  // outside the region, reads it through a reshape. Once the loss's backward has read it, nothing
  // needs it: the region lets go of it then (on a GPU the gradient may then take its place), not
  // when a replay or the end of backward gets to it. Here a scale `s` between the reshape and the
  // loss reads the view; its gradient is final right after that read.
  auto blocks = mlp_chain(4, 16, 64);
  Tensor x = Tensor::randn({8, 16}).set_requires_grad(true);
  Tensor head = Tensor::randn({512, 16}).set_requires_grad(true);
  Tensor s = Tensor::from_vector<float>({0.5f}, {1}).set_requires_grad(true);
  std::vector<Tensor> leaves = all_params(blocks);
  for (const Tensor& t : {x, head, s}) leaves.push_back(t);
  Tensor targets = Tensor::from_vector<int64_t>({1, 7, 30, 511, 0, 2, 9, 100}, {8});
  std::weak_ptr<Storage> logits_storage;
  auto loss_of = [&](bool region) {
    std::unique_ptr<CheckpointScope> scope;
    if (region) {
      CheckpointOptions o;
      o.policy = save_ops({OpKind::linear, OpKind::matmul});
      scope = std::make_unique<CheckpointScope>(o);
    }
    Tensor h = x;
    for (const MlpBlock& b : blocks) h = b(h);
    Tensor logits = matmul(h, head, false, true);
    logits_storage = logits.storage();
    scope.reset();
    return cross_entropy(mul(reshape(logits, {8, 512}), s), targets);
  };
  for (bool region : {false, true}) {
    INFO((region ? "ops region" : "no region"));
    bool checked = false, gone = false;
    {
      LeafGradReadyScope ready([&](const AutogradMeta* leaf, const Tensor&) {
        if (leaf != s.autograd_meta_ptr().get()) return;
        checked = true;
        gone = logits_storage.expired();
      });
      reset_checkpoint_counters();
      backward(loss_of(region));
    }
    CHECK(checked);
    CHECK(gone);
    if (region) CHECK(checkpoint_counters().bytes_released_early >= 8 * 512 * 4);
  }
  CHECK(run_grads(leaves, [&] { return loss_of(true); }) == run_grads(leaves, [&] { return loss_of(false); }));
}

TEST_CASE("saved outputs go early only when no later backward can need them: retain_graph, a second loss",
          "[checkpoint][replay]") {
  // A whole-chain region saving linear outputs, with two heads inside it: one on the chain's end,
  // one on its middle. Backward of their sum may let go of the outputs that only rebuild the
  // residual stream. A backward that keeps the graph (retain_graph), or that reaches only part of
  // the region, must not: a later backward replays from them (or another loss's does).
  const int L = 6;
  auto blocks = mlp_chain(L, 16, 64);
  Tensor x = Tensor::randn({8, 16}).set_requires_grad(true);
  std::vector<Tensor> leaves = all_params(blocks);
  leaves.push_back(x);
  auto heads = [&](bool region) {
    std::unique_ptr<CheckpointScope> scope;
    if (region) {
      CheckpointOptions o;
      o.policy = save_ops({OpKind::linear});
      scope = std::make_unique<CheckpointScope>(o);
    }
    Tensor h = x, middle;
    for (int i = 0; i < L; ++i) {
      h = blocks[static_cast<size_t>(i)](h);
      if (i == L / 2) middle = sum(mul(h, h));
    }
    Tensor end = mean(mul(h, h));
    return std::make_pair(end, middle);
  };
  auto grads_of = [&](bool region, bool apart) {
    for (const Tensor& t : leaves) const_cast<Tensor&>(t).zero_grad();
    set_rng_state({77, 0});
    auto [end, middle] = heads(region);
    if (apart) {
      backward(add(end, middle), Tensor(), {.retain_graph = true});  // the whole region, but kept
      backward(middle);                                               // half of it, once more
    } else {
      backward(add(end, middle));
    }
    return grad_bytes(leaves);
  };
  reset_checkpoint_counters();
  CHECK(grads_of(true, false) == grads_of(false, false));
  CHECK(checkpoint_counters().bytes_released_early > 0);
  reset_checkpoint_counters();
  CHECK(grads_of(true, true) == grads_of(false, true));
  CHECK(checkpoint_counters().replays > 0);
  CHECK(checkpoint_counters().bytes_released_early == 0);
}

TEST_CASE("replay that rebuilds a different shape names the op, its index and both metadata", "[checkpoint][errors]") {
  int calls = 0;
  CustomOp unstable{"unstable",
                    [&calls](const std::vector<Tensor>& in) {
                      ++calls;
                      Tensor y = calls == 1 ? mul_scalar(in[0], 2.0) : concat({in[0], in[0]}, 0);
                      return std::vector<Tensor>{y};
                    },
                    [](const std::vector<Tensor>& g, const std::vector<Tensor>&) { return std::vector<Tensor>{g[0]}; },
                    {}};
  Tensor x = Tensor::randn({2, 3}).set_requires_grad(true);
  Tensor loss;
  {
    CheckpointOptions options;
    options.name = "unstable_block";
    options.debug = true;
    CheckpointScope scope(options);
    Tensor a = exp(x);
    Tensor b = custom(unstable, {a})[0];
    loss = sum(tanh(b));
  }
  CHECK_THROWS_WITH(backward(loss),
                    Contains("checkpoint region 'unstable_block'") &&
                        Contains("replayed op unstable (index 1 in the region) produced output 0 as f32[4,3] on cpu, "
                                 "but the forward recorded f32[2,3] on cpu") &&
                        Contains("forward ops: [exp, unstable, tanh, sum]") && Contains("replayed ops: [exp, unstable]"));
}

TEST_CASE("a region input mutated in place after forward is reported at replay", "[checkpoint][errors]") {
  Tensor x = Tensor::randn({3}).set_requires_grad(true);
  Tensor h = mul_scalar(x, 2.0);  // produced before the region: the region keeps it
  Tensor y = checkpoint([](const Tensor& t) { return tanh(exp(t)); }, h);
  h.fill_(0.0);
  CHECK_THROWS_WITH(backward(sum(y)), Contains("was modified by an in-place operation after the forward"));
}

TEST_CASE("backward twice through a region needs retain_graph", "[checkpoint][errors]") {
  Tensor x = Tensor::randn({3}).set_requires_grad(true);
  Tensor loss = sum(checkpoint([](const Tensor& t) { return tanh(exp(t)); }, x));
  backward(loss, Tensor(), {.retain_graph = true});
  auto first = x.grad().to_vector<float>();
  backward(loss);  // the regions replay again from their kept inputs
  auto twice = x.grad().to_vector<float>();
  for (size_t i = 0; i < first.size(); ++i) CHECK(twice[i] == 2 * first[i]);
  CHECK_THROWS_WITH(backward(loss), Contains("backward through the graph a second time"));
}

TEST_CASE("unknown region options are errors that list the known ones", "[checkpoint][errors]") {
  CHECK_THROWS_WITH(CheckpointOptions::parse({{"preserve_rng_state", "1"}}),
                    Contains("unknown checkpoint option 'preserve_rng_state': expected one of debug, name, policy"));
  CHECK_THROWS_WITH(CheckpointOptions::parse({{"debug", "yes"}}), Contains("expected true, false, 1 or 0, got 'yes'"));
  CHECK(CheckpointOptions::parse({{"debug", "1"}, {"name", "blk"}}).debug);
}

TEST_CASE("under no-grad a region runs plainly and records nothing", "[checkpoint]") {
  Tensor x = Tensor::randn({3}).set_requires_grad(true);
  reset_checkpoint_counters();
  NoGradGuard no_grad;
  CheckpointScope scope;
  CHECK_FALSE(scope.active());
  Tensor y = exp(x);
  CHECK_FALSE(y.requires_grad());
  CHECK(checkpoint_counters().ops_forward == 0);
}

TEST_CASE("a value saved by a node outside the region stays alive through that node", "[checkpoint]") {
  Tensor x = Tensor::randn({4}, DType::f64).set_requires_grad(true);
  reset_checkpoint_counters();
  Tensor inner;
  {
    CheckpointScope scope;
    inner = exp(x);  // dropped by the region (exp saves its output)...
  }
  Tensor y = mul(inner, inner);  // ...but mul, outside, saves it too
  backward(sum(y));
  CHECK(checkpoint_counters().ops_replayed == 0);  // still alive: nothing to rebuild
  auto g = x.grad().to_vector<double>();
  auto xv = x.to_vector<double>();
  for (size_t i = 0; i < g.size(); ++i) CHECK(g[i] == Approx(2 * std::exp(2 * xv[i])));
}

TEST_CASE("a traced step: spans name their parents, backward nodes own their ops, replays count apart",
          "[checkpoint][trace]") {
  const int L = 4;
  auto blocks = mlp_chain(L, 8, 16);
  Tensor x = Tensor::randn({2, 8}).set_requires_grad(true);
  Tracer tracer;
  {
    TracerScope active(&tracer);
    backward(chain_loss(blocks, x, [](int) { return true; }));
  }
  const auto& events = tracer.events();
  std::map<int, const TraceEvent*> by_id;
  for (const TraceEvent& e : events) by_id[e.id] = &e;
  REQUIRE(by_id.size() == events.size());  // ids are unique
  int top_forward = 0, replays_in_backward = 0;
  double top_time = 0;
  for (const TraceEvent& e : events) {
    if (e.parent < 0) {
      top_time += e.duration_us;
      top_forward += e.phase == "forward";
      continue;
    }
    REQUIRE(by_id.count(e.parent) == 1);
    const TraceEvent& p = *by_id[e.parent];
    CHECK(p.start_us <= e.start_us);  // a child runs inside its parent
    CHECK(e.start_us + e.duration_us <= p.start_us + p.duration_us + 1e-3);
    replays_in_backward += e.phase == "replay" && p.phase == "backward";
  }
  CHECK(replays_in_backward >= L);  // each block's replay runs inside the backward node that needs it
  std::vector<OpTime> times = self_times(tracer);
  double listed = 0;
  int forward_calls = 0, replay_rows = 0;
  for (const OpTime& t : times) {
    listed += t.total_us;
    if (t.phase == "forward") forward_calls += t.calls;
    replay_rows += t.phase == "replay";
    CHECK(t.total_us >= 0);
  }
  // Nothing counted twice, nothing lost: the listed times add up to the top-level spans' time;
  // ops run inside backward nodes are folded into them, so only the model's own forward is listed.
  CHECK(std::abs(listed - top_time) <= 1e-6 * top_time + 1e-3);
  CHECK(forward_calls == top_forward);
  CHECK(replay_rows > 0);
  for (size_t i = 1; i < times.size(); ++i) CHECK(times[i - 1].total_us >= times[i].total_us);
}
