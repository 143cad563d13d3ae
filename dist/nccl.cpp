// NCCL, opened with dlopen: the few entry points the process group uses, and a communicator that
// waits with a timeout instead of hanging.
#include "dist/nccl.h"

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "runtime/cuda_backend.h"
#include "runtime/error.h"

#ifdef REMAT_HAVE_NCCL
#include <nccl.h>
#endif

namespace remat::dist {

#ifdef REMAT_HAVE_NCCL
namespace {

struct NcclLibrary {
  std::string problem;  // "" when loaded
  ncclResult_t (*get_unique_id)(ncclUniqueId*) = nullptr;
  ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*all_gather)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*broadcast)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*comm_get_async_error)(ncclComm_t, ncclResult_t*) = nullptr;
  ncclResult_t (*comm_abort)(ncclComm_t) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
  const char* (*error_string)(ncclResult_t) = nullptr;

  NcclLibrary() {
    // REMAT_NCCL_LIBRARY: another build of NCCL, or the emulated GPU's one-rank NCCL in tests.
    const char* chosen = std::getenv("REMAT_NCCL_LIBRARY");
    const std::string path = chosen && *chosen ? chosen : "libnccl.so.2";
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      problem = path + " could not be loaded (" + (why ? why : "unknown reason") +
                "); install NCCL (the nvidia-nccl-cu13 wheel, or the CUDA toolkit's) and put its lib folder on "
                "LD_LIBRARY_PATH, or name the library in REMAT_NCCL_LIBRARY";
      return;
    }
    auto find = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn && problem.empty()) problem = path + " lacks " + name;
    };
    find(get_unique_id, "ncclGetUniqueId");
    find(comm_init_rank, "ncclCommInitRank");
    find(all_gather, "ncclAllGather");
    find(broadcast, "ncclBroadcast");
    find(comm_get_async_error, "ncclCommGetAsyncError");
    find(comm_abort, "ncclCommAbort");
    find(comm_destroy, "ncclCommDestroy");
    find(error_string, "ncclGetErrorString");
  }
};

const NcclLibrary& nccl() {
  static const NcclLibrary lib;
  return lib;
}

void check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess && r != ncclInProgress) REMAT_FAIL("NCCL ", what, ": ", nccl().error_string(r));
}

ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i64: return ncclInt64;
    case DType::i32: return ncclInt32;
    case DType::u8: return ncclUint8;
    default: REMAT_FAIL("NCCL: no NCCL type for ", dtype_name(d));
  }
}

}  // namespace

bool nccl_built() { return true; }
std::string nccl_problem() { return nccl().problem; }

NcclComm::NcclComm(int rank, int size, int device, const std::function<void(char*, int)>& share_id) : device_(device) {
  const NcclLibrary& lib = nccl();
  REMAT_CHECK(lib.problem.empty(), "CUDA tensors across processes need NCCL, but ", lib.problem);
  ncclUniqueId id{};
  if (rank == 0) check(lib.get_unique_id(&id), "unique id");
  share_id(id.internal, static_cast<int>(sizeof(id.internal)));
  cuda_set_device(device);
  ncclComm_t comm = nullptr;
  check(lib.comm_init_rank(&comm, size, id, rank), "communicator");
  comm_ = comm;
}

NcclComm::~NcclComm() {
  if (!comm_) return;
  if (aborted_) return;
  nccl().comm_destroy(static_cast<ncclComm_t>(comm_));
}

void NcclComm::all_gather(const Tensor& t, Tensor& out) {
  REMAT_CHECK(!aborted_, "NCCL all_gather: the communicator was aborted by an earlier failure");
  cuda_set_device(device_);
  check(nccl().all_gather(t.raw_data(), out.raw_data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                          static_cast<ncclComm_t>(comm_), nullptr),
        "all_gather");
  out.storage()->bump_version();
}

void NcclComm::broadcast(Tensor& t, int root) {
  REMAT_CHECK(!aborted_, "NCCL broadcast: the communicator was aborted by an earlier failure");
  cuda_set_device(device_);
  check(nccl().broadcast(t.raw_data(), t.raw_data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), root,
                         static_cast<ncclComm_t>(comm_), nullptr),
        "broadcast");
  t.storage()->bump_version();
}

void NcclComm::wait(const char* op, double timeout_s, const std::function<std::string()>& peer_failed) {
  auto start = std::chrono::steady_clock::now();
  auto comm = static_cast<ncclComm_t>(comm_);
  auto abort_with = [&](const std::string& message) {
    nccl().comm_abort(comm);
    aborted_ = true;
    REMAT_FAIL(message);
  };
  for (int spins = 0; !cuda_compute_idle(device_); ++spins) {
    ncclResult_t async = ncclSuccess;
    nccl().comm_get_async_error(comm, &async);
    if (async != ncclSuccess && async != ncclInProgress)
      abort_with(detail::concat(op, " on cuda:", device_, ": NCCL failed: ", nccl().error_string(async)));
    std::string failed = peer_failed ? peer_failed() : std::string();
    if (!failed.empty()) abort_with(detail::concat(op, " on cuda:", device_, ": ", failed));
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s)
      abort_with(detail::concat(op, " on cuda:", device_, " did not finish within ", timeout_s,
                                " s: another rank died, is stuck, or did not reach this collective"));
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

#else

bool nccl_built() { return false; }
std::string nccl_problem() { return "this build has no NCCL (nccl.h was not found with the CUDA toolkit)"; }

NcclComm::NcclComm(int, int, int device, const std::function<void(char*, int)>&) : device_(device) {
  REMAT_FAIL("CUDA tensors across processes need NCCL, but ", nccl_problem());
}
NcclComm::~NcclComm() = default;
void NcclComm::all_gather(const Tensor&, Tensor&) {}
void NcclComm::broadcast(Tensor&, int) {}
void NcclComm::wait(const char*, double, const std::function<std::string()>&) {}

#endif

}  // namespace remat::dist
