// The CUDA backend object: which ops it has, and conv2d's error in a build without cuDNN.
#include "kernels/cuda/cuda_backend.h"

namespace remat {

bool CudaBackend::supports([[maybe_unused]] OpKind op) const {
#ifndef REMAT_HAVE_CUDNN
  if (op == OpKind::conv2d) return false;  // convolutions are cuDNN's (meson option -Dcudnn)
#endif
  return true;
}

#ifndef REMAT_HAVE_CUDNN
Tensor CudaBackend::conv2d(const Tensor&, const Tensor&, const Tensor&, int, int) {
  REMAT_FAIL("conv2d on cuda needs cuDNN: this build has none (meson option -Dcudnn)");
}
std::vector<Tensor> CudaBackend::conv2d_backward(const Tensor&, const Tensor&, const Tensor&, int, int, bool) {
  REMAT_FAIL("conv2d on cuda needs cuDNN: this build has none (meson option -Dcudnn)");
}
#endif

Backend* cuda_kernels() {
  static CudaBackend backend;
  return &backend;
}

}  // namespace remat
