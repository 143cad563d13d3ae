// sqrt and revolve chain schedules, and running or placing them.
#include "checkpoint/schedule.h"

#include <cmath>
#include <limits>
#include <memory>

#include "autograd/module.h"

namespace remat {

namespace {

int64_t binomial(int64_t n, int64_t k) {
  if (k < 0 || k > n) return 0;
  int64_t r = 1;
  for (int64_t i = 1; i <= k; ++i) r = r * (n - k + i) / i;
  return r;
}

// F(n, s) and the split achieving it, for n <= blocks and s <= slots.
struct RevolveTable {
  std::vector<std::vector<int64_t>> cost;
  std::vector<std::vector<int>> split;
};

RevolveTable revolve_table(int blocks, int slots) {
  const int64_t inf = std::numeric_limits<int64_t>::max() / 4;
  RevolveTable t;
  t.cost.assign(blocks + 1, std::vector<int64_t>(slots + 1, inf));
  t.split.assign(blocks + 1, std::vector<int>(slots + 1, 0));
  for (int s = 0; s <= slots; ++s) t.cost[1][s] = 0;
  for (int n = 2; n <= blocks; ++n)
    for (int s = 1; s <= slots; ++s)
      for (int m = 1; m < n; ++m) {
        int64_t c = m + t.cost[n - m][s - 1] + t.cost[m][s];
        if (c < t.cost[n][s]) {
          t.cost[n][s] = c;
          t.split[n][s] = m;
        }
      }
  return t;
}

ChainSegment build_revolve(const RevolveTable& t, int begin, int n, int s) {
  ChainSegment seg{begin, begin + n, {}};
  if (n == 1) return seg;
  int m = t.split[n][s];
  seg.children.push_back(build_revolve(t, begin, m, s));
  seg.children.push_back(build_revolve(t, begin + m, n - m, s - 1));
  return seg;
}

Tensor run_segment(const std::vector<TensorFn>& fns, const ChainSegment& seg, const Tensor& x) {
  CheckpointOptions o;
  o.name = "chain[" + std::to_string(seg.begin) + "," + std::to_string(seg.end) + ")";
  CheckpointScope scope(o);
  Tensor h = x;
  if (seg.children.empty()) {
    for (int i = seg.begin; i < seg.end; ++i) h = fns[i](h);
  } else {
    for (const ChainSegment& child : seg.children) h = run_segment(fns, child, h);
  }
  return h;
}

// A span of blocks is one region: the first block's pre-hook opens it, the last block's post-hook
// closes it, and so does the post-hook of any block of the span whose forward throws (else the
// region would stay open for good). Scopes are kept per thread.
void place_segment(Module& container, const ChainSegment& seg) {
  const auto& blocks = container.children();
  uint64_t key = next_scope_key();
  CheckpointOptions o;
  o.name = container.type_name() + "[" + std::to_string(seg.begin) + "," + std::to_string(seg.end) + ")";
  for (int i = seg.begin; i < seg.end; ++i) {
    bool first = i == seg.begin, last = i == seg.end - 1;
    ForwardHook hook{"checkpoint_chain", nullptr, nullptr};
    if (first) hook.pre = [key, o](Module&) { thread_scopes(key).push_back(std::make_unique<CheckpointScope>(o)); };
    hook.post = [key, last](Module&, bool threw) {
      if (last || threw) close_thread_scope(key, threw);
    };
    blocks[i].second->add_forward_hook(std::move(hook));
  }
  for (const ChainSegment& child : seg.children) place_segment(container, child);
}

}  // namespace

ChainSchedule sqrt_schedule(int blocks) {
  REMAT_CHECK(blocks >= 1, "sqrt schedule: expected at least one block, got ", blocks);
  ChainSchedule sched;
  sched.name = "sqrt";
  sched.blocks = blocks;
  int span = std::max(1, static_cast<int>(std::lround(std::sqrt(static_cast<double>(blocks)))));
  for (int a = 0; a < blocks; a += span) {
    int b = std::min(blocks, a + span);
    sched.regions.push_back({a, b, {}});
    sched.replayed_blocks += b - a - 1;  // a flat region rebuilds the inputs of all but its first block
  }
  return sched;
}

ChainSchedule revolve_schedule(int blocks, int slots) {
  REMAT_CHECK(blocks >= 1, "revolve schedule: expected at least one block, got ", blocks);
  REMAT_CHECK(slots >= 1, "revolve schedule: expected at least one slot, got ", slots);
  REMAT_CHECK(blocks <= 4096, "revolve schedule: at most 4096 blocks, got ", blocks);
  RevolveTable t = revolve_table(blocks, slots);
  ChainSchedule sched;
  sched.name = "revolve:" + std::to_string(slots);
  sched.blocks = blocks;
  sched.regions.push_back(build_revolve(t, 0, blocks, slots));
  sched.replayed_blocks = t.cost[blocks][slots];
  return sched;
}

int64_t revolve_closed_form(int blocks, int slots) {
  int64_t r = 0;
  while (binomial(slots + r, slots) < blocks) ++r;
  return r * blocks - binomial(slots + r, slots + 1);
}

Tensor checkpoint_chain(const std::vector<TensorFn>& fns, const ChainSchedule& schedule, const Tensor& x) {
  REMAT_CHECK(static_cast<int>(fns.size()) == schedule.blocks, "checkpoint_chain: the schedule is for ",
              schedule.blocks, " blocks, got ", fns.size(), " functions");
  Tensor h = x;
  for (const ChainSegment& seg : schedule.regions) h = run_segment(fns, seg, h);
  return h;
}

void apply_chain_schedule(Module& container, const ChainSchedule& schedule) {
  REMAT_CHECK(static_cast<int>(container.children().size()) == schedule.blocks, "apply_chain_schedule: the schedule is for ",
              schedule.blocks, " blocks, the container has ", container.children().size());
  for (const ChainSegment& seg : schedule.regions) place_segment(container, seg);
}

}  // namespace remat
