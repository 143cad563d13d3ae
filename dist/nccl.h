// NCCL for the process group's CUDA tensors. libnccl.so.2 is opened at first use, so libremat_dist
// needs NCCL only where CUDA tensors are exchanged (a pip wheel's folder on LD_LIBRARY_PATH does).
// Internal to remat::dist: ProcessGroup routes CUDA tensors here.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "../runtime/tensor.h"

namespace remat::dist {

// Whether this build can use NCCL (nccl.h was found), and whether the library loads here ("" if
// it does, else why not).
bool nccl_built();
std::string nccl_problem();

// One NCCL communicator over every rank of a group, on one device.
class NcclComm {
 public:
  // Collective: rank 0 makes the unique id and `share_id` gives it to every rank (128 bytes, in
  // place; over MPI). `peer_failed` returns a message when another rank reported a failure.
  NcclComm(int rank, int size, int device, const std::function<void(char* id, int bytes)>& share_id);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int device() const { return device_; }
  // Queued on the device's compute stream, in order with the kernels around them: `out` [size, ...]
  // gets every rank's `t`; `t` gets root's data.
  void all_gather(const Tensor& t, Tensor& out);
  void broadcast(Tensor& t, int root);
  // Until the compute stream has run what was queued: NCCL's asynchronous errors, a peer's failure
  // (`peer_failed` returns its message) and the timeout end it with an error (the communicator is
  // aborted then, and unusable).
  void wait(const char* op, double timeout_s, const std::function<std::string()>& peer_failed);

 private:
  void* comm_ = nullptr;  // ncclComm_t
  int device_;
  bool aborted_ = false;
};

}  // namespace remat::dist
