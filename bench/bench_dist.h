// `remat-bench --ranks N` (under mpirun): data parallel step time per policy, the time the gradient
// all-reduce takes on its own, and how much of it hides behind backward when it overlaps with it.
#pragma once

#include <cstdint>

#include "bench_policies.h"

namespace remat::bench {

struct DataParallelBenchOptions {
  int ranks = 2;             // the number of processes mpirun started (checked)
  double bucket_mib = 25;    // DataParallel's bucket size
};

int run_data_parallel(const PolicyOptions& o, const DataParallelBenchOptions& d);

}  // namespace remat::bench
