// The global random stream: a seed and an offset that every random op advances.
#pragma once

#include <cstdint>

namespace remat {

struct RngState {
  uint64_t seed = 0;
  uint64_t offset = 0;  // in Philox blocks of four 32-bit values
};

void manual_seed(uint64_t seed);  // seed := seed, offset := 0
RngState rng_state();
void set_rng_state(RngState state);
// Reserves the stream for `count` values and returns where it starts; random ops store this
// (seed, offset) pair as attributes so that replay draws the same numbers.
RngState next_rng(uint64_t count);

// A private Philox stream (data generators): its own (seed, position), saved and restored with it.
class RandomStream {
 public:
  explicit RandomStream(uint64_t seed) : state_{seed, 0} {}
  uint32_t next_bits();
  float uniform();  // [0, 1), 24 random bits
  RngState state() const { return state_; }
  void set_state(RngState s) { state_ = s; }

 private:
  RngState state_;  // offset counts single draws here
};

}  // namespace remat
