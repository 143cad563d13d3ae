// `remat-bench ops`: GFLOP/s of the GEMM paths (matmul, linear) and timings of the fused ops.
#pragma once

#include <string>
#include <vector>

namespace remat::bench {

struct OpsOptions {
  std::string device = "cpu";
  int repeats = 10;
  std::string json_path;  // empty: no JSON
  // On cuda, the attention paths to time at gpt2's shape (attention_variants(); "none": none).
  std::vector<std::string> attention = {"mma", "mma-1tile", "gemm", "cudnn"};
};

// The names --attention takes.
std::vector<std::string> attention_variants();

int run_ops(const OpsOptions& options);

}  // namespace remat::bench
