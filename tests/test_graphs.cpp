// Graphs owned by the tensors they recorded: independent losses, eval loops that stay flat, backward
// inside an open region, threads sharing a module, exceptions from user code, and user mistakes
// that are clear errors. Tagged [threads] where threads run (the ThreadSanitizer target runs those).
#include <catch.hpp>

#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>

#include "models/gpt.h"
#include "models/data.h"
#include "models_for_tests.h"

using namespace remat;
using namespace remat::testing;
using Catch::Matchers::Contains;

namespace {

GptConfig small_gpt(int64_t layers = 2) {
  GptConfig c = gpt_config("tiny");
  c.layers = layers;
  c.dropout = 0.1;
  return c;
}

int64_t activations() { return memory_stats()[MemoryCategory::activation].current; }

// The loss of gpt on a fixed batch with a fixed dropout stream.
struct GptStep {
  Gpt model;
  Tensor idx, targets;
  explicit GptStep(int64_t layers = 2) : model(small_gpt(layers)) {
    AdditionTask data(64, 3);
    std::tie(idx, targets) = data.batch(2, 16);
  }
  Tensor loss(uint64_t stream = 99) {
    set_rng_state({stream, 0});
    return model.loss(idx, targets);
  }
  std::vector<std::vector<char>> grads(uint64_t stream = 99) {
    return run_grads(model.parameters(), [&] { return loss(stream); }, stream);
  }
};

}  // namespace

TEST_CASE("two forwards give two losses, each backpropagated on its own", "[graphs]") {
  manual_seed(1);
  GptStep s;
  auto ref1 = s.grads(1), ref2 = s.grads(2);
  // Both forwards first, then both backwards: the second is not "a second time".
  for (Tensor& p : s.model.parameters()) p.zero_grad();
  Tensor l1 = s.loss(1), l2 = s.loss(2);
  backward(l1);
  auto after_first = grad_bytes(s.model.parameters());
  CHECK(after_first == ref1);
  backward(l2);
  // .grad now holds the sum; l2's own gradients, taken with grad(), are the reference ones.
  Tensor l2_again = s.loss(2);
  auto direct = grad(l2_again, s.model.parameters());
  for (size_t i = 0; i < direct.size(); ++i) {
    std::vector<char> bytes(direct[i].nbytes());
    std::memcpy(bytes.data(), direct[i].raw_data(), bytes.size());
    CHECK(bytes == ref2[i]);
  }
}

TEST_CASE("two losses of one forward: the shared part is freed by the first backward, as in PyTorch", "[graphs]") {
  Tensor x = Tensor::randn({4, 3}).set_requires_grad(true);
  Tensor h = exp(x);  // saves its output
  Tensor l1 = sum(mul(h, h)), l2 = sum(mul_scalar(h, 3.0));
  backward(l1);
  CHECK_THROWS_WITH(backward(l2), Contains("backward through the graph a second time: the saved tensors of exp"));
  // With retain_graph on the first, the second runs, and the sum is both gradients.
  Tensor y = Tensor::randn({4, 3}).set_requires_grad(true);
  Tensor k = exp(y);
  Tensor m1 = sum(mul(k, k)), m2 = sum(mul_scalar(k, 3.0));
  backward(m1, Tensor(), {.retain_graph = true});
  backward(m2);
  std::vector<double> g = y.grad().to_vector<double>(), v = y.to_vector<double>();
  for (size_t i = 0; i < g.size(); ++i) CHECK(g[i] == Approx(2 * std::exp(2 * v[i]) + 3 * std::exp(v[i])));
}

TEST_CASE("a loss of two forwards (two graphs) backpropagates through both", "[graphs]") {
  manual_seed(2);
  MlpBlock a(8, 16), b(8, 16);
  Tensor x = Tensor::randn({4, 8}), y = Tensor::randn({4, 8});
  auto params = a.params();
  for (const Tensor& p : b.params()) params.push_back(p);
  auto joint = run_grads(params, [&] { return add(sum(a(x)), sum(b(y))); });
  // The same sum from two separately recorded forwards.
  Tensor la = sum(a(x)), lb = sum(b(y));
  CHECK(graph_of(la) != graph_of(lb));
  for (Tensor& p : params) p.zero_grad();
  backward(add(la, lb));
  CHECK(grad_bytes(params) == joint);
}

TEST_CASE("an eval loop with grad mode on stays flat over 10,000 iterations", "[graphs][memory]") {
  manual_seed(3);
  MlpBlock block(16, 32);
  Tensor x = Tensor::randn({8, 16});
  // Measured after 100 and after 10,000 iterations: the same point of every variant's cycle.
  auto flat = [&](const char* what, const std::function<void(Tensor&)>& iteration) {
    Tensor loss;
    for (int i = 0; i < 100; ++i) iteration(loss);
    int64_t after_100 = activations();
    for (int i = 100; i < 10000; ++i) iteration(loss);
    INFO(what);
    CHECK(activations() == after_100);
  };
  flat("loss = f(x)", [&](Tensor& loss) { loss = sum(block(x)); });
  flat("loss = f(x) in a checkpoint region", [&](Tensor& loss) {
    CheckpointScope region;
    loss = sum(block(x));
  });
  flat("loss = f(x), then backward every 100th", [&](Tensor& loss) {
    loss = sum(block(x));
    static int n = 0;
    if (++n % 100 == 0) backward(loss);
  });
}

TEST_CASE("a forward replaced before backward frees its activations at once", "[graphs][memory]") {
  manual_seed(4);
  GptStep s;
  int64_t base = activations();
  Tensor l = s.loss();
  int64_t one = activations() - base;
  l = s.loss();  // the first forward's graph goes with the assignment
  CHECK(activations() - base == one);
  for (int i = 0; i < 5; ++i) l = s.loss();
  CHECK(activations() - base == one);
  backward(l);
  CHECK(activations() == base + static_cast<int64_t>(l.nbytes()));  // the loss itself stays
}

TEST_CASE("backward inside an open checkpoint region is a clear error, and the region still works", "[graphs][checkpoint]") {
  manual_seed(5);
  MlpBlock block(8, 16);
  Tensor x = Tensor::randn({4, 8}).set_requires_grad(true);
  auto reference = run_grads(block.params(), [&] { return sum(block(x)); });
  {
    CheckpointOptions o;
    o.name = "outer";
    CheckpointScope region(o);
    Tensor loss = sum(block(x));
    CHECK_THROWS_WITH(backward(loss), Contains("checkpoint region 'outer' is still open"));
  }
  for (Tensor& p : block.params()) p.zero_grad();
  Tensor loss;
  {
    CheckpointScope region;
    loss = sum(block(x));
  }
  reset_checkpoint_counters();
  backward(loss);
  CHECK(checkpoint_counters().replays == 1);
  CHECK(grad_bytes(block.params()) == reference);
}

TEST_CASE("one module used from two threads: each thread's gradients, summed, as run one after the other", "[graphs][threads]") {
  for (const char* policy : {"none", "full", "block_skip:2"}) {
    INFO("policy " << policy);
    manual_seed(6);
    GptStep s;
    apply_policy(s.model, parse_policy(policy));
    // Sequential reference: stream 1's loss then stream 2's, accumulated.
    for (Tensor& p : s.model.parameters()) p.zero_grad();
    set_rng_state({1, 0});
    backward(s.model.loss(s.idx, s.targets));
    set_rng_state({2, 0});
    backward(s.model.loss(s.idx, s.targets));
    auto sequential = grad_bytes(s.model.parameters());
    for (Tensor& p : s.model.parameters()) p.zero_grad();
    reset_checkpoint_counters();
    std::atomic<int> replays{0};
    auto work = [&](uint64_t stream) {
      set_rng_state({stream, 0});
      Tensor loss = s.model.loss(s.idx, s.targets);
      backward(loss);
      replays += static_cast<int>(checkpoint_counters().replays);
    };
    std::thread t1(work, 1), t2(work, 2);
    t1.join();
    t2.join();
    // Two contributions per leaf: a + b == b + a, so the order the threads finish in cannot show.
    CHECK(grad_bytes(s.model.parameters()) == sequential);
    if (std::string(policy) != "none") CHECK(replays > 0);
    remove_checkpointing(s.model);
  }
}

TEST_CASE("threads draw from their own random streams, derived from the global seed", "[graphs][threads]") {
  manual_seed(7);
  Tensor main_draw = Tensor::rand({64});
  std::vector<float> a, b;
  std::thread t1([&] { a = Tensor::rand({64}).to_vector<float>(); });
  t1.join();
  std::thread t2([&] { b = Tensor::rand({64}).to_vector<float>(); });
  t2.join();
  CHECK(a != b);
  CHECK(a != main_draw.to_vector<float>());
  // A thread given its index draws the same stream whichever thread drew first.
  std::vector<float> c, d;
  std::thread t3([&] {
    set_thread_rng_index(5);
    c = Tensor::rand({64}).to_vector<float>();
  });
  t3.join();
  std::thread t4([&] {
    set_thread_rng_index(5);
    d = Tensor::rand({64}).to_vector<float>();
  });
  t4.join();
  CHECK(c == d);
  CHECK(thread_stream_seed(7, 0) == 7);
  CHECK(thread_stream_seed(7, 5) != thread_stream_seed(7, 6));
}

TEST_CASE("memory can be read per thread and per graph", "[graphs][memory][threads]") {
  manual_seed(8);
  MlpBlock block(16, 32);
  int64_t mine_before = thread_memory_stats().total.current;
  int64_t other = 0;
  std::thread t([&] {
    Tensor y = Tensor::zeros({1000});  // 4000 bytes on that thread only
    other = thread_memory_stats().total.current;
  });
  t.join();
  CHECK(other >= 4000);
  CHECK(thread_memory_stats().total.current == mine_before);
  Tensor loss = sum(block(Tensor::randn({8, 16})));
  GraphMemory g = graph_memory(loss);
  CHECK(g.current > 0);
  CHECK(g.peak >= g.current);
  backward(loss);
  CHECK(graph_memory(loss).current == 0);  // backward released what the graph saved
}

TEST_CASE("a policy callback that throws leaves no trace: the next step gives the reference gradients", "[graphs][errors]") {
  manual_seed(9);
  GptStep s;
  auto reference = s.grads();
  bool fail = true;
  CheckpointOptions o;
  o.policy = {"flaky", [&](const PolicyContext& ctx) {
                if (fail && ctx.kind == OpKind::gelu) throw std::runtime_error("policy failed on gelu");
                return Decision::prefer_recompute;
              }};
  checkpoint(*s.model.blocks->children()[0].second, o);
  CHECK_THROWS_WITH(s.loss(), Contains("policy failed on gelu"));
  fail = false;
  reset_checkpoint_counters();
  CHECK(s.grads() == reference);
  CHECK(checkpoint_counters().replays > 0);
}

TEST_CASE("a block that throws inside a chain-schedule span closes the span", "[graphs][errors][schedule]") {
  manual_seed(10);
  GptStep s(4);  // sqrt: spans of two blocks, [0, 2) and [2, 4)
  auto reference = s.grads();
  apply_policy(s.model, parse_policy("sqrt"));
  bool fail = true;
  s.model.blocks->children()[1].second->add_forward_hook({"test_failure", [&](Module&) {
                                                            if (fail) throw std::runtime_error("block failed");
                                                          },
                                                          nullptr});
  // Block 1 fails after block 0 opened the span [0, 2).
  CHECK_THROWS_WITH(s.loss(), Contains("block failed"));
  CHECK(innermost_recording_scope() == nullptr);
  fail = false;
  reset_checkpoint_counters();
  CHECK(s.grads() == reference);
  CHECK(checkpoint_counters().replays > 0);
}

TEST_CASE("a pre-hook that throws closes the regions earlier pre-hooks opened", "[graphs][errors]") {
  manual_seed(11);
  MlpBlock inner(8, 16);
  struct Wrapper final : public nn::UnaryModule {
    MlpBlock& block;
    explicit Wrapper(MlpBlock& b) : UnaryModule("Wrapper"), block(b) {}
    Tensor forward(const Tensor& x) override { return block(x); }
  } wrapper(inner);
  checkpoint(wrapper);  // opens a region in its pre-hook
  bool fail = true;
  wrapper.add_forward_hook({"failing", [&](Module&) {
                              if (fail) throw std::runtime_error("pre-hook failed");
                            },
                            nullptr});
  Tensor x = Tensor::randn({4, 8});
  CHECK_THROWS_WITH(wrapper(x), Contains("pre-hook failed"));
  CHECK(innermost_recording_scope() == nullptr);
  fail = false;
  auto reference = run_grads(inner.params(), [&] { return sum(inner(x)); });
  CHECK(run_grads(inner.params(), [&] { return sum(wrapper(x)); }) == reference);
}

TEST_CASE("checkpoint scopes closed out of order: close() says so, destruction never terminates", "[graphs][errors]") {
  Tensor x = Tensor::randn({3}).set_requires_grad(true);
  auto outer = std::make_unique<CheckpointScope>();
  auto inner = std::make_unique<CheckpointScope>();
  Tensor y = exp(x);
  CHECK_THROWS_WITH(outer->close(), Contains("closed while a region opened after it is still open"));
  outer.reset();  // closes inner first, then itself; no terminate
  CHECK_FALSE(inner->active());
  inner.reset();
  CHECK(innermost_recording_scope() == nullptr);
  backward(sum(mul(y, y)));
  CHECK(x.grad().defined());
}

TEST_CASE("an exception in backward: the graph refuses a retry, the next step works", "[graphs][errors]") {
  manual_seed(12);
  MlpBlock block(8, 16);
  Tensor x = Tensor::randn({4, 8});
  auto reference = run_grads(block.params(), [&] { return sum(block(x)); });
  bool fail = true;
  CustomOp op;
  op.name = "fragile";
  op.forward = [](const std::vector<Tensor>& in) { return std::vector<Tensor>{in[0].clone()}; };
  op.backward = [&](const std::vector<Tensor>& g, const std::vector<Tensor>&) {
    if (fail) throw std::runtime_error("fragile backward failed");
    return std::vector<Tensor>{g[0]};
  };
  for (Tensor& p : block.params()) p.zero_grad();
  Tensor loss = sum(custom(op, {block(x)})[0]);
  CHECK_THROWS_WITH(backward(loss), Contains("fragile backward failed"));
  for (const Tensor& p : block.params()) CHECK_FALSE(p.grad().defined());  // nothing half-written
  CHECK_THROWS_WITH(backward(loss), Contains("an earlier backward through this graph failed"));
  fail = false;
  CHECK(run_grads(block.params(), [&] { return sum(custom(op, {block(x)})[0]); }) == reference);
}

TEST_CASE("user mistakes are clear errors, not internal ones", "[graphs][errors]") {
  Tensor x = Tensor::randn({2, 3}).set_requires_grad(true);
  CustomOp wrong_shape;
  wrong_shape.name = "wrong_shape";
  wrong_shape.forward = [](const std::vector<Tensor>& in) { return std::vector<Tensor>{in[0].clone()}; };
  wrong_shape.backward = [](const std::vector<Tensor>&, const std::vector<Tensor>&) {
    return std::vector<Tensor>{Tensor::ones({3, 2})};
  };
  CHECK_THROWS_WITH(backward(sum(custom(wrong_shape, {x})[0])),
                    Contains("backward of wrong_shape returned a gradient for input 0 as f32[3,2] on cpu; expected the input's f32[2,3] on cpu"));
  CustomOp saves_nothing;
  saves_nothing.name = "saves_undefined";
  saves_nothing.forward = [](const std::vector<Tensor>& in) { return std::vector<Tensor>{in[0].clone()}; };
  saves_nothing.backward = [](const std::vector<Tensor>& g, const std::vector<Tensor>&) {
    return std::vector<Tensor>{g[0], Tensor()};
  };
  saves_nothing.saved = {1};
  CHECK_THROWS_WITH(custom(saves_nothing, {x, Tensor()}), Contains("saves input 1 for backward, but that input is undefined"));
  CHECK_THROWS_WITH(x.view({4}, {1, 1}, 0), Contains("view: expected as many strides as sizes"));
  CHECK_THROWS_WITH(x.view({7}, {1}, 0), Contains("reaches element 6, past the 6 elements of its storage"));
  CHECK_THROWS_WITH(grad(sum(x), {Tensor::ones({2})}), Contains("grad: input 0 must be a tensor that requires grad"));
}

TEST_CASE("graphs whose forwards import from each other are freed with their tensors", "[graphs][memory]") {
  // Two streams started from leaves and mixed back and forth: every import points at an older graph.
  Tensor a = Tensor::randn({4, 4}).set_requires_grad(true), b = Tensor::randn({4, 4}).set_requires_grad(true);
  int64_t before = activations();
  std::weak_ptr<Graph> first, second;
  {
    Tensor x = exp(a), y = exp(b);  // two graphs
    first = x.autograd_meta_ptr()->graph;
    second = y.autograd_meta_ptr()->graph;
    REQUIRE(first.lock() != second.lock());
    Tensor u = mul(x, y), v = mul(y, x), w = mul(u, v);
    backward(sum(w), Tensor(), {.retain_graph = true});
    Tensor z = mul(exp(x), w);  // back onto the first stream's value
    backward(sum(z));
  }
  CHECK(first.expired());
  CHECK(second.expired());
  CHECK(activations() == before);
}
