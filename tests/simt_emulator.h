// A SIMT emulator for testing CUDA kernels on the CPU: each GPU thread of a block is a fiber on its
// own stack (an OS thread under the sanitizers), __syncthreads a barrier of the block, and the
// warp-wide operations (__shfl_xor_sync, the m16n8k16 bf16 tensor-core product) meet at a barrier
// of their warp, where every lane reads what the others put down. Blocks run one after another.
// Within a block one thread runs at a time, in a fixed order, until it reaches a barrier or ends (a
// cooperative scheduler, not the OS's): each phase between barriers runs thread by thread, the
// first block's from thread 0 up, the next one's from the last thread down, and so on. So a missing
// __syncthreads, which on a GPU is a race that shows now and then, fails here every time: a thread
// that reads a shared tile before the others have written it, or overwrites it while they still
// read, sees or leaves the wrong values. Threads that wait at different barriers (a barrier in
// divergent code) stop the launch with an error. Slow, exact in what it checks: indexing, tiling,
// masking, barriers, fragment layouts and the arithmetic they feed, for kernels written to compile
// under it (REMAT_SIMT_EMULATION: no launch syntax, and dynamic shared memory through
// REMAT_DYNAMIC_SHARED; kernels/cuda/*_kernels.cuh). A host compiler reads `__device__` and
// `__global__` as nothing; `__shared__` becomes `static` here (one array for the block, as blocks
// run one at a time). cp.async copies happen when a wait retires their group, so a tile read
// before its wait is stale. Not what it checks: timing, memory ordering beyond what barriers give
// (fences, the visibility of atomics), and the tensor core's own rounding (products here are summed
// in f32, in k order).
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
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

namespace remat_simt {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim3 t_thread, t_block;
inline Dim3 g_block_dim, g_grid_dim;

constexpr int kWarpSize = 32;

inline unsigned linear_thread();

// A barrier of `count` threads (the block's, or a warp's).
struct Meet {
  explicit Meet(int count) : count(count) {}
  int count;
  std::vector<int> waiting;
};

// Which thread of a block runs next: one at a time, a thread holding the turn until it reaches a
// barrier or ends, then the next runnable one in the block's order; when the last thread of a
// barrier arrives, its threads become runnable again and the order starts over. None runnable
// while some wait: a deadlock (threads at a barrier that the others never reach).
class TurnOrder {
 public:
  TurnOrder(int threads, bool reverse) : state_(threads, State::runnable) {
    for (int t = 0; t < threads; ++t) order_.push_back(reverse ? threads - 1 - t : t);
  }
  void block(Meet& meet, int me) {
    meet.waiting.push_back(me);
    state_[me] = State::blocked;
    if (static_cast<int>(meet.waiting.size()) == meet.count) {
      for (int t : meet.waiting) state_[t] = State::runnable;
      meet.waiting.clear();
      position_ = -1;  // the next phase runs in the block's order from its start
    }
  }
  void done(int me) { state_[me] = State::done; }
  // The thread to run next, or -1: then either all are done, or deadlocked() says they are stuck.
  int next() {
    const int n = static_cast<int>(order_.size());
    for (int k = 1; k <= n; ++k) {
      const int at = (position_ + k) % n;  // (position_ -1: from the order's start)
      if (state_[order_[at]] == State::runnable) {
        position_ = at;
        return order_[at];
      }
    }
    return -1;
  }
  bool deadlocked() const {
    return std::any_of(state_.begin(), state_.end(), [](State s) { return s == State::blocked; });
  }

 private:
  enum class State { runnable, blocked, done };
  std::vector<State> state_;
  std::vector<int> order_;
  int position_ = -1;
};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define REMAT_SIMT_OS_THREADS 1
#endif

#ifdef REMAT_SIMT_OS_THREADS
// Under the sanitizers (which do not follow stack switches) each GPU thread is an OS thread, and
// the turn passes between them through semaphores.
class Scheduler {
 public:
  Scheduler(int threads, bool reverse) : turns_(threads, reverse), go_(threads) {
    for (auto& g : go_) g = std::make_unique<std::counting_semaphore<>>(0);
  }
  void start() { pass_turn(); }
  void wait_turn(int me) {
    if (!stuck()) go_[me]->acquire();
  }
  void arrive(Meet& meet, int me) {
    {
      std::lock_guard lock(mutex_);
      if (stuck_) return;  // after a deadlock the threads run on unscheduled, to their end
      turns_.block(meet, me);
      pass_turn_locked();
    }
    wait_turn(me);
  }
  void finish(int me) {
    std::lock_guard lock(mutex_);
    turns_.done(me);
    if (!stuck_) pass_turn_locked();
  }
  bool stuck() {
    std::lock_guard lock(mutex_);
    return stuck_;
  }

 private:
  void pass_turn() {
    std::lock_guard lock(mutex_);
    pass_turn_locked();
  }
  void pass_turn_locked() {
    int next = turns_.next();
    if (next >= 0) {
      go_[next]->release();
    } else if (turns_.deadlocked()) {
      stuck_ = true;
      for (auto& g : go_) g->release();
    }
  }
  std::mutex mutex_;
  TurnOrder turns_;
  std::vector<std::unique_ptr<std::counting_semaphore<>>> go_;  // (counting: a deadlock releases all)
  bool stuck_ = false;
};
#else
// Elsewhere each GPU thread is a fiber (ucontext) on its own stack, and the launching thread
// switches between them: the same order, with no OS thread and no system scheduler in between.
class Scheduler {
 public:
  static constexpr size_t kStackBytes = 256 * 1024;

  Scheduler(int threads, bool reverse) : turns_(threads, reverse), fibers_(threads) {}
  // Runs every thread to its end or to a deadlock; `enter(t)` makes t the current thread's
  // identity before it runs, `body(t)` is its code.
  template <typename Enter, typename Body>
  void run(Enter enter, Body body) {
    const int n = static_cast<int>(fibers_.size());
    auto& stacks = stack_pool();
    while (static_cast<int>(stacks.size()) < n) stacks.push_back(Stack());
    Entry entry{this, [&](int t) { body(t); }};
    for (int t = 0; t < n; ++t) {
      getcontext(&fibers_[t]);
      fibers_[t].uc_stack.ss_sp = stacks[t].base;
      fibers_[t].uc_stack.ss_size = kStackBytes;
      fibers_[t].uc_link = &home_;
      // makecontext passes ints: the entry's address in two halves, and the thread.
      auto address = reinterpret_cast<uintptr_t>(&entry);
      makecontext(&fibers_[t], reinterpret_cast<void (*)()>(&Scheduler::fiber_main), 3,
                  static_cast<unsigned>(address >> 32), static_cast<unsigned>(address & 0xffffffffu), t);
    }
    for (int t = turns_.next(); t >= 0; t = turns_.next()) {
      enter(t);
      swapcontext(&home_, &fibers_[t]);
      if (failure_) std::rethrow_exception(failure_);
    }
    stuck_ = turns_.deadlocked();  // the stuck threads' stacks are abandoned with the block
  }
  void arrive(Meet& meet, int me) {
    turns_.block(meet, me);
    swapcontext(&fibers_[me], &home_);
  }
  bool stuck() const { return stuck_; }

 private:
  struct Entry {
    Scheduler* self;
    std::function<void(int)> body;
  };
  // A stack with a guard page below it, kept for later launches (only touched pages use memory).
  struct Stack {
    Stack() {
      const size_t page = 4096;
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("simt: no memory for a fiber stack");
      mprotect(p, page, PROT_NONE);  // a stack overflow faults instead of writing over a neighbour
      base = static_cast<char*>(p) + page;
    }
    char* base;
  };
  static std::vector<Stack>& stack_pool() {
    static std::vector<Stack> pool;  // never unmapped: reused by every launch
    return pool;
  }
  static void fiber_main(unsigned high, unsigned low, int t) {
    auto* entry = reinterpret_cast<Entry*>((static_cast<uintptr_t>(high) << 32) | low);
    try {
      entry->body(t);
    } catch (...) {
      entry->self->failure_ = std::current_exception();
    }
    entry->self->turns_.done(t);
  }  // returns to home_ (uc_link)

  TurnOrder turns_;
  std::vector<ucontext_t> fibers_;
  ucontext_t home_{};
  bool stuck_ = false;
  std::exception_ptr failure_;
};
#endif

// What the lanes of one warp exchange at their barrier.
struct Warp {
  explicit Warp(int lanes) : meet(lanes) {}
  Meet meet;
  uint64_t shuffled[kWarpSize];
  uint32_t a[kWarpSize][4], b[kWarpSize][2];
  const uint16_t* rows[kWarpSize];  // ldmatrix: each lane's row address
};

struct Block {
  Block(int threads, size_t dynamic_bytes, bool reverse)
      : scheduler(threads, reverse), sync(threads), dynamic(dynamic_bytes + 16), async(threads) {
    for (int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) {
      const int lanes = std::min(kWarpSize, threads - w * kWarpSize);
      warps.push_back(std::make_unique<Warp>(lanes));
    }
  }
  Scheduler scheduler;
  Meet sync;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic;
  // A lane's ldmatrix row address was not 16-byte aligned: reported by launch() once the block
  // ends (a lane cannot throw here: under AddressSanitizer lanes are OS threads).
  std::atomic<bool> misaligned_ldmatrix{false};
  // cp.async: each thread's copies not yet in a group, and its committed groups, oldest first. A
  // copy happens only when a wait retires its group, so a tile read before its wait reads what
  // was there before. A thread that ends with copies outstanding is reported by launch().
  struct AsyncCopy {
    void* to;
    const void* from;
    size_t bytes;
  };
  struct AsyncCopies {
    std::vector<AsyncCopy> open;
    std::deque<std::vector<AsyncCopy>> groups;
    bool idle() const { return open.empty() && groups.empty(); }
  };
  std::vector<AsyncCopies> async;
  std::atomic<bool> async_outstanding{false}, misaligned_cp_async{false};

  void meet(Meet& m) { scheduler.arrive(m, static_cast<int>(linear_thread())); }
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

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 for the warp: lanes 8 i .. 8 i + 7 give the
// addresses of matrix i's eight rows (16 bytes each, 16-byte aligned); register i of lane (g, c)
// (lane = 4 g + c) gets row g, columns 2c and 2c + 1 of matrix i, or with .trans column g, rows 2c
// and 2c + 1 (the lower index in the low half), as the PTX ISA lays them out: the fragments of
// mma.m16n8k16.
inline void ldmatrix(uint32_t* regs, int matrices, const void* row_address, bool trans) {
  Warp& w = my_warp();
  const int lane = my_lane();
  w.rows[lane] = static_cast<const uint16_t*>(row_address);
  g_block->meet(w.meet);
  bool any_misaligned = false;
  for (int l = 0; l < 8 * matrices; ++l) any_misaligned |= reinterpret_cast<uintptr_t>(w.rows[l]) % 16 != 0;
  if (any_misaligned) g_block->misaligned_ldmatrix = true;
  const int g = lane / 4, c = lane % 4;
  for (int i = 0; i < matrices; ++i) regs[i] = 0;  // what a refused load leaves (the launch then throws)
  for (int i = 0; i < matrices && !any_misaligned; ++i) {
    const uint16_t* const* rows = &w.rows[8 * i];
    const uint16_t lo = trans ? rows[2 * c][g] : rows[g][2 * c], hi = trans ? rows[2 * c + 1][g] : rows[g][2 * c + 1];
    regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  g_block->meet(w.meet);
}

// cp.async.{ca,cg}.shared.global of `bytes` (4, 8 or 16, both addresses aligned to them): joins the
// thread's open group; cp.async.commit_group closes it; cp.async.wait_group n copies the thread's
// groups but its n newest, oldest first.
inline void cp_async(void* to, const void* from, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(to) % bytes != 0 || reinterpret_cast<uintptr_t>(from) % bytes != 0) {
    g_block->misaligned_cp_async = true;  // reported by launch() (a lane cannot throw: see Block)
    return;
  }
  g_block->async[linear_thread()].open.push_back({to, from, bytes});
}
inline void cp_async_commit() {
  Block::AsyncCopies& mine = g_block->async[linear_thread()];
  mine.groups.push_back(std::move(mine.open));
  mine.open.clear();
}
inline void cp_async_wait(int newest_pending) {
  Block::AsyncCopies& mine = g_block->async[linear_thread()];
  while (static_cast<int>(mine.groups.size()) > newest_pending) {
    for (const Block::AsyncCopy& c : mine.groups.front()) std::memcpy(c.to, c.from, c.bytes);
    mine.groups.pop_front();
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
      auto identity = [&](int t) {
        t_thread = {static_cast<unsigned>(t) % g_block_dim.x, static_cast<unsigned>(t) / g_block_dim.x, 0};
        t_block = {bx, by, 0};
      };
#ifdef REMAT_SIMT_OS_THREADS
      std::vector<std::thread> lanes;
      for (int t = 0; t < threads; ++t)
        lanes.emplace_back([&, t] {
          identity(t);
          block.scheduler.wait_turn(t);
          kernel();
          if (!block.async[t].idle()) block.async_outstanding = true;
          block.scheduler.finish(t);
        });
      block.scheduler.start();
      for (std::thread& l : lanes) l.join();
#else
      block.scheduler.run(identity, [&](int t) {
        kernel();
        if (!block.async[t].idle()) block.async_outstanding = true;
      });
#endif
      g_block = nullptr;
      if (block.misaligned_ldmatrix)
        throw std::runtime_error("simt: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                 "): ldmatrix: a row address not 16-byte aligned");
      if (block.misaligned_cp_async)
        throw std::runtime_error("simt: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                 "): cp.async: an address not aligned to the copy's size");
      if (block.async_outstanding)
        throw std::runtime_error("simt: block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                 "): a thread ended with cp.async copies not waited for");
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
// Additions never merged into an FMA: the host compiler contracts nothing in the emulated build.
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) {
  std::atomic_ref<unsigned> at(*address);
  at.compare_exchange_strong(compare, value);
  return compare;  // the old value, as CUDA's
}
