// Backend selection by device, and op-name parsing.
#include "kernels/backend.h"

#include "kernels/cpu/cpu_backend.h"
#include "runtime/cuda/module.h"

namespace remat {

OpKind parse_op(const std::string& name) {
  std::string known;
  for (int i = 0; i < kOpCount; ++i) {
    if (name == kOpInfo[i].name) return static_cast<OpKind>(i);
    known += (i ? ", " : "") + std::string(kOpInfo[i].name);
  }
  REMAT_FAIL("unknown op '", name, "': expected one of ", known);
}

Backend* cuda_kernels() {
  static auto* backend = static_cast<Backend*>(cuda_part_entry("kernels"));
  return backend;
}

Backend& backend_for(Device device) {
  static CpuBackend cpu;
  if (device.is_cpu()) return cpu;
  Backend* cuda = cuda_kernels();
  REMAT_CHECK(cuda, "no kernels for ", device.str(), ": ", cuda_part_problem());
  return *cuda;
}

Backend& backend_for(OpKind op, Device device) {
  Backend& backend = backend_for(device);
  REMAT_CHECK(backend.supports(op), "the ", backend.name(), " backend has no kernel for op ", op_name(op));
  return backend;
}

}  // namespace remat
