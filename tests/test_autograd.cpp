// The tape and the backward engine: accumulation, retain_graph, no-grad, misuse errors, and
// activation memory read from the allocator counters.
#include <catch.hpp>

#include "autograd/cast_cache.h"
#include "autograd/graph.h"
#include "remat.h"

using namespace remat;
using Catch::Matchers::Contains;

namespace {
Tensor leaf(std::vector<double> v, Shape s) { return Tensor::from_vector(v, s).set_requires_grad(true); }
std::vector<double> grad_of(const Tensor& t) { return t.grad().to_vector<double>(); }
}  // namespace

TEST_CASE("backward accumulates gradients of a leaf used twice", "[autograd]") {
  Tensor x = leaf({1, 2, 3}, {3});
  Tensor y = sum(add(mul(x, x), mul_scalar(x, 3.0)));  // d/dx = 2x + 3
  backward(y);
  CHECK(grad_of(x) == std::vector<double>{5, 7, 9});
}

TEST_CASE("the tape records one node per op in execution order", "[autograd]") {
  Tensor x = leaf({1, 2}, {2});
  Tensor y = exp(x);
  Tensor z = sum(mul(y, x));
  auto graph = std::static_pointer_cast<Graph>(z.autograd_meta_ptr()->graph);
  REQUIRE(graph->nodes.size() == 3);
  CHECK(graph->nodes[0]->kind() == OpKind::exp);
  CHECK(graph->nodes[1]->kind() == OpKind::mul);
  CHECK(graph->nodes[2]->kind() == OpKind::sum);
  CHECK(graph->nodes[1]->inputs[0] == graph->nodes[0]->outputs[0]);
}

TEST_CASE("device op timing is scoped and leaves cpu ops with their host times only", "[autograd]") {
  CHECK_FALSE(DeviceOpTiming::active());
  Tensor x = leaf({1, 2}, {2});
  Tensor z;
  {
    DeviceOpTiming timing;
    CHECK(DeviceOpTiming::active());
    z = sum(exp(x));
  }
  CHECK_FALSE(DeviceOpTiming::active());
  auto graph = std::static_pointer_cast<Graph>(z.autograd_meta_ptr()->graph);
  for (const auto& node : graph->nodes) {
    CHECK_FALSE(node->forward_start_event);  // events are for ops on a GPU
    CHECK(node->forward_us >= 0);
  }
}

TEST_CASE("a given gradient seeds backward of a non-scalar root", "[autograd]") {
  Tensor x = leaf({1, 2}, {2});
  Tensor y = mul_scalar(x, 4.0);
  CHECK_THROWS_WITH(backward(y), Contains("a gradient is needed for a non-scalar root f64[2]"));
  CHECK_THROWS_WITH(backward(y, Tensor::ones({3}, DType::f64)),
                    Contains("expected a gradient matching the root f64[2] on cpu, got f64[3] on cpu"));
  backward(y, Tensor::from_vector<double>({1, 10}, {2}));
  CHECK(grad_of(x) == std::vector<double>{4, 40});
}

TEST_CASE("retain_graph allows a second backward; without it the second backward is an error", "[autograd]") {
  Tensor x = leaf({1, 2}, {2});
  Tensor y = sum(exp(x));
  backward(y, Tensor(), {.retain_graph = true});
  backward(y);
  auto g = grad_of(x);
  CHECK(g[0] == Approx(2 * std::exp(1.0)));
  CHECK_THROWS_WITH(backward(y), Contains("backward through the graph a second time"));
}

TEST_CASE("backpropagating again into a graph an earlier backward freed is the second-time error", "[autograd]") {
  Tensor x = leaf({1, 2}, {2});
  Tensor h = exp(x);
  backward(sum(h), Tensor(), {.retain_graph = false});
  Tensor z = sum(mul(h, h));
  CHECK_THROWS_WITH(backward(z), Contains("backward through the graph a second time: the saved tensors of exp"));
}

TEST_CASE("no-grad mode records nothing", "[autograd]") {
  Tensor x = leaf({1, 2}, {2});
  {
    NoGradGuard no_grad;
    Tensor y = mul(x, x);
    CHECK_FALSE(y.requires_grad());
    CHECK(y.is_leaf());
  }
  CHECK(mul(x, x).requires_grad());
  CHECK_THROWS_WITH(backward(Tensor::ones({1})), Contains("expected a tensor that requires grad"));
}

TEST_CASE("a saved tensor modified in place before backward is reported", "[autograd]") {
  Tensor x = leaf({1, 2}, {2});
  Tensor y = exp(x);   // exp saves its output
  Tensor z = sum(y);
  y.fill_(0.0);        // in-place write after it was saved
  CHECK_THROWS_WITH(backward(z), Contains("backward of exp") && Contains("modified by an in-place operation"));
}

TEST_CASE("gradients of leaves never alias each other", "[autograd]") {
  Tensor a = leaf({1, 2}, {2}), b = leaf({3, 4}, {2});
  backward(sum(add(a, b)));
  CHECK(a.grad().storage() != b.grad().storage());
  CHECK(grad_of(a) == std::vector<double>{1, 1});
}

TEST_CASE("non-differentiable outputs and inputs get no gradient", "[autograd]") {
  Tensor logits = leaf({1, 2, 3, 4}, {2, 2});
  Tensor targets = Tensor::from_vector<int64_t>({1, 0}, {2});
  Tensor loss = cross_entropy(logits, targets);
  backward(loss);
  CHECK(logits.grad().defined());
  CHECK_FALSE(targets.requires_grad());
}

TEST_CASE("a custom op with a bad saved index fails with a clear message", "[autograd]") {
  CustomOp op{"bad", [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mul_scalar(in[0], 2.0)}; },
              [](const std::vector<Tensor>&, const std::vector<Tensor>&) { return std::vector<Tensor>{Tensor()}; },
              {3}};
  CHECK_THROWS_WITH(custom(op, {leaf({1}, {1})}), Contains("bad: saves index 3 but has 1 inputs and 1 outputs"));
}

TEST_CASE("the activation peak of a small MLP forward and backward equals the hand count", "[autograd][memory]") {
  manual_seed(9);
  Tensor w1, b1, w2, b2;
  {
    MemoryCategoryScope params(MemoryCategory::parameter);
    w1 = Tensor::randn({16, 8}).set_requires_grad(true);
    b1 = Tensor::zeros({16}).set_requires_grad(true);
    w2 = Tensor::randn({8, 16}).set_requires_grad(true);
    b2 = Tensor::zeros({8}).set_requires_grad(true);
  }
  Tensor x = Tensor::randn({4, 8});
  Allocator& cpu = allocator_for(Device::cpu());
  cpu.reset_peak();
  int64_t base = cpu.stats()[MemoryCategory::activation].current;
  {
    Tensor h = linear(x, w1, b1);    // 4x16 f32 = 256 B, saved by gelu
    Tensor a = gelu(h);              // 256 B, saved by the second linear
    Tensor y = linear(a, w2, b2);    // 4x8 = 128 B, saved by mul
    Tensor loss = sum(mul(y, y));    // y*y: 128 B (temporary), loss: 4 B
    backward(loss);
  }
  MemoryStats s = cpu.stats();
  CHECK(s[MemoryCategory::activation].peak - base == 256 + 256 + 128 + 128 + 4);
  CHECK(s[MemoryCategory::activation].current == base);  // everything saved was released by backward
  CHECK(w1.grad().defined());
  CHECK(s[MemoryCategory::gradient].current >= static_cast<int64_t>((16 * 8 + 16 + 8 * 16 + 8) * 4));
}

TEST_CASE("backward lets a linear's saved input go before dx and takes gelu's gradient in place", "[autograd][memory]") {
  // An MLP's down projection: its saved input a = gelu(h) is as large as its dx. Without
  // retain_graph, a goes once dW is computed, before dx exists, and gelu writes dx over its dy:
  // backward's peak is then lower, by a's bytes at least, than when everything is retained.
  manual_seed(10);
  const int64_t rows = 64, wide = 256, narrow = 32;
  Tensor w1 = Tensor::randn({wide, narrow}).set_requires_grad(true), w2 = Tensor::randn({narrow, wide}).set_requires_grad(true);
  Tensor x = Tensor::randn({rows, narrow});
  const int64_t a_bytes = rows * wide * 4;
  Allocator& cpu = allocator_for(Device::cpu());
  auto backward_peak = [&](bool retain) {
    w1.zero_grad(), w2.zero_grad();
    Tensor loss = sum(linear(gelu(linear(x, w1)), w2));
    cpu.reset_peak();
    int64_t base = cpu.stats().total.current;
    backward(loss, Tensor(), {.retain_graph = retain});
    return std::pair{cpu.stats().total.peak - base, std::vector<float>(w1.grad().to_vector<float>())};
  };
  auto [retained, grads_retained] = backward_peak(true);
  auto [released, grads_released] = backward_peak(false);
  INFO("backward peak above its start: " << released << " bytes released early, " << retained << " retained");
  CHECK(released + a_bytes <= retained);
  CHECK(grads_released == grads_retained);  // the same bits either way
}

TEST_CASE("a leaf's gradient is announced once it is final, later layers first, with the bits .grad gets",
          "[autograd][hooks]") {
  Tensor x = Tensor::randn({4, 8});
  std::vector<Tensor> w;
  for (int i = 0; i < 3; ++i) w.push_back(Tensor::randn({8, 8}).set_requires_grad(true));
  std::vector<std::pair<const AutogradMeta*, std::vector<float>>> announced;
  {
    LeafGradReadyScope ready([&](const AutogradMeta* leaf, const Tensor& grad) {
      announced.emplace_back(leaf, grad.as_contiguous().to_vector<float>());
    });
    Tensor h = x;
    for (const Tensor& wi : w) h = tanh(linear(h, wi));
    backward(sum(mul(h, h)));
  }
  REQUIRE(announced.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(announced[i].first == w[2 - i].autograd_meta_ptr().get());  // the last layer's first
    CHECK(announced[i].second == w[2 - i].grad().to_vector<float>());
  }
  // Outside the scope nothing is announced.
  announced.clear();
  Tensor l = sum(linear(x, w[0]));
  backward(l);
  CHECK(announced.empty());
}

TEST_CASE("reshape of a projection's slice into heads is a view; one that must move elements copies", "[autograd]") {
  manual_seed(9);
  Tensor qkv = Tensor::randn({2, 5, 24}).set_requires_grad(true);
  auto parts = split(qkv, 2, {8, 8, 8});
  Tensor k = reshape(parts[1], {2, 5, 2, 4});
  CHECK(k.storage() == qkv.storage());  // no copy: the heads address the projection's memory
  CHECK(k.strides() == Strides{120, 24, 4, 1});
  CHECK(k.to_vector<float>() == reshape(parts[1].as_contiguous(), {2, 5, 2, 4}).to_vector<float>());
  Tensor t = reshape(permute(parts[2], {1, 0, 2}), {5, 16});  // rows of two batches side by side: a copy
  CHECK(t.storage() != qkv.storage());
  CHECK(t.is_contiguous());
  // Gradients reach the right elements either way: d/dqkv of sum(k * 2) + sum(t * 3).
  backward(add(sum(mul_scalar(k, 2.0)), sum(mul_scalar(t, 3.0))));
  std::vector<float> g = qkv.grad().to_vector<float>();
  for (size_t i = 0; i < g.size(); ++i) CHECK(g[i] == (i % 24 < 8 ? 0.0f : i % 24 < 16 ? 2.0f : 3.0f));
}

TEST_CASE("split takes back gradients that lie side by side as its input's, without a copy", "[autograd]") {
  // A custom op hands back its inputs' gradients as views of one buffer it makes, as CPU attention
  // does for the heads of a fused projection: in the parts' order they are the split input's
  // gradient as they lie (the buffer itself goes on), else a copy with the same values.
  manual_seed(10);
  Tensor x = Tensor::randn({2, 3, 10}, DType::f64).set_requires_grad(true);
  const std::vector<double> values = Tensor::randn({60}, DType::f64).to_vector<double>();
  const std::vector<int64_t> sizes{2, 3, 5}, in_order{0, 2, 5}, out_of_order{8, 0, 3};
  for (const std::vector<int64_t>& starts : {in_order, out_of_order}) {
    const Storage* made = nullptr;
    std::vector<double> expected;
    CustomOp total{"total",
                   [](const std::vector<Tensor>& in) {
                     return std::vector<Tensor>{add(add(sum(in[0]), sum(in[1])), sum(in[2]))};
                   },
                   [&](const std::vector<Tensor>&, const std::vector<Tensor>&) {
                     Tensor buffer = Tensor::from_vector<double>(values, {2, 3, 10});
                     made = buffer.storage().get();
                     std::vector<Tensor> given;
                     for (size_t i = 0; i < 3; ++i)
                       given.push_back(buffer.view({2, 3, sizes[i]}, buffer.strides(), starts[i]));
                     expected = concat(given, 2).to_vector<double>();
                     return given;
                   },
                   {}};
    // What reaches split's input: seen by the op before it, which passes it on.
    const Storage* reached = nullptr;
    std::vector<double> reached_values;
    CustomOp probe{"probe", [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mul_scalar(in[0], 2.0)}; },
                   [&](const std::vector<Tensor>& go, const std::vector<Tensor>&) {
                     reached = go[0].storage().get();
                     reached_values = go[0].to_vector<double>();
                     return std::vector<Tensor>{mul_scalar(go[0], 2.0)};
                   },
                   {}};
    backward(custom(total, split(custom(probe, {x})[0], 2, sizes))[0]);
    CHECK((reached == made) == (starts == in_order));
    CHECK(reached_values == expected);
  }
}

TEST_CASE("autocast keeps a parameter's bf16 copy while it is unchanged, with a cast's bits, and AdamW rewrites it",
          "[autograd][autocast]") {
  // The cache itself (the CPU computes no GEMM in bf16: the CUDA suite runs linear and matmul on
  // it, and gpt bf16 training with and without it).
  manual_seed(71);
  clear_autocast_cache();
  Backend& cpu = backend_for(Device::cpu());
  auto parameter_bytes = [] { return memory_stats()[MemoryCategory::parameter].current; };
  const int64_t params0 = parameter_bytes();
  Tensor w, b;
  {
    MemoryCategoryScope scope(MemoryCategory::activation);  // so that the parameter count is the copies'
    w = Tensor::randn({16, 32}).set_requires_grad(true), b = Tensor::randn({16}).set_requires_grad(true);
  }
  // Which tensors are parameters to the cache: leaves that require grad, f32, contiguous.
  CHECK(detail::caches_compute_copy(w));
  CHECK_FALSE(detail::caches_compute_copy(w.detach()));
  CHECK_FALSE(detail::caches_compute_copy(mul_scalar(w, 1.0)));
  CHECK_FALSE(detail::caches_compute_copy(transpose(w.detach(), 0, 1).set_requires_grad(true)));
  CHECK_FALSE(detail::caches_compute_copy(w.to(DType::f64).set_requires_grad(true)));

  auto copy_of = [&](const Tensor& t) { return detail::compute_copy(cpu, t, DType::bf16); };
  auto cast_of = [&](const Tensor& t) { return cpu.cast(t, DType::bf16).to_vector<float>(); };
  const int64_t copy_bytes = (16 * 32 + 16) * 2;
  const AutocastCacheStats s0 = autocast_cache_stats();
  CHECK(copy_of(w).to_vector<float>() == cast_of(w));  // made
  CHECK(copy_of(b).to_vector<float>() == cast_of(b));
  Tensor first = copy_of(w);                           // and taken: the same memory
  CHECK(copy_of(w).raw_data() == first.raw_data());
  first = Tensor();
  const AutocastCacheStats s1 = autocast_cache_stats();
  CHECK(s1.casts - s0.casts == 2);
  CHECK(s1.hits - s0.hits == 2);
  CHECK(s1.copies == 2);
  CHECK(s1.bytes == copy_bytes);
  CHECK(parameter_bytes() - params0 == copy_bytes);  // counted as parameters

  {
    // AdamW updates the weights and writes their copies in the same pass: the next use casts
    // nothing and reads what a cast of the updated weights gives.
    AdamW optimizer(std::vector<std::pair<std::string, Tensor>>{{"w", w}, {"b", b}});
    const std::vector<float> w_before = w.to_vector<float>();
    w.set_grad(Tensor::randn({16, 32})), b.set_grad(Tensor::randn({16}));
    optimizer.step(1e-2);
    CHECK(w.to_vector<float>() != w_before);
    const AutocastCacheStats s2 = autocast_cache_stats();
    CHECK(s2.refreshes - s1.refreshes == 2);
    CHECK(copy_of(w).to_vector<float>() == cast_of(w));
    CHECK(copy_of(b).to_vector<float>() == cast_of(b));
    CHECK(autocast_cache_stats().casts == s2.casts);

    // A write through copy_ moves the version on: that copy is made again, the other stays.
    w.copy_(Tensor::randn({16, 32}));
    CHECK(copy_of(w).to_vector<float>() == cast_of(w));
    CHECK(autocast_cache_stats().casts - s2.casts == 1);

    // A copy an op holds while the optimizer runs is not rewritten under it: dropped, made again.
    Tensor held = copy_of(w);
    const std::vector<float> held_values = held.to_vector<float>();
    CHECK_FALSE(detail::compute_copy_for_update(w).defined());
    CHECK(autocast_cache_stats().copies == 1);
    w.set_grad(Tensor::randn({16, 32})), b.set_grad(Tensor::randn({16}));
    optimizer.step(1e-2);
    CHECK(held.to_vector<float>() == held_values);
    CHECK(copy_of(w).to_vector<float>() == cast_of(w));
    CHECK(copy_of(b).to_vector<float>() == cast_of(b));
  }

  // Off: no copy kept, those there freed; on again, made again; they go with their parameters.
  set_autocast_cache_enabled(false);
  CHECK(parameter_bytes() == params0);
  const int64_t casts = autocast_cache_stats().casts;
  CHECK(copy_of(w).to_vector<float>() == cast_of(w));
  CHECK(autocast_cache_stats().casts == casts);
  CHECK(autocast_cache_stats().copies == 0);
  set_autocast_cache_enabled(true);
  copy_of(w), copy_of(b);
  CHECK(parameter_bytes() - params0 == copy_bytes);
  w = Tensor(), b = Tensor();
  CHECK(autocast_cache_stats().copies == 0);
  CHECK(parameter_bytes() == params0);
}
