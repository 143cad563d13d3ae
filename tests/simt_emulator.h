// A SIMT emulator for testing CUDA kernels on the CPU: each GPU thread of a block is an OS thread,
// __syncthreads a barrier of the block, and the warp-wide operations (__shfl_xor_sync, the
// m16n8k16 bf16 tensor-core product) meet at a barrier of their warp, where every lane reads what
// the others put down. Blocks run one after another. Within a block one thread runs at a time, in a
// fixed order, until it reaches a barrier or ends (a cooperative scheduler, not the OS's): each
// phase between barriers runs thread by thread, the first block's from thread 0 up, the next one's
// from the last thread down, and so on. So a missing __syncthreads, which on a GPU is a race that
// shows now and then, fails here every time: a thread that reads a shared tile before the others
// have written it, or overwrites it while they still read, sees or leaves the wrong values. Threads
// that wait at different barriers (a barrier in divergent code) stop the launch with an error.
// Slow, exact in what it checks: indexing, tiling, masking, barriers, fragment layouts and the
// arithmetic they feed, for kernels written to compile under it (REMAT_SIMT_EMULATION: no launch
// syntax, and dynamic shared memory through REMAT_DYNAMIC_SHARED; kernels/cuda/*_kernels.cuh). A
// host compiler reads `__device__` and `__global__` as nothing; `__shared__` becomes `static` here
// (one array for the block, as blocks run one at a time). Not what it checks: timing, memory
// ordering beyond what barriers give (fences, the visibility of atomics), and the tensor core's
// own rounding (products here are summed in f32, in k order).
#pragma once

#define REMAT_SIMT_EMULATION 1

// The toolkit's headers first, so that the built-ins defined below do not rename their declarations.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace remat_simt {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim3 t_thread, t_block;
inline Dim3 g_block_dim, g_grid_dim;

constexpr int kWarpSize = 32;

inline unsigned linear_thread();

// Runs the threads of a block one at a time: a thread holds the turn until it reaches a barrier or
// ends, then hands it to the next runnable thread in the block's order; when the last thread of a
// barrier arrives, its threads become runnable again and the order starts over.
class Scheduler {
 public:
  Scheduler(int threads, bool reverse) : go_(threads), state_(threads, State::runnable) {
    for (int t = 0; t < threads; ++t) {
      go_[t] = std::make_unique<std::counting_semaphore<>>(0);
      order_.push_back(reverse ? threads - 1 - t : t);
    }
  }

  // A barrier of `count` threads (the block's, or a warp's).
  struct Meet {
    explicit Meet(int count) : count(count) {}
    int count;
    std::vector<int> waiting;
  };

  void start() { pass_turn(); }
  void wait_turn(int me) {
    if (!stuck()) go_[me]->acquire();
  }

  void arrive(Meet& meet, int me) {
    {
      std::lock_guard lock(mutex_);
      if (stuck_) return;  // after a deadlock the threads run on unscheduled, to their end
      meet.waiting.push_back(me);
      state_[me] = State::blocked;
      if (static_cast<int>(meet.waiting.size()) == meet.count) {
        for (int t : meet.waiting) state_[t] = State::runnable;
        meet.waiting.clear();
        position_ = -1;  // the next phase runs in the block's order from its start
      }
      pass_turn_locked();
    }
    wait_turn(me);
  }

  void finish(int me) {
    std::lock_guard lock(mutex_);
    state_[me] = State::done;
    if (!stuck_) pass_turn_locked();
  }

  bool stuck() {
    std::lock_guard lock(mutex_);
    return stuck_;
  }

 private:
  enum class State { runnable, blocked, done };

  void pass_turn() {
    std::lock_guard lock(mutex_);
    pass_turn_locked();
  }

  // The next runnable thread after the current position (cyclically) gets the turn. None while
  // some wait at a barrier that the others will never reach: a deadlock, reported by launch().
  void pass_turn_locked() {
    const int n = static_cast<int>(order_.size());
    for (int k = 1; k <= n; ++k) {
      const int at = (position_ + k) % n;  // (position_ -1: from the order's start)
      if (state_[order_[at]] == State::runnable) {
        position_ = at;
        go_[order_[at]]->release();
        return;
      }
    }
    if (std::any_of(state_.begin(), state_.end(), [](State s) { return s == State::blocked; })) {
      stuck_ = true;
      for (auto& g : go_) g->release();
    }
  }

  std::mutex mutex_;
  std::vector<std::unique_ptr<std::counting_semaphore<>>> go_;  // (counting: a deadlock releases all)
  std::vector<State> state_;
  std::vector<int> order_;
  int position_ = -1;
  bool stuck_ = false;
};

// What the lanes of one warp exchange at their barrier.
struct Warp {
  explicit Warp(int lanes) : meet(lanes) {}
  Scheduler::Meet meet;
  uint64_t shuffled[kWarpSize];
  uint32_t a[kWarpSize][4], b[kWarpSize][2];
};

struct Block {
  Block(int threads, size_t dynamic_bytes, bool reverse)
      : scheduler(threads, reverse), sync(threads), dynamic(dynamic_bytes + 16) {
    for (int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
      const int lanes = std::min(kWarpSize, threads - w * kWarpSize);
      warps.push_back(std::make_unique<Warp>(lanes));
    }
  }
  Scheduler scheduler;
  Scheduler::Meet sync;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic;

  void meet(Scheduler::Meet& m) { scheduler.arrive(m, static_cast<int>(linear_thread())); }
};

inline Block* g_block = nullptr;

// Threads are numbered x fastest, then y, and go to warps of 32 in that order, as on a GPU.
inline unsigned linear_thread() { return t_thread.y * g_block_dim.x + t_thread.x; }
inline Warp& my_warp() { return *g_block->warps[linear_thread() / kWarpSize]; }
inline int my_lane() { return static_cast<int>(linear_thread() % kWarpSize); }

inline unsigned char* dynamic_shared() {
  auto p = reinterpret_cast<uintptr_t>(g_block->dynamic.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t{15});
}

// The value of lane source(lane) of the warp, for every lane at once.
template <typename V, typename Source>
V shuffle(V v, Source source) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  Warp& w = my_warp();
  std::memcpy(&w.shuffled[my_lane()], &v, sizeof v);
  g_block->meet(w.meet);
  V got;
  std::memcpy(&got, &w.shuffled[source(my_lane())], sizeof got);
  g_block->meet(w.meet);
  return got;
}

inline float bf16_at(uint32_t reg, int half) {
  uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  uint32_t f = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &f, sizeof out);
  return out;
}

// d += A B for the warp, A 16 x 16 and B 16 x 8 in bf16, from every lane's registers in the PTX
// layout of mma.m16n8k16 (lane = 4 g + c): A register r of lane (g, c) holds row g + 8 (r % 2),
// columns 2c + 8 (r / 2) and the next; B register r holds rows 2c + 8 r and the next, column g;
// d holds C[g][2c], C[g][2c + 1], C[g + 8][2c], C[g + 8][2c + 1].
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = my_warp();
  const int lane = my_lane();
  for (int r = 0; r < 4; ++r) w.a[lane][r] = a[r];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  g_block->meet(w.meet);
  float A[16][16], B[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, c = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r % 2)][2 * c + 8 * (r / 2) + h] = bf16_at(w.a[l][r], h);
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * c + 8 * r + h][g] = bf16_at(w.b[l][r], h);
  }
  g_block->meet(w.meet);
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * c + (e % 2);
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[e] = s;
  }
}

// Runs kernel() as a grid of blocks of block.x x block.y threads, one block at a time, each block's
// threads in turn (forward order for even blocks, reverse for odd ones). Throws when a block's
// threads wait at barriers that the others never reach.
inline void launch(Dim3 grid, Dim3 block_dim, size_t dynamic_bytes, const std::function<void()>& kernel) {
  const int threads = static_cast<int>(block_dim.x * std::max(block_dim.y, 1u));
  g_grid_dim = {grid.x, std::max(grid.y, 1u), 1};
  g_block_dim = {block_dim.x, std::max(block_dim.y, 1u), 1};
  for (unsigned by = 0; by < g_grid_dim.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block block(threads, dynamic_bytes, (by * grid.x + bx) % 2 == 1);
      g_block = &block;
      std::vector<std::thread> lanes;
      for (int t = 0; t < threads; ++t)
        lanes.emplace_back([&, t] {
          t_thread = {static_cast<unsigned>(t) % g_block_dim.x, static_cast<unsigned>(t) / g_block_dim.x, 0};
          t_block = {bx, by, 0};
          block.scheduler.wait_turn(t);
          kernel();
          block.scheduler.finish(t);
        });
      block.scheduler.start();
      for (std::thread& l : lanes) l.join();
      g_block = nullptr;
      if (block.scheduler.stuck())
        throw std::runtime_error("simt: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                 "): threads wait at a barrier the others never reach (a barrier in divergent code?)");
    }
}
inline void launch(Dim3 grid, int threads, size_t dynamic_bytes, const std::function<void()>& kernel) {
  launch(grid, Dim3{static_cast<unsigned>(threads), 1, 1}, dynamic_bytes, kernel);
}

}  // namespace remat_simt

// The CUDA built-ins the emulated kernels use.
#define threadIdx (::remat_simt::t_thread)
#define blockIdx (::remat_simt::t_block)
#define blockDim (::remat_simt::g_block_dim)
#define gridDim (::remat_simt::g_grid_dim)
#undef __shared__
#define __shared__ static
inline void __syncthreads() { ::remat_simt::g_block->meet(::remat_simt::g_block->sync); }
template <typename V>
V __shfl_xor_sync(unsigned /*mask*/, V v, int lane_mask) {
  return ::remat_simt::shuffle(v, [lane_mask](int lane) { return lane ^ lane_mask; });
}
template <typename V>
V __shfl_down_sync(unsigned /*mask*/, V v, unsigned delta) {  // lanes past the warp keep their own
  return ::remat_simt::shuffle(v, [delta](int lane) {
    return lane + static_cast<int>(delta) < ::remat_simt::kWarpSize ? lane + static_cast<int>(delta) : lane;
  });
}
inline float __expf(float x) { return std::exp(x); }
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) {
  std::atomic_ref<unsigned> at(*address);
  at.compare_exchange_strong(compare, value);
  return compare;  // the old value, as CUDA's
}
