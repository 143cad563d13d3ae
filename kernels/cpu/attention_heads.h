// f32 attention for one head on the CPU's vectors (AVX-512, or AVX2 with FMA): the block products
// of kernels/cpu/attention.cpp run as register tiles of broadcast FMAs instead of Eigen's general
// GEMM, which at these shapes (16 query rows against at most T keys, a head dim of 32-128) spends
// most of its time packing and dispatching; the softmax's max and sum run on vectors.
// Every element is computed by the same sequence of operations wherever its tile lies (an edge
// tile is masked, not handled by other code), and every sum runs in a fixed order: a replay
// repeats the bits, whatever the thread count. The bits depend on the instruction set (the lanes
// of a sum), so a machine with AVX-512 and one with AVX2 alone differ in the last bits.
#pragma once

#include <cstdint>
#include <string>

namespace remat::cpu {

// The instruction set this build's kernels use: "avx512", "avx2", or "" where it has none (a build
// without -march=native, or a CPU with neither).
const char* attention_kernels_isa();
// Whether they take heads of dim d: built, and d a whole number of vectors, at most 256.
bool attention_kernels_fit(int64_t d);

// Which path f32 attention takes from now on: "auto" (these kernels wherever they fit, else
// attention.cpp's Eigen path) or "eigen" (the reference path, always). The environment variable
// REMAT_CPU_ATTENTION sets the first choice; tests and benchmarks that compare them call this
// between calls. f64 always takes the Eigen path.
void set_attention_path(const std::string& name);
// Whether heads of dim d in f32 take the kernels now.
bool attention_kernels_chosen(int64_t d);
// The path in words, for benchmarks' headers: "avx512 kernels", "avx2 kernels" or "eigen".
std::string attention_path();

// A head's T rows of D floats, `ld` floats apart.
struct HeadRowsF32 {
  const float* base;
  int64_t ld;
};

// Scratch floats one call needs (each thread its own).
int64_t attention_forward_scratch(int64_t t, int64_t d);
int64_t attention_backward_scratch(int64_t t, int64_t d);

// o = softmax(scale q k^T, masked causally) v for one head, o's rows `o_ld` apart, and each
// row's log-sum-exp of the scaled scores in lse[0, t).
void attention_head_forward(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, float* o, int64_t o_ld, float* lse,
                            int64_t t, int64_t d, bool causal, float scale, float* scratch);

// dq, dk, dv for one head (t rows each, `grad_ld` floats apart; dk and dv zero on entry), the
// probabilities rebuilt from lse.
void attention_head_backward(HeadRowsF32 q, HeadRowsF32 k, HeadRowsF32 v, HeadRowsF32 o, HeadRowsF32 d_o,
                             const float* lse, float* dq, float* dk, float* dv, int64_t grad_ld, int64_t t, int64_t d,
                             bool causal, float scale, float* scratch);

}  // namespace remat::cpu
