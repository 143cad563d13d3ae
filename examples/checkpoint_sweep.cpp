// Example 1: a model of your own, checkpointed hook-style, under a sweep of policies. Each policy
// must give the gradients of no checkpointing bit for bit; the sweep prints what each one costs
// in activation memory (the allocator's counters) and time.
#include <remat/remat.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

using namespace remat;

// A pre-norm residual MLP block: x + W2 gelu(W1 norm(x)).
class Block final : public nn::UnaryModule {
 public:
  explicit Block(int64_t width) : UnaryModule("Block") {
    norm = register_module("norm", std::make_shared<nn::LayerNorm>(width));
    up = register_module("up", std::make_shared<nn::Linear>(width, 4 * width));
    down = register_module("down", std::make_shared<nn::Linear>(4 * width, width));
  }
  Tensor forward(const Tensor& x) override { return add(x, (*down)(gelu((*up)((*norm)(x))))); }
  std::shared_ptr<nn::LayerNorm> norm;
  std::shared_ptr<nn::Linear> up, down;
};

class Model final : public Module {
 public:
  Model(int64_t width, int depth) : Module("Model") {
    layers = register_module("layers", std::make_shared<nn::ModuleList>());
    layers->set_block_container();  // "layers" is not one of FastVideo's names: say it is a container
    for (int i = 0; i < depth; ++i) layers->push_back(std::make_shared<Block>(width));
  }
  Tensor loss(const Tensor& x) {
    Tensor h = x;
    for (size_t i = 0; i < layers->size(); ++i) h = layers->at<Block>(i)(h);
    return mean(mul(h, h));
  }
  std::shared_ptr<nn::ModuleList> layers;
};

int main() {
  manual_seed(0);
  Model model(128, 8);
  Tensor x = Tensor::randn({64, 128});
  auto step = [&] {
    for (Tensor& p : model.parameters()) p.zero_grad();
    reset_peak_memory();
    int64_t base = memory_stats()[MemoryCategory::activation].current;
    auto start = std::chrono::steady_clock::now();
    backward(model.loss(x));
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    int64_t peak = memory_stats()[MemoryCategory::activation].peak - base;
    std::vector<std::vector<double>> grads;
    for (const Tensor& p : model.parameters()) grads.push_back(p.grad().to_vector<double>());
    return std::make_tuple(peak, ms, grads);
  };
  auto [none_peak, none_ms, reference] = step();
  std::printf("%-26s %12s %9s %9s %8s\n", "policy", "activations", "ms", "replays", "bitwise");
  std::printf("%-26s %10.1f K %9.2f %9d %8s\n", "none", none_peak / 1024.0, none_ms, 0, "yes");

  struct Case {
    std::string name;
    std::function<void()> apply;
  };
  std::vector<Case> cases = {
      {"hook-style, every block", [&] { for (size_t i = 0; i < model.layers->size(); ++i) checkpoint(model.layers->at<Block>(i)); }},
      {"hook-style, MLPs saved", [&] {
         CheckpointOptions o;
         o.policy = save_ops({OpKind::linear});
         for (size_t i = 0; i < model.layers->size(); ++i) checkpoint(model.layers->at<Block>(i), o);
       }},
      {"full", [&] { apply_policy(model, parse_policy("full")); }},
      {"block_skip:2", [&] { apply_policy(model, parse_policy("block_skip:2")); }},
      {"sqrt", [&] { apply_policy(model, parse_policy("sqrt")); }},
  };
  bool all_equal = true;
  for (const Case& c : cases) {
    remove_checkpointing(model);
    c.apply();
    reset_checkpoint_counters();
    auto [peak, ms, grads] = step();
    bool equal = grads == reference;
    all_equal = all_equal && equal && checkpoint_counters().replays > 0;
    std::printf("%-26s %10.1f K %9.2f %9lld %8s\n", c.name.c_str(), peak / 1024.0, ms,
                static_cast<long long>(checkpoint_counters().replays), equal ? "yes" : "NO");
  }
  std::printf("remat %s: %s\n", version(), all_equal ? "every policy gave the gradients of none, bit for bit"
                                                     : "a policy changed the gradients");
  return all_equal ? 0 : 1;
}
