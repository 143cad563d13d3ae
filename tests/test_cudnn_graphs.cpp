// cuDNN's fused-attention graphs (kernels/cuda/attention_cudnn.cpp) checked without a GPU: cuDNN's
// frontend validates them (attributes, shapes, layouts, and its support checks for the target GPU
// and the cuDNN it runs with) for the problems remat hands it, and o and dO reach them in the
// layout they declare. Built where the build found cuDNN and its frontend; what needs the GPU
// (cuDNN's heuristics, the kernels) is test_cuda's.
#include <catch.hpp>

#include <array>
#include <cstdint>
#include <string>

#include "kernels/cuda/attention_cudnn.h"
#include "kernels/cuda/attention_heads.h"
#include "remat.h"

using namespace remat;
using remat::cuda::cudnn_attention_graphs_invalid;

namespace {

struct Problem {
  const char* description;
  std::array<int64_t, 4> shape;  // B, H, T, D
  bool packed;                   // heads of a [B, T, 3, H, D] projection, as gpt's; else [B, H, T, D] each
};

// The B, H and T strides of q, k and v.
std::array<int64_t, 9> strides_of(const Problem& p) {
  const int64_t h = p.shape[1], t = p.shape[2], d = p.shape[3];
  const std::array<int64_t, 3> one = p.packed ? std::array<int64_t, 3>{t * 3 * h * d, d, 3 * h * d}
                                              : std::array<int64_t, 3>{h * t * d, t * d, d};
  return {one[0], one[1], one[2], one[0], one[1], one[2], one[0], one[1], one[2]};
}

}  // namespace

TEST_CASE("cuDNN's attention graphs validate without a GPU for the problems remat hands them, on Ampere and Hopper",
          "[cudnn]") {
  const Problem problems[] = {
      {"gpt2: B 8, H 12, T 1024, D 64, heads of the qkv projection", {8, 12, 1024, 64}, true},
      {"B 2, H 3, T 100, D 64 (a tail of every tile)", {2, 3, 100, 64}, false},
      {"B 1, H 2, T 130, D 128", {1, 2, 130, 128}, false},
      {"B 1, H 2, T 96, D 16", {1, 2, 96, 16}, false},
      {"B 1, H 1, T 2, D 64", {1, 1, 2, 64}, false},
      {"B 2, H 4, T 80, D 64, packed", {2, 4, 80, 64}, true},
      {"gpt tiny with heads of 32 (test_cuda's): B 2, H 2, T 16, D 32, packed", {2, 2, 16, 32}, true},
      {"B 1, H 2, T 200, D 32", {1, 2, 200, 32}, false},
  };
  for (const Problem& p : problems)
    for (bool causal : {true, false})
      for (int sm : {80, 90}) {
        INFO(p.description << (causal ? ", causal" : "") << ", sm " << sm);
        CHECK(cudnn_attention_graphs_invalid(p.shape, strides_of(p), causal, 0.125f, sm) == "");
      }
}

TEST_CASE("problems cuDNN's frontend refuses are reported, not thrown", "[cudnn]") {
  // Head dims past 256 are beyond every cuDNN attention kernel; a single query and key has no
  // backward kernel (remat then takes the path `auto` would, both ways).
  const Problem refused[] = {{"D 512", {1, 1, 64, 512}, false}, {"T 1", {1, 1, 1, 64}, false}};
  for (const Problem& p : refused) {
    INFO(p.description);
    std::string why;
    REQUIRE_NOTHROW(why = cudnn_attention_graphs_invalid(p.shape, strides_of(p), true, 0.125f, 90));
    CHECK(why != "");
  }
}

TEST_CASE("o and dO reach cuDNN laid out [B, T, H, D]: as they are where they are, else copied so", "[cudnn]") {
  const Shape shape = {2, 3, 5, 8};
  const Strides bthd = {5 * 3 * 8, 8, 3 * 8, 1};
  Tensor values = Tensor::randn(shape);
  // Already so (an attention output): itself.
  Tensor heads = cuda::empty_heads(values);
  heads.view({2, 5, 3, 8}, {120, 24, 8, 1}, heads.offset()).copy_(permute(values, {0, 2, 1, 3}).as_contiguous());
  CHECK(cuda::in_bthd_layout(heads).raw_data() == heads.raw_data());
  CHECK(heads.to_vector<float>() == values.to_vector<float>());
  // Contiguous [B, H, T, D] (a gradient of a plain product), and a view of [B, H, D, T]: copies.
  for (const Tensor& x : {values, transpose(transpose(values, 2, 3).as_contiguous(), 2, 3)}) {
    Tensor y = cuda::in_bthd_layout(x);
    CHECK(y.strides() == bthd);
    CHECK(y.shape() == shape);
    CHECK(y.raw_data() != x.raw_data());
    CHECK(y.to_vector<float>() == values.to_vector<float>());
  }
}
