// One rank's NCCL for the emulated GPU: a communicator of one process whose all-gather and
// broadcast are copies queued on the given stream, as NCCL's kernels are, so they run in order with
// the kernels around them. Built into libremat_cuda_emulated.so; remat opens it in place of
// libnccl.so.2 when REMAT_NCCL_LIBRARY names the module (tools/run_tests.py does). What it cannot
// tell: NCCL's own behaviour, and anything about more than one rank.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>

// nccl.h leaves the communicator's type incomplete: here it is the device it was made on.
struct ncclComm {
  int device = 0;
};

namespace {

size_t bytes_of(ncclDataType_t type) {
  switch (type) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
  }
}

// A copy on the communicator's device, queued on `stream` (nullptr: that device's compute stream).
ncclResult_t copy(const void* from, void* to, size_t count, ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) {
  int device = -1;
  cudaGetDevice(&device);
  size_t width = bytes_of(type);
  if (comm == nullptr || device != comm->device || width == 0) return ncclInvalidArgument;  // NCCL: another device's comm
  if (from == to || count == 0) return ncclSuccess;
  return cudaMemcpyAsync(to, from, count * width, cudaMemcpyDeviceToDevice, stream) == cudaSuccess ? ncclSuccess
                                                                                                   : ncclUnhandledCudaError;
}

}  // namespace

extern "C" {

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id, 0, sizeof(*id));
  std::strcpy(id->internal, "fake_nccl, one rank");
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (nranks != 1 || rank != 0 || std::strcmp(id.internal, "fake_nccl, one rank") != 0) return ncclInvalidUsage;
  *comm = new ncclComm;
  cudaGetDevice(&(*comm)->device);
  return ncclSuccess;
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream) {
  return copy(send, recv, count, type, comm, stream);
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm,
                           cudaStream_t stream) {
  if (root != 0) return ncclInvalidArgument;
  return copy(send, recv, count, type, comm, stream);
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* error) {
  if (comm == nullptr) return ncclInvalidArgument;
  *error = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclInvalidArgument: return "invalid argument (fake_nccl)";
    case ncclInvalidUsage: return "invalid usage (fake_nccl: one rank only)";
    case ncclUnhandledCudaError: return "unhandled cuda error (fake_nccl)";
    default: return "an NCCL error (fake_nccl)";
  }
}

}  // extern "C"
