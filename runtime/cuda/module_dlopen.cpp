// The CUDA part of the shared library: libremat_cuda.so beside libremat.so (or REMAT_CUDA_MODULE),
// loaded once on first use. A machine without CUDA's libraries fails that load, and only that: the
// CPU keeps working and a request for a GPU says what the loader said.
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "module.h"

namespace remat {

namespace {

struct CudaPart {
  void* handle = nullptr;
  std::string problem;
};

// The folder of the libremat.so this code is part of.
std::string own_folder() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cuda_part_entry), &info) == 0 || info.dli_fname == nullptr) return ".";
  std::string path = info.dli_fname;
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

const CudaPart& cuda_part() {
  static const CudaPart part = [] {
    CudaPart p;
    const char* chosen = std::getenv("REMAT_CUDA_MODULE");
    std::string path = chosen != nullptr && *chosen != '\0' ? chosen : own_folder() + "/libremat_cuda.so";
    p.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (p.handle == nullptr) {
      const char* why = dlerror();
      p.problem = "the CUDA part of remat (" + path + ") could not be loaded: " + (why ? why : "unknown reason");
    }
    return p;
  }();
  return part;
}

}  // namespace

bool cuda_part_built() { return true; }

void* cuda_part_entry(const char* name) {
  const CudaPart& part = cuda_part();
  if (part.handle == nullptr) return nullptr;
  std::string symbol = std::string("remat_cuda_") + name + "_entry";
  void* entry = dlsym(part.handle, symbol.c_str());
  return entry != nullptr ? reinterpret_cast<void* (*)()>(entry)() : nullptr;
}

const std::string& cuda_part_problem() { return cuda_part().problem; }

}  // namespace remat
