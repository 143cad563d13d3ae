// The CUDA backend object: which ops it has (all of them; conv2d without cuDNN runs as im2col + GEMM).
#include "kernels/cuda/cuda_backend.h"
#include "runtime/cuda/runtime_api.h"

namespace remat {

bool CudaBackend::supports(OpKind) const { return true; }

Tensor cuda_kernels_copy_strided(const Tensor& t) {
  return static_cast<Backend*>(remat_cuda_kernels_entry())->copy_strided(t);
}

// The CUDA part's Backend, as runtime/cuda/module.h hands it to kernels/backend.cpp.
extern "C" void* remat_cuda_kernels_entry() {
  static CudaBackend backend;
  return &backend;
}

}  // namespace remat
