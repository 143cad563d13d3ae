// The CUDA part of the static library: linked in, always there.
#include <cstring>

#include "module.h"
#include "runtime_api.h"

namespace remat {

bool cuda_part_built() { return true; }

void* cuda_part_entry(const char* name) {
  if (std::strcmp(name, "runtime") == 0) return remat_cuda_runtime_entry();
  if (std::strcmp(name, "kernels") == 0) return remat_cuda_kernels_entry();
  return nullptr;
}

const std::string& cuda_part_problem() {
  static const std::string none;
  return none;
}

}  // namespace remat
