// The global random stream (per thread, so test threads do not interfere).
#include "runtime/random.h"

#include "kernels/common/philox.h"

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

uint32_t RandomStream::next_bits() {
  uint32_t bits = philox::bits_at(state_.seed, state_.offset / 4, state_.offset % 4);
  ++state_.offset;
  return bits;
}

float RandomStream::uniform() { return philox::uniform_from_bits(next_bits()); }

}  // namespace remat
