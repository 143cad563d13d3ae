// A kernel's scratch tensors: new storage counted under the workspace category, whatever the
// caller's category, so that activation figures hold only what the tape keeps.
#pragma once

#include "allocator.h"
#include "tensor.h"

namespace remat {

inline Tensor empty_workspace(const Shape& shape, DType dtype, Device device = Device::cpu()) {
  MemoryCategoryScope scope(MemoryCategory::workspace);
  return Tensor::empty(shape, dtype, device);
}

}  // namespace remat
