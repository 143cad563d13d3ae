// The CUDA backend object: which ops it has (all of them; conv2d without cuDNN runs as im2col + GEMM).
#include "kernels/cuda/cuda_backend.h"

namespace remat {

bool CudaBackend::supports(OpKind) const { return true; }

Backend* cuda_kernels() {
  static CudaBackend backend;
  return &backend;
}

}  // namespace remat
