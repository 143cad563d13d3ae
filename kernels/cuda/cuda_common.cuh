// Device helpers shared by the CUDA kernels: dtype dispatch, accumulation types, launch shapes and
// deterministic block reductions (fixed order for a fixed block size, so replays reproduce bits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../backend.h"
#include "../../runtime/half.h"
#include "../../runtime/cuda/cuda_check.h"
#include "../../runtime/cuda/launch.h"

namespace remat {
// bf16 tensors hand out __nv_bfloat16 pointers to device code.
template <> struct dtype_of<__nv_bfloat16> { static constexpr DType value = DType::bf16; };
}  // namespace remat

namespace remat::cuda {

using bf16 = __nv_bfloat16;

// Accumulation type: bf16 and f32 accumulate in f32, f64 in f64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

template <typename T> __device__ __forceinline__ Acc<T> load(const T* p, int64_t i) { return static_cast<Acc<T>>(p[i]); }
template <> __device__ __forceinline__ float load<bf16>(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
template <typename T> __device__ __forceinline__ T cast_to(Acc<T> v) { return static_cast<T>(v); }
// To bf16 as the CPU rounds (runtime/half.h), NaN included: the hardware's conversion gives every
// NaN as 0x7fff, where the CPU keeps its sign and top payload bits (found under the SIMT emulator).
template <> __device__ __forceinline__ bf16 cast_to<bf16>(float v) {
  return v != v ? __ushort_as_bfloat16(f32_to_bf16(v)) : __float2bfloat16(v);
}

// a + b, never merged with a product before it into an FMA (which rounds once where unfused ops
// round the product, store it, and round the sum): a kernel that adds what another would have
// stored first (dropout_add, a gradient added into its partial sum).
__device__ __forceinline__ float add_uncontracted(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_uncontracted(double a, double b) { return __dadd_rn(a, b); }

// Runs f.template operator()<T>() for T = float, double or bf16.
template <typename F>
decltype(auto) dispatch(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32: return f.template operator()<float>();
    case DType::f64: return f.template operator()<double>();
    case DType::bf16: return f.template operator()<bf16>();
    default: REMAT_FAIL(op, ": the cuda backend computes in f32, f64 or bf16, got ", dtype_name(dtype));
  }
}

inline constexpr int kThreads = 256;
// 1-D grid for a grid-stride loop over n elements.
inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65536 ? 65536 : b));
}

#define REMAT_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// A grid-stride loop over [first, n): the scalar tail after a kernel's packed part.
#define REMAT_GRID_STRIDE_FROM(i, first, n) \
  for (int64_t i = (first) + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Elementwise kernels over contiguous memory move kPack elements a thread per step in whole
// 16-byte words (one for bf16, two for f32) where every pointer is 16-byte aligned: a 2-byte load
// per thread leaves most of a memory transaction unused. Each element's arithmetic is unchanged:
// one operation per element (a copy, a cast, a product, dropout) gives the same bits either way; a
// function of several may round differently in its last bit, as the compiler may contract a * b + c
// into an FMA in one loop and not the other. Which path runs depends only on the tensors' layout
// (the caching allocator's blocks are aligned), so a replay repeats its forward's bits.
inline constexpr int kPack = 8;
template <typename T>
struct alignas(16) Pack {
  T v[kPack];
};
__host__ __device__ __forceinline__ bool aligned_for_pack(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;  // a null pointer (an unused input) passes
}
template <typename... P>
__host__ __device__ __forceinline__ bool packable(const P*... p) {
  return (aligned_for_pack(p) && ...);
}
// The elements a kernel takes in packs: all but the tail of fewer than kPack, or none.
__host__ __device__ __forceinline__ int64_t packed_elements(int64_t n, bool aligned) { return aligned ? n / kPack * kPack : 0; }
template <typename T> __device__ __forceinline__ Pack<T> load_pack(const T* p, int64_t pack) {
  return reinterpret_cast<const Pack<T>*>(p)[pack];
}
template <typename T> __device__ __forceinline__ void store_pack(T* p, int64_t pack, const Pack<T>& v) {
  reinterpret_cast<Pack<T>*>(p)[pack] = v;
}
// 1-D grid for a kernel that takes n elements kPack at a time.
inline unsigned blocks_for_packs(int64_t n) { return blocks_for((n + kPack - 1) / kPack); }

// Multi-tensor kernels (AdamW, clipping) grid-stride over their tensors' elements end to end; the
// tensor holding element e is the last whose start (ascending from start[0] = 0) is at or before
// e: an empty tensor shares its start with the next, which wins.
__host__ __device__ __forceinline__ int tensor_holding(const int64_t* start, int count, int64_t e) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (start[mid] <= e) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Checks the launch that just happened (configuration errors surface here, not later).
#define REMAT_CUDA_LAUNCH_CHECK() REMAT_CUDA_CHECK(cudaGetLastError())

struct SumOp {
  template <typename A> __device__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <typename A> __device__ A operator()(A a, A b) const { return b > a ? b : a; }
};

template <typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;  // valid in lane 0
}

// Reduces one value per thread over the block; every thread gets the result. blockDim.x must be
// a multiple of 32 and at most 1024; `scratch` holds 32 values. The tree is fixed, so the result
// depends only on the inputs and the block size.
template <typename A, typename Op>
__device__ A block_reduce(A v, Op op, A identity, A* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A w = lane < warps ? scratch[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  A result = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return result;
}

template <typename A> __device__ A block_sum(A v, A* scratch) { return block_reduce(v, SumOp{}, A(0), scratch); }
template <typename A> __device__ A block_max(A v, A* scratch) {
  return block_reduce(v, MaxOp{}, -std::numeric_limits<A>::infinity(), scratch);
}

// A scratch array of 32 accumulators in shared memory, one per block reduction site.
#define REMAT_REDUCE_SCRATCH(A, name) __shared__ A name[32]

// A kernel's dynamic shared memory (the launch's third argument), 16-byte aligned; under the SIMT
// emulator of the tests, its block's buffer.
#ifdef REMAT_SIMT_EMULATION
#define REMAT_DYNAMIC_SHARED(name) unsigned char* name = ::remat_simt::dynamic_shared()
#else
#define REMAT_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

}  // namespace remat::cuda
