// The global random stream (per thread, so test threads do not interfere).
#include "runtime/random.h"

namespace remat {

namespace {
thread_local RngState t_state{};
}

void manual_seed(uint64_t seed) { t_state = {seed, 0}; }
RngState rng_state() { return t_state; }
void set_rng_state(RngState state) { t_state = state; }

RngState next_rng(uint64_t count) {
  RngState start = t_state;
  t_state.offset += (count + 3) / 4;
  return start;
}

}  // namespace remat
