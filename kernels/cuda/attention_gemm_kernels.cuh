// The row kernels of attention through cuBLAS (attention_gemm.cu): the masked softmax of a chunk's
// scores with its log-sum-exp, and in backward the probabilities rebuilt and dS. Kept apart so that
// tests/test_simt.cpp can also run them on the CPU under the SIMT emulator
// (tests/simt_emulator.h), with the GEMMs done on the host.
#pragma once

#include <limits>

#include "kernels/cuda/cuda_common.cuh"

namespace remat::cuda::attention_gemm_kernels {

#ifdef REMAT_SIMT_EMULATION
using std::exp;
using std::log;
using std::max;
#endif

// One block per row of a chunk's scaled scores s [rows, t] (row = head * t + query): the
// probabilities p, 0 past the diagonal when causal, and the row's log-sum-exp.
template <typename T>
__global__ void masked_softmax_kernel(const Acc<T>* s, T* p, Acc<T>* lse, int64_t t, bool causal) {
  using A = Acc<T>;
  REMAT_REDUCE_SCRATCH(A, scratch);
  const int64_t row = blockIdx.x, seen = causal ? row % t + 1 : t;  // the keys this query sees
  const A* sr = s + row * t;
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t j = threadIdx.x; j < seen; j += blockDim.x) m = max(m, sr[j]);
  m = block_max(m, scratch);
  A l = 0;
  for (int64_t j = threadIdx.x; j < seen; j += blockDim.x) l += exp(sr[j] - m);
  l = block_sum(l, scratch);
  const A row_lse = m + log(l);
  for (int64_t j = threadIdx.x; j < t; j += blockDim.x)
    p[row * t + j] = cast_to<T>(j < seen ? exp(sr[j] - row_lse) : A(0));
  if (threadIdx.x == 0) lse[row] = row_lse;
}

// Backward, one block per row: p rebuilt from the scores and the saved log-sum-exp (written, for
// dV), and ds = p (dp - D_row) scale, both in the inputs' dtype for the GEMMs that follow.
template <typename T>
__global__ void softmax_grad_kernel(const Acc<T>* s, const Acc<T>* dp, const Acc<T>* lse, const Acc<T>* row_dot,
                                    T* p, T* ds, int64_t t, bool causal, Acc<T> scale) {
  using A = Acc<T>;
  const int64_t row = blockIdx.x, seen = causal ? row % t + 1 : t;
  const A L = lse[row], D = row_dot[row];
  for (int64_t j = threadIdx.x; j < t; j += blockDim.x) {
    const int64_t at = row * t + j;
    const A pj = j < seen ? exp(s[at] - L) : A(0);
    p[at] = cast_to<T>(pj);
    ds[at] = cast_to<T>(pj * (dp[at] - D) * scale);
  }
}

}  // namespace remat::cuda::attention_gemm_kernels
