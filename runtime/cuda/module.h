// How the runtime reaches the CUDA part of remat. In the shared library the CUDA part is a module
// (libremat_cuda.so) loaded on first use, so that libremat.so itself needs no CUDA library and loads
// on machines without them; in the static library it is linked in; in a build without CUDA it is
// absent. Each of module_dlopen.cpp, module_linked.cpp and module_absent.cpp implements this.
#pragma once

#include <string>

namespace remat {

// True when remat was compiled with its CUDA part (whether or not it loads here).
bool cuda_part_built();
// What the CUDA part's entry `name` returns ("runtime": the CudaRuntimeApi table, "kernels": the
// CUDA Backend), or null when there is no CUDA part here.
void* cuda_part_entry(const char* name);
// Why there is none, as the end of a sentence ("remat was built without CUDA ..."); "" when there is.
const std::string& cuda_part_problem();

}  // namespace remat
