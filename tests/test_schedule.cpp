// Chain schedules: the revolve table against Griewank's closed form, block forwards counted while
// running, and exact gradients.
#include <catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <random>

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
    CHECK(locate_peak(plan.blocks, plan.step).where == plan.predicted_peak_at);
    CHECK_THAT(plan.to_string(), Catch::Matchers::Contains(" at " + plan.predicted_peak_at + ", recompute") &&
                                     Catch::Matchers::Contains("; keeps "));
    int64_t measured = g.step_peak();
    // The simulation counts forward working sets and replay transients: no slack.
    CHECK(measured <= plan.predicted_peak_bytes);
    CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
  }
  remove_checkpointing(g.model);
}

TEST_CASE("the budget planner reaches full checkpointing's peak: a checkpointed block's forward lets dropped values go",
          "[planner][budget]") {
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  apply_policy(g.model, parse_policy("full"));
  reset_checkpoint_counters();
  const int64_t full_peak = g.step_peak();
  REQUIRE(checkpoint_counters().replays > 0);
  remove_checkpointing(g.model);
  const int64_t none_peak = g.step_peak();
  REQUIRE(full_peak < none_peak);
  // A budget of full checkpointing's measured peak fits (the floor simulates each block's forward
  // without the values it drops), and so does the floor itself; each plan's measured peak stays
  // within its prediction.
  BudgetPlanner at_full(g.model, full_peak);
  const BudgetPlan& plan = at_full.plan([&] { return g.loss(); });
  INFO(plan.to_string());
  CHECK(plan.floor_bytes <= full_peak);
  const int64_t floor = plan.floor_bytes;
  for (int64_t budget : {full_peak, floor}) {
    BudgetPlanner planner(g.model, budget);
    const BudgetPlan& p = planner.plan([&] { return g.loss(); });
    INFO("budget " << budget << ": " << p.to_string());
    CHECK(p.predicted_peak_bytes <= budget);
    reset_checkpoint_counters();
    CHECK(g.step_peak() <= p.predicted_peak_bytes);
    CHECK(checkpoint_counters().replays > 0);
    CHECK(checkpoint_counters().bytes_dropped > 0);
    CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
  }
  remove_checkpointing(g.model);
}

TEST_CASE("every option of the first and the last block measures at most its simulated peak, placed by hand",
          "[planner][budget]") {
  // Which options a budget picks depends on the recorded op times; placing each by hand checks
  // them all on every run. The last block's replays run while the program holds the loss: a
  // simulation without it was 4 bytes short whenever such a replay made the peak.
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  apply_policy(g.model, parse_policy("full"));
  const int64_t full_peak = g.step_peak();
  remove_checkpointing(g.model);
  BudgetPlanner planner(g.model, full_peak);
  const BudgetPlan& plan = planner.plan([&] { return g.loss(); });
  std::vector<int> base;
  for (const PlannedBlock& b : plan.blocks) base.push_back(b.choice);
  int placed = 0;
  for (size_t j : {size_t{0}, plan.blocks.size() - 1}) {
    for (size_t k = 0; k < plan.blocks[j].options.size(); ++k) {
      std::vector<int> choice = base;
      choice[j] = static_cast<int>(k);
      const BudgetPlan& p = planner.place(choice);
      INFO(p.to_string());
      reset_checkpoint_counters();
      CHECK(g.step_peak() <= p.predicted_peak_bytes);
      CHECK(checkpoint_counters().replays > 0);
      CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
      ++placed;
    }
  }
  CHECK(placed >= 6);
  CHECK_THROWS_WITH(planner.place({0}), Catch::Matchers::Contains("expected a choice for each of the 8 blocks, got 1"));
  std::vector<int> bad = base;
  bad[0] = 99;
  CHECK_THROWS_WITH(planner.place(bad), Catch::Matchers::Contains("blocks.0 has options 0 to"));
  remove_checkpointing(g.model);
}

namespace {

// Op times by a cost model in place of the clock: the tiny model's ops take a few microseconds,
// timing noise reorders them, and sanitizers slow remat's own loops (norms, GELU) but not
// OpenBLAS's matrix products, so that a linear can time cheaper than a layer norm. A matrix
// product's output element costs 2 x K flops at 10 GFLOP/s (K: the contracted length), attention's
// 4 x T_k x head dim, a view's nothing, any other op's 1 ns.
void model_op_times(const Tensor& loss) {
  for (const TapeNode& at : tape_of(loss)) {
    Node& node = *at.graph->nodes[at.index];
    const auto dims = [&](size_t input) { return at.graph->values[node.inputs[input]].shape; };
    double ns_per_element = 1.0;
    switch (node.kind()) {
      case OpKind::linear: case OpKind::matmul:
        ns_per_element = 2.0 * static_cast<double>(dims(0).back()) / 10.0;
        break;
      case OpKind::attention: {
        const Shape k = dims(1);
        ns_per_element = 4.0 * static_cast<double>(k[k.size() - 2] * k.back()) / 10.0;
        break;
      }
      case OpKind::reshape: case OpKind::permute: case OpKind::slice: case OpKind::expand: case OpKind::split:
        ns_per_element = 0;
        break;
      default: break;
    }
    int64_t elements = 0;
    for (int64_t v : node.outputs) elements += numel_of(at.graph->values[v].shape);
    node.forward_us = static_cast<float>(ns_per_element * static_cast<double>(elements) / 1000.0);
  }
}

}  // namespace

TEST_CASE("the budget planner chooses op by op what each block recomputes, cheap ops first", "[planner][budget]") {
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  bool partial = false;  // some block recomputes some of its ops, not all
  // Blocks with an option that frees memory re-running nothing but layer norms and GELU (no matrix
  // product).
  int cheap_only_blocks = 0, blocks = 0;
  for (double percent : {90.0, 75.0, 60.0, 45.0, 30.0}) {
    BudgetPlanner planner(g.model, 0, percent);
    const BudgetPlan& plan = planner.plan([&] {
      Tensor loss = g.loss();
      model_op_times(loss);
      return loss;
    });
    INFO(percent << "%: " << plan.to_string());
    for (const PlannedBlock& b : plan.blocks) {
      REQUIRE(b.options.size() >= 3);  // keep, all, and something in between
      CHECK(b.options[0].name == "keep");
      CHECK(b.options[0].kept_bytes == b.saved_bytes);
      CHECK(b.options[0].forward_peak_bytes == b.forward_peak_bytes);
      for (size_t i = 1; i < b.options.size(); ++i) {
        const BlockOption& o = b.options[i];
        CHECK(o.kept_bytes < b.saved_bytes);  // every option saves memory while kept
        for (size_t j = 1; j < b.options.size(); ++j)  // and none beats another in everything
          if (j != i)
            CHECK_FALSE((b.options[j].kept_bytes <= o.kept_bytes &&
                         b.options[j].kept_bytes + b.options[j].rebuilt_bytes <= o.kept_bytes + o.rebuilt_bytes &&
                         b.options[j].forward_peak_bytes + b.options[j].extra_forward_bytes <=
                             o.forward_peak_bytes + o.extra_forward_bytes &&
                         b.options[j].recompute_ms <= o.recompute_ms));
        // Dropping saved values can only lower the block's forward working set.
        CHECK(o.forward_peak_bytes <= b.forward_peak_bytes);
      }
      CHECK(b.checkpointed == (b.choice != 0));
      if (b.checkpointed && b.options[static_cast<size_t>(b.choice)].name != "all") partial = true;
      // Options by what they drop: replay re-runs only dropped ops.
      bool norms_and_gelu_only = false;
      for (size_t i = 1; i < b.options.size(); ++i) {
        const BlockOption& o = b.options[i];
        REQUIRE(o.reruns.size() == o.recompute.size());
        for (size_t k = 0; k < o.reruns.size(); ++k) CHECK((!o.reruns[k] || o.recompute[k]));
        const std::string kinds = o.name.substr(o.name.find(": ") + 2);
        if (o.name != "all" && (kinds == "layer_norm" || kinds == "gelu" || kinds == "layer_norm, gelu" ||
                                kinds == "gelu, layer_norm"))
          norms_and_gelu_only = true;
      }
      cheap_only_blocks += norms_and_gelu_only;
      ++blocks;
    }
    CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
    reset_checkpoint_counters();
    int64_t measured = g.step_peak();
    CHECK(measured <= plan.predicted_peak_bytes);
    CHECK(checkpoint_counters().replays > 0);
    CHECK(checkpoint_counters().bytes_dropped > 0);
    CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
  }
  CHECK(partial);
  CHECK(cheap_only_blocks == blocks);
  // A policy by position: what the planner places.
  Policy p = position_policy({true, false, true}, "test");
  PolicyContext ctx;
  ctx.position = 0;
  CHECK(p.decide(ctx) == Decision::prefer_recompute);
  ctx.position = 1;
  CHECK(p.decide(ctx) == Decision::must_save);
  ctx.position = 7;  // past the recorded ops: saved
  CHECK(p.decide(ctx) == Decision::must_save);
  remove_checkpointing(g.model);
}

TEST_CASE("the planner retimes its ops from a step under the plan and chooses again, gradients still exact",
          "[planner][budget]") {
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  for (Tensor& p : g.model.parameters()) p.zero_grad();
  BudgetPlanner planner(g.model, 0, 50);
  const BudgetPlan& plan = planner.plan([&] { return g.loss(); });
  CHECK_FALSE(plan.retimed);
  // Pin each block's costliest option: the search with any op times finds a cheaper plan.
  std::vector<int> everything;
  for (const PlannedBlock& b : plan.blocks) {
    size_t costliest = 1;
    for (size_t i = 1; i < b.options.size(); ++i)
      if (b.options[i].recompute_ms > b.options[costliest].recompute_ms) costliest = i;
    everything.push_back(static_cast<int>(costliest));
  }
  planner.place(everything);
  REQUIRE(plan.predicted_peak_bytes <= plan.budget_bytes);  // the least recompute fits, so this does

  for (Tensor& p : g.model.parameters()) p.zero_grad();
  Tensor loss = g.loss();
  backward(loss);
  CHECK(planner.retime(loss));  // a different choice, placed
  CHECK(plan.retimed);
  // Each option's time is the sum of what that step measured for the ops its replay re-runs.
  const std::vector<TapeNode> tape = tape_of(loss);
  double chosen_ms = 0;
  for (const PlannedBlock& b : plan.blocks) {
    REQUIRE(b.tape_positions.size() == b.options[1].reruns.size());
    for (size_t i = 1; i < b.options.size(); ++i) {
      double ms = 0;
      for (size_t k = 0; k < b.tape_positions.size(); ++k)
        if (b.options[i].reruns[k])
          ms += tape[b.tape_positions[k]].graph->nodes[tape[b.tape_positions[k]].index]->forward_us / 1000.0;
      CHECK(b.options[i].recompute_ms == ms);
    }
    chosen_ms += b.options[static_cast<size_t>(b.choice)].recompute_ms;
  }
  CHECK(plan.predicted_recompute_ms == chosen_ms);
  OptionChoice best = choose_options(plan.blocks, plan.step, plan.budget_bytes);
  CHECK(best.cost_ms == plan.predicted_recompute_ms);
  std::vector<int> now;
  for (const PlannedBlock& b : plan.blocks) now.push_back(b.choice);
  CHECK(now != everything);
  CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
  CHECK_FALSE(planner.retime(loss));  // once
  loss = Tensor();

  // The new choice runs: within the budget, replaying, and the same bits as no checkpointing.
  for (Tensor& p : g.model.parameters()) p.zero_grad();
  reset_peak_memory();
  int64_t base = memory_stats()[MemoryCategory::activation].current;
  reset_checkpoint_counters();
  backward(g.loss());
  CHECK(memory_stats()[MemoryCategory::activation].peak - base <= plan.budget_bytes);
  CHECK(checkpoint_counters().replays > 0);
  CHECK(checkpoint_counters().bytes_dropped > 0);
  CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);

  // observe() retimes on the first step it sees; a tape of another shape is not retimed from.
  for (Tensor& p : g.model.parameters()) p.zero_grad();
  BudgetPlanner observed(g.model, 0, 50);
  observed.plan([&] { return g.loss(); });
  Tensor other = g.model.loss(slice(g.idx, 1, 0, 8), slice(g.targets, 1, 0, 8));
  backward(other);
  CHECK_FALSE(observed.retime(other));
  CHECK_FALSE(observed.current().retimed);
  loss = g.loss();
  backward(loss);
  CHECK(observed.observe(loss, 0, 0));
  CHECK(observed.current().retimed);
  remove_checkpointing(g.model);
}

TEST_CASE("the planner's search is exact: it matches every choice enumerated", "[planner][budget]") {
  // Random blocks with four options each (keep and three others, half of the instances with options
  // that offload), six blocks: 4^6 choices.
  std::mt19937_64 rng(5);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int instance = 0; instance < 30; ++instance) {
    std::vector<PlannedBlock> blocks(6);
    for (PlannedBlock& b : blocks) {
      b.saved_bytes = uniform(50, 100);
      b.alive_before_bytes = uniform(0, 20);
      b.forward_peak_bytes = uniform(10, 120);
      BlockOption keep;
      keep.name = "keep";
      keep.kept_bytes = b.saved_bytes;
      keep.forward_peak_bytes = b.forward_peak_bytes;
      b.options.push_back(keep);
      for (int k = 0; k < 3; ++k) {
        BlockOption o;
        o.name = "o";
        o.recompute = {true};
        o.kept_bytes = uniform(1, b.saved_bytes - 1);
        o.rebuilt_bytes = uniform(0, 100);
        o.recompute_ms = static_cast<double>(uniform(1, 50));
        o.forward_peak_bytes = uniform(0, b.forward_peak_bytes);
        if (instance % 2 == 1 && uniform(0, 1) == 1) {
          o.offload = {true};
          o.offloaded_bytes = uniform(1, 60);
          o.in_flight_bytes = uniform(1, o.offloaded_bytes);
          o.prefetch_bytes = uniform(o.in_flight_bytes, o.offloaded_bytes);
          o.transfer_ms = static_cast<double>(uniform(0, 5));
        }
        b.options.push_back(o);
      }
    }
    StepMemory other{uniform(0, 100), uniform(0, 30), 0};
    int64_t saved = 0;
    for (const PlannedBlock& b : blocks) saved += b.saved_bytes;
    other.after_blocks_peak = saved + uniform(0, 80);
    int64_t floor = floor_peak(blocks, other);
    for (int64_t budget : {floor - 1, floor, floor + 40, floor + 120, int64_t{900}}) {
      OptionChoice choice = choose_options(blocks, other, budget);
      double best = -1;
      int64_t least = -1;
      std::vector<PlannedBlock> trial = blocks;
      for (int code = 0; code < 4096; ++code) {
        double cost = 0;
        for (int i = 0, c = code; i < 6; ++i, c /= 4) {
          trial[i].choice = c % 4;
          cost += trial[i].options[c % 4].cost_ms();
        }
        int64_t peak = simulate_peak(trial, other);
        if (least < 0 || peak < least) least = peak;
        if (peak <= budget && (best < 0 || cost < best)) best = cost;
      }
      INFO("instance " << instance << ", budget " << budget);
      CHECK(floor == least);
      REQUIRE(choice.fits == (best >= 0));
      if (choice.fits) {
        CHECK(choice.cost_ms == best);
        std::vector<PlannedBlock> chosen = blocks;
        for (size_t i = 0; i < chosen.size(); ++i) chosen[i].choice = choice.choice[i];
        CHECK(simulate_peak(chosen, other) <= budget);
      }
    }
  }
}

namespace {

// `n` hand-built blocks, each saving 10 bytes with 1 alive at its start, with two options: keep
// (10 kept, a forward working set of 12) and `other`.
std::vector<PlannedBlock> blocks_keeping_or(size_t n, const BlockOption& other) {
  std::vector<PlannedBlock> blocks(n);
  for (size_t i = 0; i < blocks.size(); ++i) {
    PlannedBlock& b = blocks[i];
    b.name = "blocks." + std::to_string(i);
    b.saved_bytes = 10;
    b.alive_before_bytes = 1;
    BlockOption keep;
    keep.name = "keep", keep.kept_bytes = 10, keep.forward_peak_bytes = 12;
    b.options = {keep, other};
  }
  return blocks;
}

}  // namespace

TEST_CASE("the plan names the term of the simulation where its peak lies", "[planner][budget]") {
  // Two blocks: keep or recompute (2 kept, a forward working set of 11, `rebuilt` held by the replay).
  auto blocks_with = [](int64_t rebuilt) {
    BlockOption drop;
    drop.name = "drop", drop.recompute = {true}, drop.kept_bytes = 2, drop.rebuilt_bytes = rebuilt;
    drop.forward_peak_bytes = 11;
    return blocks_keeping_or(2, drop);
  };
  // 3 before the blocks, 1 saved before them, the head 5 above what the blocks save.
  const StepMemory step{3, 1, 0, 25};
  struct Case {
    int first, second;
    int64_t rebuilt, bytes;
    std::string where;
  };
  for (const Case& c : std::vector<Case>{{0, 0, 8, 25, "the head, the loss and backward"},  // 5 + 10 + 10
                                         {1, 0, 8, 17, "the head, the loss and backward"},  // 5 + 2 + 10
                                         {0, 1, 8, 22, "blocks.1's forward"},               // 10 + 1 + 11
                                         {1, 1, 20, 25, "blocks.1's replay"},               // 1 + 2 + 2 + 20
                                         {1, 0, 30, 33, "blocks.0's replay"}}) {            // 1 + 0 + 2 + 30
    std::vector<PlannedBlock> blocks = blocks_with(c.rebuilt);
    blocks[0].choice = c.first, blocks[1].choice = c.second;
    const SimulatedPeak peak = locate_peak(blocks, step);
    INFO("choice " << c.first << c.second << ", rebuilt " << c.rebuilt);
    CHECK(peak.bytes == c.bytes);
    CHECK(peak.where == c.where);
    CHECK(simulate_peak(blocks, step) == peak.bytes);
  }
  // Below everything the blocks do: the peak before them.
  std::vector<PlannedBlock> blocks = blocks_with(0);
  blocks[0].choice = blocks[1].choice = 1;
  const SimulatedPeak early = locate_peak(blocks, StepMemory{40, 1, 0, 25});
  CHECK(early.bytes == 40);
  CHECK(early.where == "before the blocks");
}

TEST_CASE("the simulation counts what offloading holds on the device: a copy in flight, copies back in backward",
          "[planner][budget][offload]") {
  // Three blocks, each: keep or offload (2 kept, 8 to host, largest tensor 5, its backward's copies
  // back at most 6 at once, a forward working set of 11).
  BlockOption offload;
  offload.name = "offload", offload.offload = {true}, offload.recompute = {false};
  offload.kept_bytes = 2, offload.forward_peak_bytes = 11, offload.offloaded_bytes = 8;
  offload.in_flight_bytes = 5, offload.prefetch_bytes = 6, offload.transfer_ms = 1;
  std::vector<PlannedBlock> blocks = blocks_keeping_or(3, offload);
  const StepMemory step{3, 1, 0, 35};  // the head 5 above what the blocks save
  auto at = [&](std::vector<int> choice) {
    for (size_t i = 0; i < blocks.size(); ++i) blocks[i].choice = choice[i];
    return locate_peak(blocks, step);
  };
  // Nothing offloaded: the measured peak after the blocks.
  CHECK(at({0, 0, 0}).bytes == 35);
  // blocks.0 offloads: its forward 1 + 11 and its copy in flight (5) = 17; its backward 1 saved
  // before the blocks, 2 kept, 6 back = 9; blocks.1's forward 2 + 1 + 12 and blocks.0's copy, which
  // may still be in flight (5) = 20; the head 5 + 22 kept, and blocks.0's copies back (6) = 33.
  SimulatedPeak p = at({1, 0, 0});
  CHECK(p.bytes == 33);
  CHECK(p.where == "the head, the loss and backward");
  // Where a block's copies back hold less than its largest tensor, the head counts that tensor: the
  // copy forward may still have in flight until backward starts.
  std::vector<PlannedBlock> small_window = blocks;
  for (PlannedBlock& b : small_window) b.options[1].prefetch_bytes = 2;
  p = locate_peak(small_window, step);
  CHECK(p.bytes == 32);  // 5 + 22 + 5
  CHECK(p.where == "the head, the loss and backward");
  // With the head at what the blocks save, blocks.2's forward leads: 12 + 1 + 12 and the copy
  // blocks.0 may still have in flight, as nothing since waited for it.
  p = locate_peak(blocks, StepMemory{3, 1, 0, 30});
  CHECK(p.bytes == 30);
  CHECK(p.where == "blocks.2's forward");
  // blocks.2 offloads too: its forward 12 + 1 + 11 + 5 = 29; its backward 1 + 12 + 2 + 6 and
  // blocks.1's window (0) = 21; the head 5 + 14 + 6 = 25.
  p = at({1, 0, 1});
  CHECK(p.bytes == 29);
  CHECK(p.where == "blocks.2's forward");
  // All three offload: blocks.2's forward 4 + 1 + 11 + 5 = 21 is the largest term; its backward
  // sees blocks.1's copies prefetched: 1 + 4 + 2 + 6 + 6 = 19.
  p = at({1, 1, 1});
  CHECK(p.bytes == 21);
  CHECK(p.where == "blocks.2's forward");
  CHECK(floor_peak(blocks, step) == 21);
  // The search pays the transfer: with room for one offload (blocks.0's or blocks.1's: blocks.2's
  // forward would hold 37), one; no choice fits below the floor.
  OptionChoice one = choose_options(blocks, step, 34);
  REQUIRE(one.fits);
  CHECK(one.cost_ms == 1);
  CHECK(std::count(one.choice.begin(), one.choice.end(), 1) == 1);
  CHECK(one.choice[2] == 0);
  CHECK(choose_options(blocks, step, 21).cost_ms == 3);
  CHECK_FALSE(choose_options(blocks, step, 20).fits);
}

TEST_CASE("on the cpu the planner never offloads, and REMAT_OFFLOAD takes 0 or 1", "[planner][budget][offload]") {
  TinyGpt g;
  BudgetPlanner planner(g.model, 0, 30);
  const BudgetPlan& plan = planner.plan([&] { return g.loss(); });
  CHECK(plan.offload_gbps == 0);
  CHECK(plan.predicted_offloaded_bytes == 0);
  for (const PlannedBlock& b : plan.blocks)
    for (const BlockOption& o : b.options) CHECK((o.offload.empty() && o.offloaded_bytes == 0 && o.transfer_ms == 0));
  remove_checkpointing(g.model);
  ::setenv("REMAT_OFFLOAD", "yes", 1);
  CHECK_THROWS_WITH(BudgetPlanner(g.model, 0, 30), Catch::Matchers::Contains("REMAT_OFFLOAD: expected 0") &&
                                                       Catch::Matchers::Contains("got 'yes'"));
  ::setenv("REMAT_OFFLOAD", "0", 1);
  CHECK_NOTHROW(BudgetPlanner(g.model, 0, 30));
  ::unsetenv("REMAT_OFFLOAD");
  CHECK(offload_exposed_ms(0, 1, 10) == 0);
  CHECK(offload_exposed_ms(50'000'000, 1, 10) == Approx(4 + 3));  // 5 ms each way, 1 and 2 ms hidden
  CHECK(offload_exposed_ms(50'000'000, 5, 10) == 0);
  CHECK_THROWS_WITH(offload_exposed_ms(1, 1, 0), Catch::Matchers::Contains("positive bandwidth"));
}

TEST_CASE("a budget covers the activations or every byte, in bytes with units or as a percentage",
          "[planner][budget]") {
  PolicySpec a = parse_policy("budget:act:50%");
  CHECK(a.budget_scope == BudgetScope::activations);
  CHECK(a.budget_percent == 50);
  PolicySpec t = parse_policy("budget:total:8GiB");
  CHECK(t.budget_scope == BudgetScope::total);
  CHECK(t.budget_bytes == int64_t{8} << 30);
  CHECK(parse_policy("budget:1.5MiB").budget_bytes == 1572864);
  CHECK(parse_policy("budget:2G").budget_bytes == 2000000000);
  CHECK(parse_policy("budget:123").budget_scope == BudgetScope::activations);
  for (const char* bad : {"budget:total:", "budget:act:0%", "budget:total:1.5", "budget:3Q", "budget:all:5%", "budget:5GiBs"})
    CHECK_THROWS_WITH(parse_policy(bad), Catch::Matchers::Contains("expected budget:[act:|total:]<bytes>"));

  // A total budget: what the step holds besides activations comes off it first, and the whole
  // step's peak (parameters and gradients included) stays within it.
  TinyGpt g;
  auto plain = run_grads(g.model.parameters(), [&] { return g.loss(); });
  for (Tensor& p : g.model.parameters()) p.zero_grad();
  BudgetPlanner probe(g.model, 0, 100, BudgetScope::total);
  const BudgetPlan& probed = probe.plan([&] { return g.loss(); });
  int64_t none_total = probed.none_total_peak_bytes, floor_total = probed.floor_bytes + probed.fixed_bytes;
  REQUIRE(floor_total < none_total);
  // Two budgets between the floor and no checkpointing (tiny: parameters and gradients are most
  // of the peak, so the floor lies within a few percent of it).
  for (double third : {2.0, 1.0}) {
    double percent = 100.0 * (static_cast<double>(floor_total) + third * static_cast<double>(none_total - floor_total) / 3.0) /
                     static_cast<double>(none_total);
    for (Tensor& p : g.model.parameters()) p.zero_grad();
    BudgetPlanner planner(g.model, 0, percent, BudgetScope::total);
    const BudgetPlan& plan = planner.plan([&] { return g.loss(); });
    INFO(percent << "%: " << plan.to_string());
    CHECK(plan.total_budget_bytes == static_cast<int64_t>(static_cast<double>(none_total) * percent / 100));
    CHECK(plan.fixed_bytes > 0);
    CHECK(plan.budget_bytes == plan.total_budget_bytes - plan.fixed_bytes);
    CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
    for (Tensor& p : g.model.parameters()) p.zero_grad();
    reset_peak_memory();
    reset_checkpoint_counters();
    backward(g.loss());
    CHECK(checkpoint_counters().replays > 0);
    CHECK(memory_stats().total.peak <= plan.total_budget_bytes);
    CHECK(run_grads(g.model.parameters(), [&] { return g.loss(); }) == plain);
  }
  for (Tensor& p : g.model.parameters()) p.zero_grad();
  BudgetPlanner tight(g.model, 0, 20, BudgetScope::total);
  CHECK_THROWS_WITH(tight.plan([&] { return g.loss(); }),
                    Catch::Matchers::Contains("below the achievable floor of") &&
                        Catch::Matchers::Contains("bytes of parameters, gradients, optimizer state and workspace"));
  remove_checkpointing(g.model);
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
