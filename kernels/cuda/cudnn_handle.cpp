// One cuDNN handle per GPU (cudnn_handle.h).
#include "kernels/cuda/cudnn_handle.h"

#include <array>
#include <mutex>

namespace remat::cuda {

cudnnHandle_t cudnn_handle(int device) {
  static std::mutex mutex;
  static std::array<cudnnHandle_t, 64> handles{};
  std::lock_guard lock(mutex);
  REMAT_CHECK(device >= 0 && device < 64, "cudnn: device index ", device, " out of range");
  if (!handles[device]) REMAT_CUDNN_CHECK(cudnnCreate(&handles[device]));
  return handles[device];
}

}  // namespace remat::cuda
