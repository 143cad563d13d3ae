// `remat-bench soak`: many training steps per policy with the allocator's counters and the
// process's resident memory sampled along the way; live memory must be flat after warm-up.
#pragma once

#include <string>
#include <vector>

namespace remat::bench {

struct SoakOptions {
  std::string config = "tiny";
  std::vector<std::string> policies = {"none", "full", "ops", "block_skip:2", "level:3"};
  int64_t steps = 1000;
  int samples = 10;  // evenly spaced over the run, the first at step 10
  std::string json_path;
};

// Prints a table per policy; returns 1 when live bytes after the last step differ from after step 10.
int run_soak(const SoakOptions& options);

}  // namespace remat::bench
