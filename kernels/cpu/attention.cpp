// CPU fused scaled dot-product attention, q/k/v [B, H, T, D]. Forward keeps only the row
// log-sum-exp; backward rebuilds the probabilities from it, one (b, h) head per thread.
#include <Eigen/Core>
#include <cmath>
#include <limits>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vector_math.h"

namespace remat {

namespace {

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using CMap = Eigen::Map<const Mat<T>>;
template <typename T>
using MMap = Eigen::Map<Mat<T>>;

// S = scale * Q K^T with the causal mask applied as -inf above the diagonal.
template <typename T>
void scores(const CMap<T>& q, const CMap<T>& k, bool causal, T scale, MMap<T>& s) {
  s.noalias() = q * k.transpose();
  s *= scale;
  if (causal)
    for (int64_t i = 0; i < s.rows(); ++i)
      for (int64_t j = i + 1; j < s.cols(); ++j) s(i, j) = -std::numeric_limits<T>::infinity();
}

}  // namespace

std::vector<Tensor> CpuBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                          double scale) {
  int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  Tensor o = Tensor::empty(q.shape(), q.dtype());
  Tensor lse = Tensor::empty({q.size(0), q.size(1), t}, q.dtype());
  cpu::dispatch_float(q.dtype(), "attention", [&]<typename T>() {
#pragma omp parallel for if (heads * t * t * d > cpu::kParallelGrain)
    for (int64_t h = 0; h < heads; ++h) {
      Tensor work;
      {
        MemoryCategoryScope scope(MemoryCategory::workspace);
        work = Tensor::empty({t, t}, q.dtype());
      }
      CMap<T> Q(q.data<T>() + h * t * d, t, d), K(k.data<T>() + h * t * d, t, d), V(v.data<T>() + h * t * d, t, d);
      MMap<T> S(work.data<T>(), t, t), O(o.data<T>() + h * t * d, t, d);
      T* L = lse.data<T>() + h * t;
      scores(Q, K, causal, static_cast<T>(scale), S);
      for (int64_t i = 0; i < t; ++i) {
        T mx = S.row(i).maxCoeff();
        T* row = S.data() + i * t;  // row-major
        cpu::exp_shifted(row, mx, row, t);
        T sum = 0;
        for (int64_t j = 0; j < t; ++j) sum += row[j];
        S.row(i) /= sum;
        L[i] = mx + std::log(sum);
      }
      O.noalias() = S * V;
    }
  });
  return {o, lse};
}

std::vector<Tensor> CpuBackend::attention_backward(const Tensor& d_o, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& o, const Tensor& lse, bool causal,
                                                   double scale) {
  int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  Tensor dq = Tensor::empty(q.shape(), q.dtype()), dk = Tensor::empty(q.shape(), q.dtype()),
         dv = Tensor::empty(q.shape(), q.dtype());
  cpu::dispatch_float(q.dtype(), "attention_backward", [&]<typename T>() {
#pragma omp parallel for if (heads * t * t * d > cpu::kParallelGrain)
    for (int64_t h = 0; h < heads; ++h) {
      Tensor work_p, work_dp;
      {
        MemoryCategoryScope scope(MemoryCategory::workspace);
        work_p = Tensor::empty({t, t}, q.dtype());
        work_dp = Tensor::empty({t, t}, q.dtype());
      }
      size_t off = static_cast<size_t>(h * t * d);
      CMap<T> Q(q.data<T>() + off, t, d), K(k.data<T>() + off, t, d), V(v.data<T>() + off, t, d),
          O(o.data<T>() + off, t, d), dO(d_o.data<T>() + off, t, d);
      MMap<T> P(work_p.data<T>(), t, t), dP(work_dp.data<T>(), t, t);
      MMap<T> dQ(dq.data<T>() + off, t, d), dK(dk.data<T>() + off, t, d), dV(dv.data<T>() + off, t, d);
      const T* L = lse.data<T>() + h * t;
      T sc = static_cast<T>(scale);
      scores(Q, K, causal, sc, P);
      for (int64_t i = 0; i < t; ++i) cpu::exp_shifted(P.data() + i * t, L[i], P.data() + i * t, t);  // P = exp(S - lse)
      dV.noalias() = P.transpose() * dO;                                       // d(v) term
      dP.noalias() = dO * V.transpose();
      for (int64_t i = 0; i < t; ++i) {
        T di = dO.row(i).dot(O.row(i));  // D_i = sum_j P_ij dP_ij = dO_i . O_i
        for (int64_t j = 0; j < t; ++j) dP(i, j) = P(i, j) * (dP(i, j) - di) * sc;  // dS, scaled
      }
      dQ.noalias() = dP * K;              // d(q) term
      dK.noalias() = dP.transpose() * Q;  // d(k) term
    }
  });
  return {dq, dk, dv};
}

}  // namespace remat
