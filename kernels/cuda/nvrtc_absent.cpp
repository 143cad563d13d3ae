// The NVRTC functions cuDNN's frontend names, as calls that fail. The frontend's headers compile an
// experimental engine (RMSNorm+SiLU on Blackwell) that builds kernels with NVRTC; remat never asks
// for it, so these keep libnvrtc out of the CUDA module's dependencies (a module with unresolved
// symbols would not load at all). Hidden: they bind inside the module and interpose on nothing. A
// call, should a later frontend make one, gets NVRTC_ERROR_INTERNAL_ERROR and cuDNN's path declines.
#pragma GCC visibility push(hidden)
#include <nvrtc.h>

#include <cstddef>

extern "C" {

nvrtcResult nvrtcCreateProgram(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*) {
  return NVRTC_ERROR_INTERNAL_ERROR;
}
nvrtcResult nvrtcDestroyProgram(nvrtcProgram*) { return NVRTC_ERROR_INTERNAL_ERROR; }
nvrtcResult nvrtcCompileProgram(nvrtcProgram, int, const char* const*) { return NVRTC_ERROR_INTERNAL_ERROR; }
nvrtcResult nvrtcGetCUBINSize(nvrtcProgram, size_t*) { return NVRTC_ERROR_INTERNAL_ERROR; }
nvrtcResult nvrtcGetCUBIN(nvrtcProgram, char*) { return NVRTC_ERROR_INTERNAL_ERROR; }
nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram, size_t*) { return NVRTC_ERROR_INTERNAL_ERROR; }
nvrtcResult nvrtcGetProgramLog(nvrtcProgram, char*) { return NVRTC_ERROR_INTERNAL_ERROR; }

}  // extern "C"

#pragma GCC visibility pop
