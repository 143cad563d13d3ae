// Chain schedules for a sequence of N blocks: which consecutive spans become (nested) regions.
//   sqrt        spans of about sqrt(N) blocks, each one region
//   revolve:s   the binomial schedule (Griewank): a region over [a, a+n) splits at m into a region
//               over [a, a+m) and one over [a+m, a+n) with one snapshot fewer; m minimises the
//               block forwards F(n, s) = m + F(n-m, s-1) + F(m, s), F(1, s) = 0. At most s block
//               inputs beyond the chain's input are alive at once in backward.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint.h"

namespace remat {

class Module;

struct ChainSegment {
  int begin = 0, end = 0;  // blocks [begin, end)
  std::vector<ChainSegment> children;
};

struct ChainSchedule {
  std::string name;
  int blocks = 0;
  std::vector<ChainSegment> regions;  // top-level regions, in order
  int64_t replayed_blocks = 0;        // block forwards that backward will replay
};

ChainSchedule sqrt_schedule(int blocks);
ChainSchedule revolve_schedule(int blocks, int slots);
// Griewank's closed form for the optimal number of replayed forwards: with r the least integer
// such that n <= C(s + r, s), it is r n - C(s + r, s + 1).
int64_t revolve_closed_form(int blocks, int slots);

// Runs fns[0..N) on x with the schedule's regions.
Tensor checkpoint_chain(const std::vector<TensorFn>& fns, const ChainSchedule& schedule, const Tensor& x);
// Places the schedule's regions on the children of a block container with forward hooks
// (pre-hook of a span's first block opens its region, post-hook of its last block closes it).
void apply_chain_schedule(Module& container, const ChainSchedule& schedule);

}  // namespace remat
