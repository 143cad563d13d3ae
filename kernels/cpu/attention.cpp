// CPU fused scaled dot-product attention, q/k/v [B, H, T, D]. Forward keeps only the row
// log-sum-exp; backward rebuilds the probabilities from it. One (b, h) head per thread; within a
// head, query rows go in blocks of kRows, and a causal block reads only the keys up to its last row
// (the T x T matrix is never formed). Every sum runs in a fixed order, so replays repeat the bits.
// q, k, v, o and dO may be strided views (any strides over B, H and T, unit stride over D), such
// as the heads of a fused qkv projection: no copies. o is laid out [B, T, H, D] and returned as a
// [B, H, T, D] view of it, so that merging the heads back to [B, T, H*D] is a view too (and the
// output projection's saved input shares o's storage instead of copying it). The gradients of
// heads that lie side by side in one [B, T, 3C] projection go side by side into one such buffer
// (kernels/attention_layout.h), for the same reason.
// f32 heads of a dim that is a whole number of vectors take the AVX-512 or AVX2 kernels of
// attention_heads.cpp where the build has them (REMAT_CPU_ATTENTION=eigen keeps them on this file's
// Eigen path, which f64 always takes): the same blocks of query rows, each sum in a fixed order of
// its own; at gpt small's shape 3x faster forward, 1.9x backward on AVX-512 (docs/results/cpu.md).
#include <Eigen/Core>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/attention_layout.h"
#include "kernels/cpu/attention_heads.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vector_math.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

constexpr int64_t kRows = 16;  // query rows per block (measured best for T 128, D 32)

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using CMap = Eigen::Map<const Mat<T>, 0, Eigen::OuterStride<>>;
template <typename T>
using MMap = Eigen::Map<Mat<T>, 0, Eigen::OuterStride<>>;

// One head's rows of a [B, H, T, D] tensor: a base pointer and the stride between rows.
template <typename T>
struct HeadRows {
  T* base;
  int64_t ld;
  T* row(int64_t i) const { return base + i * ld; }
};

// Head h (of B*H, b-major) of a [B, H, T, D] view whose last stride is 1.
template <typename T>
HeadRows<T> head_of(const Tensor& t, int64_t h) {
  int64_t heads = t.size(1), b = h / heads, hh = h % heads;
  return {t.data<T>() + b * t.strides()[0] + hh * t.strides()[1], t.strides()[2]};
}

// The layouts the kernels read: unit stride over D (else a contiguous copy).
Tensor rows_of_d(const Tensor& t) { return t.strides()[3] == 1 ? t : t.as_contiguous(); }

// S = scale * Q_rows K_keys^T for query rows [r0, r1) against keys [0, keys), masked causally:
// -inf where key j > query row i. S has a row stride of `ld`.
template <typename T>
void block_scores(HeadRows<T> q, HeadRows<T> k, int64_t r0, int64_t r1, int64_t keys, int64_t d, bool causal, T scale,
                  T* s, int64_t ld) {
  MMap<T> S(s, r1 - r0, keys, Eigen::OuterStride<>(ld));
  S.noalias() = scale * (CMap<T>(q.row(r0), r1 - r0, d, Eigen::OuterStride<>(q.ld)) *
                         CMap<T>(k.base, keys, d, Eigen::OuterStride<>(k.ld)).transpose());
  if (causal)
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t j = i + 1; j < keys; ++j) S(i - r0, j) = -std::numeric_limits<T>::infinity();
}

// Whether q's heads take the vector kernels.
bool vector_heads(const Tensor& q) { return q.dtype() == DType::f32 && cpu::attention_kernels_chosen(q.size(3)); }

// A [B, H, T, D] view's head h as the vector kernels take it.
cpu::HeadRowsF32 f32_head(const Tensor& t, int64_t h) {
  HeadRows<float> rows = head_of<float>(t, h);
  return {rows.base, rows.ld};
}

// Per-thread scratch, allocated before the parallel loop (workspace memory; an allocation that
// fails is then an ordinary error, not one thrown inside a parallel region).
Tensor scratch(int64_t per_thread, DType dtype) {
  return empty_workspace({static_cast<int64_t>(omp_get_max_threads()), per_thread}, dtype);
}

}  // namespace

std::vector<Tensor> CpuBackend::attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                          double scale) {
  Tensor q = rows_of_d(q_in), k = rows_of_d(k_in), v = rows_of_d(v_in);
  int64_t b = q.size(0), nh = q.size(1), heads = b * nh, t = q.size(2), d = q.size(3);
  // o in [B, T, H, D] memory, seen as [B, H, T, D] (the file's comment says why).
  Tensor o = Tensor::empty({b, t, nh, d}, q.dtype()).view({b, nh, t, d}, {t * nh * d, d, nh * d, 1}, 0);
  Tensor lse = Tensor::empty({b, nh, t}, q.dtype());
  const bool vector = vector_heads(q);
  Tensor work = scratch(vector ? cpu::attention_forward_scratch(t, d) : kRows * t, q.dtype());
  cpu::dispatch_float(q.dtype(), "attention", [&]<typename T>() {
#pragma omp parallel for if (heads * t * t * d > cpu::kParallelGrain)
    for (int64_t h = 0; h < heads; ++h) {
      if constexpr (std::is_same_v<T, float>)
        if (vector) {
          HeadRows<float> O = head_of<float>(o, h);
          cpu::attention_head_forward(f32_head(q, h), f32_head(k, h), f32_head(v, h), O.base, O.ld,
                                      lse.data<float>() + h * t, t, d, causal, static_cast<float>(scale),
                                      work.data<float>() + omp_get_thread_num() * work.size(1));
          continue;
        }
      HeadRows<T> Q = head_of<T>(q, h), K = head_of<T>(k, h), V = head_of<T>(v, h), O = head_of<T>(o, h);
      T* L = lse.data<T>() + h * t;
      T* S = work.data<T>() + omp_get_thread_num() * kRows * t;
      for (int64_t r0 = 0; r0 < t; r0 += kRows) {
        int64_t r1 = std::min(t, r0 + kRows), keys = causal ? r1 : t;
        block_scores(Q, K, r0, r1, keys, d, causal, static_cast<T>(scale), S, t);
        for (int64_t i = 0; i < r1 - r0; ++i) {
          T* row = S + i * t;
          T mx = *std::max_element(row, row + keys);
          cpu::exp_shifted(row, mx, row, keys);
          T sum = 0;
          for (int64_t j = 0; j < keys; ++j) sum += row[j];
          T inv = T(1) / sum;
          for (int64_t j = 0; j < keys; ++j) row[j] *= inv;
          L[r0 + i] = mx + std::log(sum);
        }
        MMap<T>(O.row(r0), r1 - r0, d, Eigen::OuterStride<>(O.ld)).noalias() =
            MMap<T>(S, r1 - r0, keys, Eigen::OuterStride<>(t)) * CMap<T>(V.base, keys, d, Eigen::OuterStride<>(V.ld));
      }
    }
  });
  return {o, lse};
}

std::vector<Tensor> CpuBackend::attention_backward(const Tensor& d_o_in, const Tensor& q_in, const Tensor& k_in,
                                                   const Tensor& v_in, const Tensor& o_in, const Tensor& lse,
                                                   bool causal, double scale) {
  Tensor q = rows_of_d(q_in), k = rows_of_d(k_in), v = rows_of_d(v_in), o = rows_of_d(o_in), d_o = rows_of_d(d_o_in);
  int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  // dk and dv sum over query blocks: zeros to start from.
  const std::vector<Tensor> grads =
      packed_attention_heads(q, k, v)
          ? packed_attention_grads(q, /*zeroed=*/true)
          : std::vector<Tensor>{Tensor::empty(q.shape(), q.dtype()), Tensor::zeros(q.shape(), q.dtype()),
                                Tensor::zeros(q.shape(), q.dtype())};
  const Tensor &dq = grads[0], &dk = grads[1], &dv = grads[2];
  const bool vector = vector_heads(q);
  Tensor work = scratch(vector ? cpu::attention_backward_scratch(t, d) : 2 * kRows * t, q.dtype());
  cpu::dispatch_float(q.dtype(), "attention_backward", [&]<typename T>() {
#pragma omp parallel for if (heads * t * t * d > cpu::kParallelGrain)
    for (int64_t h = 0; h < heads; ++h) {
      if constexpr (std::is_same_v<T, float>)
        if (vector) {
          HeadRows<float> dQ = head_of<float>(dq, h), dK = head_of<float>(dk, h), dV = head_of<float>(dv, h);
          cpu::attention_head_backward(f32_head(q, h), f32_head(k, h), f32_head(v, h), f32_head(o, h),
                                       f32_head(d_o, h), lse.data<float>() + h * t, dQ.base, dK.base, dV.base,
                                       dQ.ld, t, d, causal, static_cast<float>(scale),
                                       work.data<float>() + omp_get_thread_num() * work.size(1));
          continue;
        }
      HeadRows<T> Q = head_of<T>(q, h), K = head_of<T>(k, h), V = head_of<T>(v, h), O = head_of<T>(o, h),
                  dO = head_of<T>(d_o, h), dQ = head_of<T>(dq, h), dK = head_of<T>(dk, h), dV = head_of<T>(dv, h);
      const T* L = lse.data<T>() + h * t;
      T* P = work.data<T>() + omp_get_thread_num() * 2 * kRows * t;
      T* dP = P + kRows * t;
      T sc = static_cast<T>(scale);
      using Stride = Eigen::OuterStride<>;
      // Query blocks in order: dK and dV sum their contributions in a fixed order.
      for (int64_t r0 = 0; r0 < t; r0 += kRows) {
        int64_t r1 = std::min(t, r0 + kRows), rows = r1 - r0, keys = causal ? r1 : t;
        block_scores(Q, K, r0, r1, keys, d, causal, sc, P, t);
        for (int64_t i = 0; i < rows; ++i) cpu::exp_shifted(P + i * t, L[r0 + i], P + i * t, keys);  // P = exp(S - lse)
        MMap<T> Pb(P, rows, keys, Stride(t)), dPb(dP, rows, keys, Stride(t));
        CMap<T> dOb(dO.row(r0), rows, d, Stride(dO.ld)), Vk(V.base, keys, d, Stride(V.ld)),
            Kk(K.base, keys, d, Stride(K.ld)), Qb(Q.row(r0), rows, d, Stride(Q.ld));
        MMap<T>(dV.base, keys, d, Stride(dV.ld)).noalias() += Pb.transpose() * dOb;  // d(v) term
        dPb.noalias() = dOb * Vk.transpose();
        for (int64_t i = 0; i < rows; ++i) {
          using Row = Eigen::Map<const Mat<T>>;
          T di = Row(dO.row(r0 + i), 1, d).cwiseProduct(Row(O.row(r0 + i), 1, d)).sum();  // D_i = dO_i . O_i
          for (int64_t j = 0; j < keys; ++j) dPb(i, j) = Pb(i, j) * (dPb(i, j) - di) * sc;  // dS, scaled
        }
        MMap<T>(dQ.row(r0), rows, d, Stride(dQ.ld)).noalias() = dPb * Kk;        // d(q) term
        MMap<T>(dK.base, keys, d, Stride(dK.ld)).noalias() += dPb.transpose() * Qb;  // d(k) term
      }
    }
  });
  return grads;
}

}  // namespace remat
