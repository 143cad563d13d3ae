// f32 attention for one head on AVX-512 CPUs: the block products of kernels/cpu/attention.cpp
// run as register tiles of broadcast FMAs instead of Eigen's general GEMM, which at these shapes
// (16 query rows against at most T keys, a head dim of 32-128) spends most of its time packing and
// dispatching; the softmax's max and sum run on vectors.
// Every element is computed by the same sequence of operations wherever its tile lies (an edge
// tile is masked, not handled by other code), and every sum runs in a fixed order: a replay
// repeats the bits, whatever the thread count.
#pragma once

#include <cstdint>

namespace remat::cpu {

// Whether this build has the kernels (compiled for a CPU with AVX-512F).
bool attention_avx512_built();
// Whether they take heads of dim d: built, and d a multiple of 16 up to 256.
bool attention_avx512_fits(int64_t d);

// A head's T rows of D floats, `ld` floats apart.
struct HeadRowsF32 {
  const float* base;
  int64_t ld;
};

// Scratch floats one call needs (each thread its own).
int64_t attention_avx512_forward_scratch(int64_t t, int64_t d);
int64_t attention_avx512_backward_scratch(int64_t t, int64_t d);

// o = softmax(scale q k^T, masked causally) v for one head, o's rows `o_ld` apart, and each
// row's log-sum-exp of the scaled scores in lse[0, t).
void attention_head_forward_avx512(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, float* o, int64_t o_ld, float* lse,
                                   int64_t t, int64_t d, bool causal, float scale, float* scratch);

// dq, dk, dv for one head (t rows each, `grad_ld` floats apart; dk and dv zero on entry), the
// probabilities rebuilt from lse.
void attention_head_backward_avx512(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, HeadRowsF32 o, HeadRowsF32 d_o,
                                    const float* lse, float* dq, float* dk, float* dv, int64_t grad_ld, int64_t t,
                                    int64_t d, bool causal, float scale, float* scratch);

}  // namespace remat::cpu
