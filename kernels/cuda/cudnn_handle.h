// One cuDNN handle per GPU, shared by the cuDNN paths (convolutions, fused attention). Host-only.
#pragma once

#include <cudnn.h>

#include "runtime/cuda/cuda_check.h"

#define REMAT_CUDNN_CHECK(expr) REMAT_STATUS_CHECK(expr, CUDNN_STATUS_SUCCESS, cudnnGetErrorString)

namespace remat::cuda {

// Device `device`'s handle, created at its first use and kept for the process. It runs on the
// default stream, where every kernel of the backend runs.
cudnnHandle_t cudnn_handle(int device);

}  // namespace remat::cuda
