// The elementwise kernels of elementwise.cu: unary functions and their fused backward, broadcasting
// binary ops (and linear's bias add, for blas.cu), strided gathers, Philox dropout (the CPU's mask,
// bit for bit), the AdamW update (per tensor and multi-tensor) and casts. Kept apart so that tests/test_simt.cpp can also run them
// on the CPU under the SIMT emulator (tests/simt_emulator.h).
#pragma once

#include <type_traits>

#include "kernels/common/elementwise_math.h"
#include "kernels/cuda/cuda_common.cuh"
#include "runtime/philox.h"

namespace remat::cuda::elementwise_kernels {

#ifdef REMAT_SIMT_EMULATION
using std::exp;
using std::log;
using std::pow;
using std::sqrt;
using std::tanh;
#endif

template <typename A>
__device__ A unary_value(UnaryFn fn, A v, A s) {
  switch (fn) {
    case UnaryFn::add_scalar: return v + s;
    case UnaryFn::mul_scalar: return v * s;
    case UnaryFn::pow_scalar: return s == A(2) ? v * v : pow(v, s);  // a square as the CPU's: x * x
    case UnaryFn::neg: return -v;
    case UnaryFn::exp: return exp(v);
    case UnaryFn::log: return log(v);
    case UnaryFn::tanh: return tanh(v);
    case UnaryFn::sqrt: return sqrt(v);
    case UnaryFn::rsqrt: return A(1) / sqrt(v);
    case UnaryFn::relu: return v > A(0) ? v : A(0);
    case UnaryFn::gelu: return math::gelu(v);
    case UnaryFn::silu: return math::silu(v);
    case UnaryFn::sigmoid: return math::sigmoid(v);
  }
  return A(0);
}

// dy * f'(x), from x or from y = f(x) as the CPU backend does.
template <typename A>
__device__ A unary_grad(UnaryFn fn, A g, A x, A y, A s) {
  switch (fn) {
    case UnaryFn::add_scalar: return g;
    case UnaryFn::mul_scalar: return g * s;
    case UnaryFn::pow_scalar: return g * s * pow(x, s - A(1));
    case UnaryFn::neg: return -g;
    case UnaryFn::exp: return g * y;
    case UnaryFn::log: return g / x;
    case UnaryFn::tanh: return g * (A(1) - y * y);
    case UnaryFn::sqrt: return g * A(0.5) / y;
    case UnaryFn::rsqrt: return g * A(-0.5) * y * y * y;
    case UnaryFn::relu: return x > A(0) ? g : A(0);
    case UnaryFn::gelu: return g * math::gelu_grad(x);
    case UnaryFn::silu: return g * math::silu_grad(x);
    case UnaryFn::sigmoid: return g * y * (A(1) - y);
  }
  return A(0);
}

// The contiguous kernels below take their elements in packs where their pointers allow
// (cuda_common.cuh, kPack), then the rest one at a time; launched with blocks_for_packs(n).
template <typename T>
__global__ void unary_kernel(UnaryFn fn, const T* x, T* y, int64_t n, Acc<T> s) {
  const int64_t head = packed_elements(n, packable(x, y));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<T> in = load_pack(x, p), out;
    for (int j = 0; j < kPack; ++j) out.v[j] = cast_to<T>(unary_value(fn, load(in.v, j), s));
    store_pack(y, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n) y[i] = cast_to<T>(unary_value(fn, load(x, i), s));
}

// x or y may be null (the function needs only the other).
template <typename T>
__global__ void unary_backward_kernel(UnaryFn fn, const T* dy, const T* x, const T* y, T* dx, int64_t n, Acc<T> s) {
  const int64_t head = packed_elements(n, packable(dy, x, y, dx));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<T> g = load_pack(dy, p), xp{}, yp{}, out;
    if (x) xp = load_pack(x, p);
    if (y) yp = load_pack(y, p);
    for (int j = 0; j < kPack; ++j) {
      Acc<T> xv = x ? load(xp.v, j) : Acc<T>(0), yv = y ? load(yp.v, j) : Acc<T>(0);
      out.v[j] = cast_to<T>(unary_grad(fn, load(g.v, j), xv, yv, s));
    }
    store_pack(dx, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n) {
    Acc<T> xv = x ? load(x, i) : Acc<T>(0), yv = y ? load(y, i) : Acc<T>(0);
    dx[i] = cast_to<T>(unary_grad(fn, load(dy, i), xv, yv, s));
  }
}

template <typename A>
__device__ A binary_value(BinaryFn fn, A a, A b) {
  switch (fn) {
    case BinaryFn::add: return a + b;
    case BinaryFn::sub: return a - b;
    case BinaryFn::mul: return a * b;
    case BinaryFn::div: return a / b;
  }
  return A(0);
}

constexpr int kMaxRank = 8;

// Output shape and the element strides of up to two inputs seen in that shape (0 where broadcast).
struct Indexer {
  int rank;
  int64_t sizes[kMaxRank];
  int64_t strides[2][kMaxRank];

  __device__ void offsets(int64_t linear, int64_t& a, int64_t& b) const {
    a = 0, b = 0;
    for (int d = rank - 1; d >= 0; --d) {
      int64_t idx = linear % sizes[d];
      linear /= sizes[d];
      a += idx * strides[0][d];
      b += idx * strides[1][d];
    }
  }
};

inline Indexer make_indexer(const Shape& out, const Tensor& a, const Tensor* b, const char* op) {
  REMAT_CHECK(out.size() <= static_cast<size_t>(kMaxRank), op, ": the cuda backend handles up to ", kMaxRank,
              " dims, got ", shape_str(out));
  Indexer ix{};
  ix.rank = static_cast<int>(out.size());
  const Tensor* ins[2] = {&a, b};
  for (int k = 0; k < 2; ++k) {
    if (!ins[k]) continue;
    const Tensor& t = *ins[k];
    size_t lead = out.size() - t.shape().size();
    for (size_t i = 0; i < t.shape().size(); ++i) ix.strides[k][lead + i] = t.shape()[i] == 1 ? 0 : t.strides()[i];
  }
  for (size_t d = 0; d < out.size(); ++d) ix.sizes[d] = out[d];
  return ix;
}

template <typename T>
__global__ void binary_same_kernel(BinaryFn fn, const T* a, const T* b, T* y, int64_t n) {
  const int64_t head = packed_elements(n, packable(a, b, y));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<T> pa = load_pack(a, p), pb = load_pack(b, p), out;
    for (int j = 0; j < kPack; ++j) out.v[j] = cast_to<T>(binary_value(fn, load(pa.v, j), load(pb.v, j)));
    store_pack(y, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n) y[i] = cast_to<T>(binary_value(fn, load(a, i), load(b, i)));
}

// fn(a, b) where one operand is f32 and the other bf16 of the same shape (an f32 residual stream
// plus a bf16 branch under autocast): the bf16 one (`narrow`, the first operand where
// narrow_first) is widened exactly as it is read, so y has the bits of a cast to f32 and then the
// f32 op, without the cast's pass over memory.
template <typename W, typename N>  // float and bf16
__global__ void binary_widening_kernel(BinaryFn fn, const W* wide, const N* narrow, bool narrow_first, W* y, int64_t n) {
  auto value = [&](W w, W v) { return narrow_first ? binary_value(fn, v, w) : binary_value(fn, w, v); };
  const int64_t head = packed_elements(n, packable(wide, narrow, y));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<W> pw = load_pack(wide, p), out;
    Pack<N> pn = load_pack(narrow, p);
    for (int j = 0; j < kPack; ++j) out.v[j] = value(pw.v[j], load(pn.v, j));
    store_pack(y, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n) y[i] = value(wide[i], load(narrow, i));
}

template <typename T>
__global__ void binary_broadcast_kernel(BinaryFn fn, const T* a, const T* b, T* y, int64_t n, Indexer ix) {
  REMAT_GRID_STRIDE(i, n) {
    int64_t oa, ob;
    ix.offsets(i, oa, ob);
    y[i] = cast_to<T>(binary_value(fn, load(a, oa), load(b, ob)));
  }
}

// A strided copy's source seen as `sizes` with element `strides` (CudaBackend::copy_strided merges
// and widens them first), for gather_kernel.
inline Indexer gather_indexer(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  REMAT_CHECK(sizes.size() <= static_cast<size_t>(kMaxRank), "copy_strided: the cuda backend handles up to ", kMaxRank,
              " dims, got ", sizes.size());
  Indexer ix{};
  ix.rank = static_cast<int>(sizes.size());
  for (size_t d = 0; d < sizes.size(); ++d) ix.sizes[d] = sizes[d], ix.strides[0][d] = strides[d];
  return ix;
}

// The widest word a strided copy moves (16 bytes: eight bf16 at once).
struct alignas(16) Word16 {
  uint32_t w[4];
};

// Copies by word so that any dtype moves unchanged.
template <typename W>
__global__ void gather_kernel(const W* src, W* dst, int64_t n, Indexer ix) {
  REMAT_GRID_STRIDE(i, n) {
    int64_t os, unused;
    ix.offsets(i, os, unused);
    dst[i] = src[os];
  }
}

// y [rows, cols] += b [cols] in place: linear's bias after its GEMM (blas.cu).
template <typename T>
__global__ void add_bias_kernel(T* y, const T* b, int64_t rows, int64_t cols) {
  REMAT_GRID_STRIDE(i, rows * cols) y[i] = cast_to<T>(load(y, i) + load(b, i % cols));
}

template <typename T>
__device__ __forceinline__ T dropout_element(Acc<T> x, int64_t i, float threshold, Acc<T> keep_scale, uint64_t seed,
                                             uint64_t offset) {
  float u = philox::uniform_from_bits(philox::bits_at(seed, offset, static_cast<uint64_t>(i)));
  return u >= threshold ? cast_to<T>(x * keep_scale) : cast_to<T>(Acc<T>(0));
}

// x's value as dropout in T reads it: for a wider In (dropout_add's f32 gradient for a bf16 x),
// rounded to T first, as a cast to T and then dropout would.
template <typename T, typename In>
__device__ __forceinline__ Acc<T> dropout_input(Acc<In> v) {
  if constexpr (std::is_same_v<T, In>) {
    return v;
  } else {
    const T rounded = cast_to<T>(static_cast<Acc<T>>(v));
    return load(&rounded, 0);
  }
}

// y in T from x in In (T, or f32 for bf16 T: dropout_input).
template <typename T, typename In = T>
__global__ void dropout_kernel(const In* x, T* y, int64_t n, float threshold, Acc<T> keep_scale, uint64_t seed,
                               uint64_t offset) {
  const int64_t head = packed_elements(n, packable(x, y));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<In> in = load_pack(x, p);
    Pack<T> out;
    for (int j = 0; j < kPack; ++j)
      out.v[j] = dropout_element<T>(dropout_input<T, In>(load(in.v, j)), p * kPack + j, threshold, keep_scale, seed,
                                    offset);
    store_pack(y, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n)
  y[i] = dropout_element<T>(dropout_input<T, In>(load(x, i)), i, threshold, keep_scale, seed, offset);
}

// y = residual + dropout(x) in R (x in X: R, or bf16 for f32 R): the dropped value rounded to X,
// as dropout's output is, then widened and added, as the add (binary_widening_kernel) does.
template <typename X, typename R>
__global__ void dropout_add_kernel(const X* x, const R* residual, R* y, int64_t n, float threshold,
                                   Acc<X> keep_scale, uint64_t seed, uint64_t offset) {
  auto sum = [&](Acc<R> r, Acc<X> v, int64_t i) {
    const X dropped = dropout_element<X>(v, i, threshold, keep_scale, seed, offset);
    return cast_to<R>(add_uncontracted(r, static_cast<Acc<R>>(load(&dropped, 0))));
  };
  const int64_t head = packed_elements(n, packable(x, residual, y));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<X> in = load_pack(x, p);
    Pack<R> res = load_pack(residual, p), out;
    for (int j = 0; j < kPack; ++j) out.v[j] = sum(load(res.v, j), load(in.v, j), p * kPack + j);
    store_pack(y, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n) y[i] = sum(load(residual, i), load(x, i), i);
}

// One element of the AdamW update, shared by the per-tensor and the multi-tensor kernel so that
// both give the same bits.
template <typename T>
__device__ __forceinline__ T adamw_element(T* p, const T* g, T* m, T* v, int64_t i, Acc<T> b1, Acc<T> b2,
                                           Acc<T> bias1, Acc<T> bias2, Acc<T> lr, Acc<T> eps, Acc<T> decay) {
  using A = Acc<T>;
  A gi = load(g, i), pi = load(p, i);
  A mi = b1 * load(m, i) + (A(1) - b1) * gi;
  A vi = b2 * load(v, i) + (A(1) - b2) * gi * gi;
  m[i] = cast_to<T>(mi);
  v[i] = cast_to<T>(vi);
  A m_hat = mi / bias1, v_hat = vi / bias2;
  const T updated = cast_to<T>(pi - decay * pi - lr * m_hat / (sqrt(v_hat) + eps));
  p[i] = updated;
  return updated;
}

template <typename T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, Acc<T> b1, Acc<T> b2, Acc<T> bias1,
                             Acc<T> bias2, Acc<T> lr, Acc<T> eps, Acc<T> decay) {
  REMAT_GRID_STRIDE(i, n) adamw_element(p, g, m, v, i, b1, b2, bias1, bias2, lr, eps, decay);
}

// Up to kAdamWChunk tensors of one update, passed by value (under the classic 4 KB of kernel
// parameters): their pointers, their rates and where each starts in the chunk's elements.
constexpr int kAdamWChunk = 40;

template <typename T>
struct AdamWChunk {
  T* p[kAdamWChunk];
  const T* g[kAdamWChunk];
  T* m[kAdamWChunk];
  T* v[kAdamWChunk];
  Acc<T> lr[kAdamWChunk], decay[kAdamWChunk];
  bf16* copy[kAdamWChunk];         // the parameter's bf16 copy (autocast's cache) or null; T f32 only
  int64_t start[kAdamWChunk + 1];  // start[count]: all the chunk's elements
  int count;
};

template <typename T>
__global__ void adamw_chunk_kernel(AdamWChunk<T> c, Acc<T> b1, Acc<T> b2, Acc<T> bias1, Acc<T> bias2, Acc<T> eps) {
  REMAT_GRID_STRIDE(e, c.start[c.count]) {
    const int lo = tensor_holding(c.start, c.count, e);
    const int64_t i = e - c.start[lo];
    const T updated =
        adamw_element(c.p[lo], c.g[lo], c.m[lo], c.v[lo], i, b1, b2, bias1, bias2, c.lr[lo], eps, c.decay[lo]);
    // The cast kernel's rounding of the same value: the copy a cast of the updated weight makes.
    if (c.copy[lo] != nullptr) c.copy[lo][i] = cast_to<bf16>(static_cast<Acc<bf16>>(updated));
  }
}

template <typename From, typename To>
__global__ void cast_kernel(const From* x, To* y, int64_t n) {
  const int64_t head = packed_elements(n, packable(x, y));
  REMAT_GRID_STRIDE(p, head / kPack) {
    Pack<From> in = load_pack(x, p);
    Pack<To> out;
    for (int j = 0; j < kPack; ++j) out.v[j] = cast_to<To>(static_cast<Acc<To>>(load(in.v, j)));
    store_pack(y, p, out);
  }
  REMAT_GRID_STRIDE_FROM(i, head, n) y[i] = cast_to<To>(static_cast<Acc<To>>(load(x, i)));
}

}  // namespace remat::cuda::elementwise_kernels
