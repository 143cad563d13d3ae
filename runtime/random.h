// The global random stream: a seed and an offset that every random op advances.
#pragma once

#include <cstdint>

namespace remat {

struct RngState {
  uint64_t seed = 0;
  uint64_t offset = 0;  // in Philox blocks of four 32-bit values
};

// The random stream is per thread. Each thread's stream starts, when the thread first draws, from
// the global seed and the thread's index: the first thread to draw (usually main) gets index 0 and
// exactly the global seed, others a seed derived from it, so threads never draw the same masks.
// Give threads their index (set_thread_rng_index) for streams that do not depend on which thread
// drew first.
void manual_seed(uint64_t seed);  // global seed := seed; this thread's stream := (derived seed, 0)
RngState rng_state();             // this thread's stream
void set_rng_state(RngState state);
void set_thread_rng_index(uint64_t index);  // this thread's index; restarts its stream from the global seed
uint64_t thread_rng_index();
// The seed of thread `index`'s stream under global seed `seed` (index 0: `seed` itself).
uint64_t thread_stream_seed(uint64_t seed, uint64_t index);
// Reserves the stream for `count` values and returns where it starts; random ops store this
// (seed, offset) pair as attributes so that replay draws the same numbers.
RngState next_rng(uint64_t count);

// Data parallel: while one is alive, this thread computes rows [begin, begin + rows) of a batch of
// `total` rows. A random op then draws, for its batch-major tensor of `rows` rows, the values the
// whole batch's tensor would have had in those rows, and the stream advances as it would for the
// whole batch: sample i sees the same dropout mask and noise whichever process computes it, and
// every process's stream stays where a single process's would be. A draw that is not a multiple of
// `rows`, or whose rows do not start on a Philox block (4 values), is refused with a clear error.
class RngBatchShardScope {
 public:
  RngBatchShardScope(int64_t begin, int64_t rows, int64_t total);
  ~RngBatchShardScope();
  RngBatchShardScope(const RngBatchShardScope&) = delete;
  RngBatchShardScope& operator=(const RngBatchShardScope&) = delete;

 private:
  int64_t saved_[3];
};

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
