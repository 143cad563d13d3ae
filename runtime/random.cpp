// The random streams: one per thread, each from the global seed and the thread's index.
#include "runtime/random.h"

#include <atomic>

#include "runtime/error.h"
#include "runtime/philox.h"

namespace remat {

namespace {

std::atomic<uint64_t> g_seed{0};
std::atomic<uint64_t> g_next_index{0};

struct ThreadStream {
  bool started = false;
  uint64_t index = 0;
  RngState state{};
};
thread_local ThreadStream t_stream;

// The batch shard of this thread (RngBatchShardScope); total 0: none.
struct BatchShard {
  int64_t begin = 0, rows = 0, total = 0;
};
thread_local BatchShard t_shard;

// This thread's stream, started from the global seed on first use.
ThreadStream& stream() {
  ThreadStream& s = t_stream;
  if (!s.started) {
    s.started = true;
    s.index = g_next_index.fetch_add(1);
    s.state = {thread_stream_seed(g_seed.load(), s.index), 0};
  }
  return s;
}

}  // namespace

uint64_t thread_stream_seed(uint64_t seed, uint64_t index) {
  if (index == 0) return seed;
  // splitmix64 of (seed, index): distinct seeds for distinct indices, far from each other.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void manual_seed(uint64_t seed) {
  g_seed.store(seed);
  ThreadStream& s = stream();
  s.state = {thread_stream_seed(seed, s.index), 0};
}

RngState rng_state() { return stream().state; }
void set_rng_state(RngState state) { stream().state = state; }

void set_thread_rng_index(uint64_t index) {
  ThreadStream& s = t_stream;
  s.started = true;
  s.index = index;
  s.state = {thread_stream_seed(g_seed.load(), index), 0};
}

uint64_t thread_rng_index() { return stream().index; }

RngState next_rng(uint64_t count) {
  ThreadStream& s = stream();
  RngState start = s.state;
  const BatchShard& shard = t_shard;
  if (shard.total == 0) {
    s.state.offset += (count + 3) / 4;
    return start;
  }
  const auto rows = static_cast<uint64_t>(shard.rows);
  REMAT_CHECK(count % rows == 0, "data parallel: a random op draws ", count, " values for this process's ", rows,
              " rows of the batch; expected a whole number per row (random draws inside a batch shard must be "
              "batch-major tensors of ", rows, " rows)");
  uint64_t per_row = count / rows, skip = per_row * static_cast<uint64_t>(shard.begin);
  REMAT_CHECK(skip % 4 == 0, "data parallel: rows ", shard.begin, ".. of a random draw of ", per_row,
              " values per row start at value ", skip, ", not on a Philox block of 4; choose a per-rank batch or "
              "shape for which rows x values per row is a multiple of 4");
  start.offset += skip / 4;
  s.state.offset += (per_row * static_cast<uint64_t>(shard.total) + 3) / 4;
  return start;
}

RngBatchShardScope::RngBatchShardScope(int64_t begin, int64_t rows, int64_t total)
    : saved_{t_shard.begin, t_shard.rows, t_shard.total} {
  REMAT_CHECK(rows >= 1 && begin >= 0 && begin + rows <= total, "RngBatchShardScope: expected rows [begin, begin + rows) ",
              "inside a batch of total rows, got begin ", begin, ", rows ", rows, ", total ", total);
  t_shard = {begin, rows, total};
}

RngBatchShardScope::~RngBatchShardScope() { t_shard = {saved_[0], saved_[1], saved_[2]}; }

uint32_t RandomStream::next_bits() {
  uint32_t bits = philox::bits_at(state_.seed, state_.offset / 4, state_.offset % 4);
  ++state_.offset;
  return bits;
}

float RandomStream::uniform() { return philox::uniform_from_bits(next_bits()); }

}  // namespace remat
