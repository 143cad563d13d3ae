// Chain schedules: the revolve table against Griewank's closed form, block forwards counted while
// running, and exact gradients.
#include <catch.hpp>
#include <memory>

#include "models_for_tests.h"

using namespace remat;
using namespace remat::testing;

namespace {

// A chain of N blocks; each block is one custom op that counts its forward calls (the first run
// and every replay) and whose backward reads its saved input.
struct CountingChain {
  std::shared_ptr<int64_t> forwards = std::make_shared<int64_t>(0);
  std::vector<TensorFn> fns;
  explicit CountingChain(int n) {
    CustomOp block{"block",
                   [count = forwards](const std::vector<Tensor>& in) {
                     ++*count;
                     return std::vector<Tensor>{tanh(add_scalar(in[0], 0.1))};
                   },
                   [](const std::vector<Tensor>& g, const std::vector<Tensor>& saved) {
                     Tensor y = tanh(add_scalar(saved[0], 0.1));
                     return std::vector<Tensor>{mul(g[0], add_scalar(neg(mul(y, y)), 1.0))};
                   },
                   {0}};
    for (int i = 0; i < n; ++i) fns.push_back([block](const Tensor& x) { return custom(block, {x})[0]; });
  }
};

}  // namespace

TEST_CASE("the revolve table equals Griewank's closed form for N up to 32 and 1..4 slots", "[planner][schedule]") {
  for (int s = 1; s <= 4; ++s)
    for (int n = 1; n <= 32; ++n) {
      INFO("N = " << n << ", slots = " << s);
      CHECK(revolve_schedule(n, s).replayed_blocks == revolve_closed_form(n, s));
    }
  CHECK(revolve_closed_form(10, 1) == 45);  // one slot: n (n - 1) / 2
  CHECK(revolve_closed_form(3, 2) == 2);
}

TEST_CASE("running a revolve schedule replays exactly the closed-form number of block forwards", "[planner][schedule]") {
  for (int s = 1; s <= 4; ++s)
    for (int n = 1; n <= 32; ++n) {
      CountingChain chain(n);
      Tensor x = Tensor::randn({2, 3}).set_requires_grad(true);
      Tensor y = checkpoint_chain(chain.fns, revolve_schedule(n, s), x);
      CHECK(*chain.forwards == n);
      backward(sum(y));
      INFO("N = " << n << ", slots = " << s);
      CHECK(*chain.forwards - n == revolve_closed_form(n, s));
    }
}

TEST_CASE("sqrt and revolve schedules give gradients bitwise equal to the plain chain", "[planner][schedule]") {
  auto blocks = std::vector<MlpBlock>{};
  manual_seed(31);
  for (int i = 0; i < 9; ++i) blocks.emplace_back(8, 16);
  std::vector<TensorFn> fns;
  std::vector<Tensor> leaves;
  for (auto& b : blocks) {
    fns.push_back(b);
    for (auto& p : b.params()) leaves.push_back(p);
  }
  Tensor x = Tensor::randn({3, 8}).set_requires_grad(true);
  leaves.push_back(x);
  auto run_plain = [&] {
    Tensor h = x;
    for (auto& f : fns) h = f(h);
    return mean(mul(h, h));
  };
  auto plain = run_grads(leaves, run_plain);
  for (const ChainSchedule& sched : {sqrt_schedule(9), revolve_schedule(9, 1), revolve_schedule(9, 2), revolve_schedule(9, 3)}) {
    INFO(sched.name);
    CHECK(run_grads(leaves, [&] {
            Tensor h = checkpoint_chain(fns, sched, x);
            return mean(mul(h, h));
          }) == plain);
  }
  CountingChain chain(9);
  Tensor z = Tensor::randn({2}).set_requires_grad(true);
  backward(sum(checkpoint_chain(chain.fns, sqrt_schedule(9), z)));
  CHECK(*chain.forwards - 9 == sqrt_schedule(9).replayed_blocks);
  CHECK(sqrt_schedule(9).replayed_blocks == 6);  // three spans of three: two inputs rebuilt each
}

#include "models/gpt.h"

namespace {

struct TinyGpt {
  Gpt model;
  Tensor idx, targets;
  TinyGpt() : model(make()) {
    std::vector<int64_t> ids, next;
    for (int i = 0; i < 2 * 16; ++i) {
      ids.push_back((i * 11 + 5) % 64);
      next.push_back((i * 3 + 2) % 64);
    }
    idx = Tensor::from_vector(ids, {2, 16});
    targets = Tensor::from_vector(next, {2, 16});
  }
  static Gpt make() {
    manual_seed(41);
    GptConfig c = gpt_config("tiny");
    c.layers = 8;
    return Gpt(c);
  }
  Tensor loss() {
    set_rng_state({77, 0});
    return model.loss(idx, targets);
  }
  // Activation peak of one forward+backward, above the level at its start.
  int64_t step_peak() {
    for (Tensor& p : model.parameters()) p.zero_grad();
    reset_peak_memory();
    int64_t base = memory_stats()[MemoryCategory::activation].current;
    backward(loss());
    return memory_stats()[MemoryCategory::activation].peak - base;
  }
};

}  // namespace

TEST_CASE("the budget planner fits 25, 50 and 75 percent of the no-checkpoint peak, with exact gradients",
          "[planner][budget]") {
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  int64_t none_peak = g.step_peak();
  for (double percent : {25.0, 50.0, 75.0}) {
    BudgetPlanner planner(g.model, 0, percent);
    const BudgetPlan& plan = planner.plan([&] { return g.loss(); });
    INFO(percent << "%: " << plan.to_string());
    CHECK(plan.none_peak_bytes == none_peak);
    CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
    int64_t measured = g.step_peak();
    // The simulator counts saved tensors only; the slack covers the few small tensors alive around
    // them (positions, the loss). Stated slack: 5% of the budget.
    CHECK(measured <= plan.budget_bytes + plan.budget_bytes / 20);
    CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
  }
  // A smaller budget checkpoints at least as many blocks.
  auto count = [&](double percent) {
    BudgetPlanner planner(g.model, 0, percent);
    int n = 0;
    for (const auto& b : planner.plan([&] { return g.loss(); }).blocks) n += b.checkpointed;
    return n;
  };
  CHECK(count(25) >= count(50));
  CHECK(count(50) >= count(75));
  remove_checkpointing(g.model);
}

TEST_CASE("a budget below the floor fails with the floor in its message", "[planner][budget][errors]") {
  TinyGpt g;
  BudgetPlanner planner(g.model, 1000);
  CHECK_THROWS_WITH(planner.plan([&] { return g.loss(); }),
                    Catch::Matchers::Contains("budget 1000 bytes is below the achievable floor of") &&
                        Catch::Matchers::Contains("every block checkpointed"));
  CHECK_THROWS_WITH(parse_policy("budget:150%"), Catch::Matchers::Contains("0 < percent <= 100"));
  CHECK_THROWS_WITH(apply_policy(g.model, parse_policy("budget:50%")), Catch::Matchers::Contains("use BudgetPlanner"));
}

TEST_CASE("sqrt and revolve placed on gpt blocks by policy string keep gradients exact", "[planner][schedule]") {
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  for (const char* policy : {"sqrt", "revolve:1", "revolve:2", "revolve:3"}) {
    apply_policy(g.model, parse_policy(policy));
    reset_checkpoint_counters();
    INFO(policy);
    CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
    CHECK(checkpoint_counters().replays > 0);
  }
  remove_checkpointing(g.model);
}

TEST_CASE("offload decisions on cpu keep the tensor and the report says so", "[planner][offload]") {
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  CheckpointOptions o;
  o.policy = {"offload_linears", [](const PolicyContext& ctx) {
                return ctx.kind == OpKind::linear ? Decision::prefer_offload : Decision::prefer_recompute;
              }};
  SaveReport report = what_is_saved(g.model, o, [&] { return g.loss(); });
  CHECK(report.offload_decisions == 8 * 4 + 0);  // qkv, proj, fc, mlp proj in each of 8 blocks
  CHECK_THAT(report.to_string(), Catch::Matchers::Contains("offload decision(s) on cpu") &&
                                     Catch::Matchers::Contains("they are kept"));
  checkpoint(g.model, o);
  reset_checkpoint_counters();
  CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
  CHECK(checkpoint_counters().replayed_by_op[static_cast<int>(OpKind::linear)] == 0);  // kept, never replayed
  CHECK(checkpoint_counters().bytes_offloaded == 0);  // nothing to move: the data is on the host
  remove_checkpointing(g.model);
}
