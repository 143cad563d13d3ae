// `remat-bench ops`: GFLOP/s of the GEMM paths (matmul, linear) and timings of the fused ops.
#pragma once

#include <string>

namespace remat::bench {

struct OpsOptions {
  std::string device = "cpu";
  int repeats = 10;
  std::string json_path;  // empty: no JSON
};

int run_ops(const OpsOptions& options);

}  // namespace remat::bench
