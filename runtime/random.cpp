// The random streams: one per thread, each from the global seed and the thread's index.
#include "runtime/random.h"

#include <atomic>

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
  s.state.offset += (count + 3) / 4;
  return start;
}

uint32_t RandomStream::next_bits() {
  uint32_t bits = philox::bits_at(state_.seed, state_.offset / 4, state_.offset % 4);
  ++state_.offset;
  return bits;
}

float RandomStream::uniform() { return philox::uniform_from_bits(next_bits()); }

}  // namespace remat
