// REMAT_CUDA_CHECK and friends: one generic macro turns a failed status into remat::Error.
#pragma once

#include <cuda_runtime.h>

#include "../error.h"

#define REMAT_STATUS_CHECK(expr, ok, to_string)                                                   \
  do {                                                                                           \
    auto remat_status_ = (expr);                                                                 \
    REMAT_CHECK(remat_status_ == (ok), #expr " failed: ", to_string(remat_status_));             \
  } while (0)

#define REMAT_CUDA_CHECK(expr) REMAT_STATUS_CHECK(expr, cudaSuccess, cudaGetErrorString)

// For destructors: report, never throw.
#define REMAT_CUDA_CHECK_NOTHROW(expr)                                                            \
  do {                                                                                           \
    cudaError_t remat_status_ = (expr);                                                          \
    if (remat_status_ != cudaSuccess)                                                            \
      fprintf(stderr, "remat: %s failed: %s\n", #expr, cudaGetErrorString(remat_status_));       \
  } while (0)
