// A build without CUDA: no CUDA part.
#include "module.h"

namespace remat {

bool cuda_part_built() { return false; }

void* cuda_part_entry(const char*) { return nullptr; }

const std::string& cuda_part_problem() {
  static const std::string why = "remat was built without CUDA (meson option -Dcuda)";
  return why;
}

}  // namespace remat
