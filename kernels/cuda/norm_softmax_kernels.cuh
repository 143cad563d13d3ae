// The row kernels of norm_softmax.cu (that file's head says what they do): layer_norm and
// group_norm forward/backward, softmax, fused cross-entropy. Kept apart so that tests/test_simt.cpp
// can also run them on the CPU under the SIMT emulator (tests/simt_emulator.h).
#pragma once

#include "kernels/cuda/cuda_common.cuh"
#include "runtime/cuda/index_faults.h"

namespace remat::cuda::row_kernels {

#ifdef REMAT_SIMT_EMULATION
using std::exp;
using std::log;
using std::max;
using std::min;
using std::sqrt;
#endif

constexpr int kRowThreads = 128;       // threads per row of layer_norm and softmax
// Rows per partial sum of a parameter gradient (at least) on layer_norm's block-per-row path (rows
// past 1024 channels): 8192 rows give 128 partials, 3 x 128 blocks of 256 channels at 768 (256
// rows gave 96 blocks, too few for an H200's 132 SMs).
constexpr int64_t kRowChunk = 64;
constexpr int64_t kMaxGridY = 65535;   // the grid's y extent, where those partials are laid out

// ---- shared by layer_norm and group_norm ----------------------------------------------------

// Mean and 1 / sqrt(variance + eps) of the n values at x, by the whole block (two passes).
template <typename T>
__device__ void block_mean_rstd(const T* x, int64_t n, Acc<T> eps, Acc<T>* scratch, Acc<T>& mu, Acc<T>& rs) {
  using A = Acc<T>;
  A s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += load(x, i);
  mu = block_sum(s, scratch) / static_cast<A>(n);
  A v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A d = load(x, i) - mu;
    v += d * d;
  }
  rs = A(1) / sqrt(block_sum(v, scratch) / static_cast<A>(n) + eps);
}

// dx[i] = v, rounded to T; or, accumulating, dx[i] + that, with the bits of adding the stored v.
template <typename T>
__device__ __forceinline__ void store_or_add(T* dx, int64_t i, Acc<T> v, bool accumulate) {
  const T rounded = cast_to<T>(v);
  dx[i] = accumulate ? cast_to<T>(add_uncontracted(load(dx, i), load(&rounded, 0))) : rounded;
}

// dx of a normalisation over the n values at x: rstd * (d - mean(d) - xhat * mean(d * xhat)) with
// d = dy * w[channel(i)], by the whole block, written or (accumulate) added into dx. dy in T or,
// for f32 T, bf16 (G).
template <typename T, typename G, typename Channel>
__device__ void block_norm_dx(const G* dy, const T* x, const T* w, Acc<T> mu, Acc<T> rs, T* dx, int64_t n,
                              Channel channel, Acc<T>* scratch, bool accumulate = false) {
  using A = Acc<T>;
  A s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A xhat = (load(x, i) - mu) * rs, d = load(dy, i) * load(w, channel(i));
    s1 += d;
    s2 += d * xhat;
  }
  A mean_d = block_sum(s1, scratch) / static_cast<A>(n);
  A mean_dx = block_sum(s2, scratch) / static_cast<A>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A xhat = (load(x, i) - mu) * rs, d = load(dy, i) * load(w, channel(i));
    store_or_add(dx, i, rs * (d - mean_d - xhat * mean_dx), accumulate);
  }
}

// ---- layer_norm -------------------------------------------------------------------------------
// y may be in bf16 for f32 x (O), rounded once from the f32 result; dy may be in bf16 (G), widened
// as it is read: the bits of a cast after the forward and of one before the backward.

template <typename T, typename O = T>
__global__ void layer_norm_kernel(const T* x, const T* w, const T* b, O* y, T* mean, T* rstd, int64_t c, Acc<T> eps) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* row = x + blockIdx.x * c;
  A mu, rs;
  block_mean_rstd(row, c, eps, scratch, mu, rs);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x)
    y[blockIdx.x * c + i] = cast_to<O>((load(row, i) - mu) * rs * load(w, i) + load(b, i));
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = cast_to<T>(mu);
    rstd[blockIdx.x] = cast_to<T>(rs);
  }
}

template <typename T, typename G = T>
__global__ void layer_norm_dx_kernel(const G* dy, const T* x, const T* w, const T* mean, const T* rstd, T* dx,
                                     int64_t c, bool accumulate = false) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  int64_t base = blockIdx.x * c;
  block_norm_dx(dy + base, x + base, w, load(mean, blockIdx.x), load(rstd, blockIdx.x), dx + base, c,
                [](int64_t i) { return i; }, scratch, accumulate);
}

// partial_w/b[chunk, channel]: sums over the chunk's rows, in row order.
template <typename T, typename G = T>
__global__ void layer_norm_param_partial_kernel(const G* dy, const T* x, const T* mean, const T* rstd, int64_t rows,
                                                int64_t c, int64_t row_chunk, Acc<T>* partial_w, Acc<T>* partial_b) {
  using A = Acc<T>;
  int64_t ch = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ch >= c) return;
  int64_t r0 = blockIdx.y * row_chunk, r1 = min(rows, r0 + row_chunk);
  A sw = 0, sb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    A g = load(dy, r * c + ch);
    sw += g * (load(x, r * c + ch) - load(mean, r)) * load(rstd, r);
    sb += g;
  }
  partial_w[blockIdx.y * c + ch] = sw;
  partial_b[blockIdx.y * c + ch] = sb;
}

// dw and db from the partial sums [chunks, c]: a block of kSumSlices x 32 threads per 32 channels,
// slice s summing chunks s, s + kSumSlices, ... in order, then the slices' sums in slice order: a
// fixed order for a given number of chunks, and few dependent loads per thread (a thread per
// channel summing every chunk took 8192 / 64 = 128 in turn on gpt2).
constexpr int kSumSlices = 8;
template <typename T>
__global__ void sum_chunks_kernel(const Acc<T>* partial_w, const Acc<T>* partial_b, int64_t chunks, int64_t c, T* dw,
                                  T* db) {
  using A = Acc<T>;
  __shared__ A slice_w[kSumSlices][32], slice_b[kSumSlices][32];
  const int lane = threadIdx.x, slice = threadIdx.y;
  const int64_t ch = blockIdx.x * int64_t{32} + lane;
  A sw = 0, sb = 0;
  if (ch < c)
    for (int64_t k = slice; k < chunks; k += kSumSlices) {
      sw += partial_w[k * c + ch];
      sb += partial_b[k * c + ch];
    }
  slice_w[slice][lane] = sw;
  slice_b[slice][lane] = sb;
  __syncthreads();
  if (slice != 0 || ch >= c) return;
  for (int i = 1; i < kSumSlices; ++i) {
    sw += slice_w[i][lane];
    sb += slice_b[i][lane];
  }
  dw[ch] = cast_to<T>(sw);
  db[ch] = cast_to<T>(sb);
}

// ---- layer_norm a warp per row (rows of at most 32 kPerLane channels) ---------------------------
// The row's values stay in registers, channel lane + 32 k in slot k: the row is read once and the
// sums are shuffles, with no block barriers (a block per row read it three times and met at four
// barriers per row). Backward: each block takes kNormRowsPerBlock rows, its warps every
// kNormWarps-th, and leaves the parameter gradients' sums over them, warps added in warp order, as
// one chunk for sum_chunks_kernel: an order fixed by the shape.
constexpr int kNormWarps = 4, kNormRowsPerBlock = 32;

// The sum over the warp, the same bits in every lane (each step adds a + b in one lane and b + a
// in its partner).
template <typename A>
__device__ __forceinline__ A warp_all_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int kPerLane, typename O = T>
__global__ void layer_norm_warp_kernel(const T* x, const T* w, const T* b, O* y, T* mean, T* rstd, int64_t rows,
                                       int c, Acc<T> eps) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t{kNormWarps} + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp
  const T* in = x + row * c;
  A v[kPerLane], s = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int i = lane + 32 * k;
    v[k] = i < c ? load(in, i) : A(0);
    s += v[k];
  }
  const A mu = warp_all_sum(s) / static_cast<A>(c);
  A q = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k)
    if (lane + 32 * k < c) q += (v[k] - mu) * (v[k] - mu);
  const A rs = A(1) / sqrt(warp_all_sum(q) / static_cast<A>(c) + eps);
  O* out = y + row * c;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int i = lane + 32 * k;
    if (i < c) out[i] = cast_to<O>((v[k] - mu) * rs * load(w, i) + load(b, i));
  }
  if (lane == 0) {
    mean[row] = cast_to<T>(mu);
    rstd[row] = cast_to<T>(rs);
  }
}

// dx of each row, written or (accumulate) added into dx, and partial_w/b[block, channel]: the sums
// of dy xhat and dy over the block's rows.
template <typename T, int kPerLane, typename G = T>
__global__ void layer_norm_backward_warp_kernel(const G* dy, const T* x, const T* w, const T* mean, const T* rstd,
                                                T* dx, int64_t rows, int c, Acc<T>* partial_w, Acc<T>* partial_b,
                                                bool accumulate = false) {
  using A = Acc<T>;
  __shared__ A block_w[32 * kPerLane], block_b[32 * kPerLane];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = blockIdx.x * int64_t{kNormRowsPerBlock}, row_end = min(rows, row0 + kNormRowsPerBlock);
  A pw[kPerLane] = {}, pb[kPerLane] = {};
  for (int64_t r = row0 + warp; r < row_end; r += kNormWarps) {
    const A mu = load(mean, r), rs = load(rstd, r);
    A xhat[kPerLane], g[kPerLane], s1 = 0, s2 = 0;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int i = lane + 32 * k;
      xhat[k] = g[k] = 0;
      if (i >= c) continue;
      g[k] = load(dy, r * c + i);
      xhat[k] = (load(x, r * c + i) - mu) * rs;
      const A d = g[k] * load(w, i);
      s1 += d;
      s2 += d * xhat[k];
      pw[k] += g[k] * xhat[k];
      pb[k] += g[k];
    }
    const A mean_d = warp_all_sum(s1) / static_cast<A>(c), mean_dx = warp_all_sum(s2) / static_cast<A>(c);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int i = lane + 32 * k;
      if (i < c) store_or_add(dx, r * c + i, rs * (g[k] * load(w, i) - mean_d - xhat[k] * mean_dx), accumulate);
    }
  }
  // The block's sums, the warps' added in warp order.
  for (int turn = 0; turn < kNormWarps; ++turn) {
    if (warp == turn)
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int i = lane + 32 * k;
        if (i >= c) continue;
        block_w[i] = turn == 0 ? pw[k] : block_w[i] + pw[k];
        block_b[i] = turn == 0 ? pb[k] : block_b[i] + pb[k];
      }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < c; i += blockDim.x) {
    partial_w[blockIdx.x * int64_t{c} + i] = block_w[i];
    partial_b[blockIdx.x * int64_t{c} + i] = block_b[i];
  }
}

// ---- softmax ----------------------------------------------------------------------------------

template <typename T>
__global__ void softmax_kernel(const T* x, T* y, int64_t c) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* row = x + blockIdx.x * c;
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) mx = max(mx, load(row, i));
  mx = block_max(mx, scratch);
  A s = 0;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) s += exp(load(row, i) - mx);
  s = block_sum(s, scratch);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) y[blockIdx.x * c + i] = cast_to<T>(exp(load(row, i) - mx) / s);
}

template <typename T>
__global__ void softmax_backward_kernel(const T* dy, const T* y, T* dx, int64_t c) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  int64_t base = blockIdx.x * c;
  A dot = 0;
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x) dot += load(dy, base + i) * load(y, base + i);
  dot = block_sum(dot, scratch);
  for (int64_t i = threadIdx.x; i < c; i += blockDim.x)
    dx[base + i] = cast_to<T>(load(y, base + i) * (load(dy, base + i) - dot));
}

// ---- group_norm: groups of C/G channels are contiguous in [N, C, H, W] -------------------------

template <typename T>
__global__ void group_norm_kernel(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t m, int64_t hw,
                                  int groups, int64_t cg, Acc<T> eps) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* g = x + blockIdx.x * m;
  A mu, rs;
  block_mean_rstd(g, m, eps, scratch, mu, rs);
  int64_t c0 = (blockIdx.x % groups) * cg;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    int64_t ch = c0 + i / hw;
    y[blockIdx.x * m + i] = cast_to<T>((load(g, i) - mu) * rs * load(w, ch) + load(b, ch));
  }
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = cast_to<T>(mu);
    rstd[blockIdx.x] = cast_to<T>(rs);
  }
}

template <typename T>
__global__ void group_norm_dx_kernel(const T* dy, const T* x, const T* w, const T* mean, const T* rstd, T* dx, int64_t m,
                                     int64_t hw, int groups, int64_t cg) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  int64_t base = blockIdx.x * m, c0 = (blockIdx.x % groups) * cg;
  block_norm_dx(dy + base, x + base, w, load(mean, blockIdx.x), load(rstd, blockIdx.x), dx + base, m,
                [c0, hw](int64_t i) { return c0 + i / hw; }, scratch);
}

// One block per channel: sums over images and positions.
template <typename T>
__global__ void group_norm_param_kernel(const T* dy, const T* x, const T* mean, const T* rstd, int64_t n, int64_t c,
                                        int64_t hw, int groups, int64_t cg, T* dw, T* db) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  int64_t ch = blockIdx.x, g = ch / cg;
  A sw = 0, sb = 0;
  for (int64_t j = threadIdx.x; j < n * hw; j += blockDim.x) {
    int64_t img = j / hw, at = (img * c + ch) * hw + j % hw;
    A d = load(dy, at);
    sw += d * (load(x, at) - load(mean, img * groups + g)) * load(rstd, img * groups + g);
    sb += d;
  }
  sw = block_sum(sw, scratch);
  sb = block_sum(sb, scratch);
  if (threadIdx.x == 0) {
    dw[ch] = cast_to<T>(sw);
    db[ch] = cast_to<T>(sb);
  }
}

// ---- cross_entropy ----------------------------------------------------------------------------

__device__ __forceinline__ int64_t target_at(const void* targets, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(targets)[i] : static_cast<const int32_t*>(targets)[i];
}

// A target is used when it is in [0, v); ignore_index rows count for nothing, and a bad target is
// reported (with a record) and then treated like ignore_index.
__device__ __forceinline__ bool target_used(int64_t t, int64_t v, int64_t ignore_index, int64_t row, IndexFault* fault,
                                            IndexFaultOp op) {
  if (t >= 0 && t < v && t != ignore_index) return true;
  if (t != ignore_index && fault != nullptr) report_index_fault(fault, op, t, row, v, ignore_index);
  return false;
}

// Runs f(j, value) over a row of v values in chunks of kPack consecutive ones, chunk i to thread
// i mod blockDim.x, each chunk in order: by 16-byte loads where the row is aligned, else one
// value at a time in the same order, so sums over a row do not depend on where it lies (the bf16
// and f32 rows of the same logits sum alike). A row of gpt2's 50304 logits moves in whole words.
template <typename T, typename F>
__device__ __forceinline__ void for_row_chunks(const T* row, int64_t v, F f) {
  const bool aligned = aligned_for_pack(row);
  for (int64_t base = threadIdx.x * static_cast<int64_t>(kPack); base < v; base += blockDim.x * static_cast<int64_t>(kPack)) {
    if (aligned && base + kPack <= v) {
      const Pack<T> p = load_pack(row, base / kPack);
      for (int j = 0; j < kPack; ++j) f(base + j, load(p.v, j));
    } else {
      for (int64_t j = base; j < v && j < base + kPack; ++j) f(j, load(row, j));
    }
  }
}

template <typename T>
__global__ void cross_entropy_rows_kernel(const T* logits, const void* targets, bool is64, int64_t v,
                                          int64_t ignore_index, int64_t first_row, Acc<T>* lse, Acc<T>* row_loss,
                                          IndexFault* fault) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const T* row = logits + blockIdx.x * v;
  A mx = -std::numeric_limits<A>::infinity();
  for_row_chunks(row, v, [&](int64_t, A x) { mx = max(mx, x); });
  mx = block_max(mx, scratch);
  A s = 0;
  for_row_chunks(row, v, [&](int64_t, A x) { s += exp(x - mx); });
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    A l = mx + log(s);
    lse[blockIdx.x] = l;
    int64_t t = target_at(targets, is64, blockIdx.x);
    bool used = target_used(t, v, ignore_index, first_row + blockIdx.x, fault, IndexFaultOp::cross_entropy);
    row_loss[blockIdx.x] = used ? l - load(row, t) : A(0);
  }
}

// The rows whose targets count, on the GPU: the mean's divisor without a copy to the host.
__device__ long long used_targets(const void* targets, bool is64, int64_t n, int64_t v, int64_t ignore_index,
                                  long long* scratch) {
  long long count = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t t = target_at(targets, is64, i);
    count += t >= 0 && t < v && t != ignore_index;
  }
  return block_sum(count, scratch);
}

template <typename T>
__global__ void cross_entropy_mean_kernel(const Acc<T>* row_loss, const void* targets, bool is64, int64_t n, int64_t v,
                                          int64_t ignore_index, Acc<T>* loss) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  REMAT_REDUCE_SCRATCH(long long, counts);
  A s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += row_loss[i];
  s = block_sum(s, scratch);
  long long count = used_targets(targets, is64, n, v, ignore_index, counts);
  // All rows ignored: the mean is 0/0; PyTorch returns NaN, so do we.
  if (threadIdx.x == 0) loss[0] = count ? s / static_cast<A>(count) : std::numeric_limits<A>::quiet_NaN();
}

__global__ void cross_entropy_count_kernel(const void* targets, bool is64, int64_t n, int64_t v, int64_t ignore_index,
                                           long long* count) {
  REMAT_REDUCE_SCRATCH(long long, counts);
  long long c = used_targets(targets, is64, n, v, ignore_index, counts);
  if (threadIdx.x == 0) *count = c;
}

template <typename T>
__global__ void cross_entropy_backward_kernel(const Acc<T>* dloss, const T* logits, const void* targets, bool is64,
                                              const Acc<T>* lse, int64_t v, int64_t ignore_index, int64_t first_row,
                                              const long long* count, T* dl, IndexFault* fault) {
  using A = Acc<T>;
  int64_t t = target_at(targets, is64, blockIdx.x);
  bool used = target_used(t, v, ignore_index, first_row + blockIdx.x, threadIdx.x == 0 ? fault : nullptr,
                          IndexFaultOp::cross_entropy_backward);
  T* row = dl + blockIdx.x * v;
  const T* in = logits + blockIdx.x * v;
  A g = dloss[0] / static_cast<A>(*count ? *count : 1);
  A l = lse[blockIdx.x];
  auto grad = [&](int64_t j, A x) { return used ? cast_to<T>(exp(x - l) * g - (j == t ? g : A(0))) : cast_to<T>(A(0)); };
  // Each element alone, so packs change no bits; dl may be the logits themselves (in place).
  const int64_t head = packed_elements(v, packable(row, in));
  for (int64_t p = threadIdx.x; p < head / kPack; p += blockDim.x) {
    const Pack<T> x = load_pack(in, p);
    Pack<T> out;
    for (int j = 0; j < kPack; ++j) out.v[j] = grad(p * kPack + j, load(x.v, j));
    store_pack(row, p, out);
  }
  for (int64_t j = head + threadIdx.x; j < v; j += blockDim.x) row[j] = grad(j, load(in, j));
}

}  // namespace remat::cuda::row_kernels
