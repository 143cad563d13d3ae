// `remat-bench ops`: GFLOP/s of the GEMM paths (matmul, linear) and timings of the fused ops.
#pragma once

#include <string>
#include <vector>

namespace remat::bench {

struct OpsOptions {
  std::string device = "cpu";
  int repeats = 10;
  std::string json_path;  // empty: no JSON
  // On cuda, the attention paths to time at gpt2's shape (attention_variants(); empty: all of
  // them, "none": none).
  std::vector<std::string> attention;
};

// The names --attention takes.
std::vector<std::string> attention_variants();

int run_ops(const OpsOptions& options);

}  // namespace remat::bench
