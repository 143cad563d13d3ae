// Backend selection by device, and op-name parsing.
#include "kernels/backend.h"

#include "kernels/cpu/cpu_backend.h"
#include "runtime/cuda_backend.h"

namespace remat {

OpKind parse_op(const std::string& name) {
  std::string known;
  for (int i = 0; i < kOpCount; ++i) {
    if (name == kOpInfo[i].name) return static_cast<OpKind>(i);
    known += (i ? ", " : "") + std::string(kOpInfo[i].name);
  }
  REMAT_FAIL("unknown op '", name, "': expected one of ", known);
}

Backend& backend_for(Device device) {
  static CpuBackend cpu;
  if (device.is_cpu()) return cpu;
  // The CUDA runtime (device discovery, allocator, copies) is built; its kernels are not yet.
  REMAT_FAIL("no kernels for ", device.str(), " in this build: the cuda backend has none yet (",
             cuda_built() ? "CUDA runtime built" : "built without CUDA", ")");
}

Backend& backend_for(OpKind op, Device device) {
  Backend& backend = backend_for(device);
  REMAT_CHECK(backend.supports(op), "the ", backend.name(), " backend has no kernel for op ", op_name(op));
  return backend;
}

}  // namespace remat
