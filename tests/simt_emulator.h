// A SIMT emulator for testing CUDA kernels on the CPU: each GPU thread of a block is an OS thread,
// __syncthreads a barrier of the block, and the warp-wide operations (__shfl_xor_sync, the
// m16n8k16 bf16 tensor-core product) meet at a barrier of their warp, where every lane reads what
// the others put down. Blocks run one after another. Slow (thousands of context switches per
// block), exact in what it checks: indexing, tiling, masking, fragment layouts and the arithmetic
// they feed, for kernels written to compile under it (REMAT_SIMT_EMULATION: no launch syntax, and
// dynamic shared memory through REMAT_DYNAMIC_SHARED; kernels/cuda/attention_*_kernels.cuh). A host
// compiler reads `__device__` and `__global__` as nothing; `__shared__` becomes `static` here (one
// array for the block, as blocks run one at a time). Not what it checks: memory-model races,
// timing, and the tensor core's own rounding (products here are summed in f32, in k order).
#pragma once

#define REMAT_SIMT_EMULATION 1

// The toolkit's headers first, so that the built-ins defined below do not rename their declarations.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace remat_simt {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Dim3 t_thread, t_block;
inline Dim3 g_block_dim, g_grid_dim;

constexpr int kWarpSize = 32;

// What the lanes of one warp exchange at their barrier.
struct Warp {
  explicit Warp(int lanes) : meet(lanes) {}
  std::barrier<> meet;
  uint64_t shuffled[kWarpSize];
  uint32_t a[kWarpSize][4], b[kWarpSize][2];
};

struct Block {
  explicit Block(int threads, size_t dynamic_bytes) : sync(threads), dynamic(dynamic_bytes + 16) {
    for (int w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w) warps.push_back(std::make_unique<Warp>(kWarpSize));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic;
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
  w.meet.arrive_and_wait();
  V got;
  std::memcpy(&got, &w.shuffled[source(my_lane())], sizeof got);
  w.meet.arrive_and_wait();
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
  w.meet.arrive_and_wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, c = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r % 2)][2 * c + 8 * (r / 2) + h] = bf16_at(w.a[l][r], h);
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * c + 8 * r + h][g] = bf16_at(w.b[l][r], h);
  }
  w.meet.arrive_and_wait();
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * c + (e % 2);
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[e] = s;
  }
}

// Runs kernel() as a grid of blocks of block.x x block.y threads, one block at a time.
inline void launch(Dim3 grid, Dim3 block_dim, size_t dynamic_bytes, const std::function<void()>& kernel) {
  const int threads = static_cast<int>(block_dim.x * std::max(block_dim.y, 1u));
  g_grid_dim = {grid.x, std::max(grid.y, 1u), 1};
  g_block_dim = {block_dim.x, std::max(block_dim.y, 1u), 1};
  for (unsigned by = 0; by < g_grid_dim.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block block(threads, dynamic_bytes);
      g_block = &block;
      std::vector<std::thread> lanes;
      for (int t = 0; t < threads; ++t)
        lanes.emplace_back([&, t] {
          t_thread = {static_cast<unsigned>(t) % g_block_dim.x, static_cast<unsigned>(t) / g_block_dim.x, 0};
          t_block = {bx, by, 0};
          kernel();
        });
      for (std::thread& l : lanes) l.join();
      g_block = nullptr;
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
inline void __syncthreads() { ::remat_simt::g_block->sync.arrive_and_wait(); }
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
