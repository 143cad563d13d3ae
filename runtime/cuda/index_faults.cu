// The per-GPU records of bad indices (runtime/cuda/index_faults.h) and the host's reading of them.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/index_faults.h"

namespace remat {

namespace {

constexpr int kMaxDevices = 64;

struct DeviceRecord {
  std::atomic<IndexFault*> record{nullptr};  // device memory, never freed (kernels may write until exit)
  std::atomic<bool> pending{false};  // a checking kernel was queued since the last read
};

std::mutex g_records_mutex;

DeviceRecord& slot(int index) {
  static auto* records = new DeviceRecord[kMaxDevices];
  REMAT_CHECK(index >= 0 && index < kMaxDevices, "cuda:", index, ": device index out of range");
  return records[index];
}

const char* op_name(IndexFaultOp op) {
  switch (op) {
    case IndexFaultOp::embedding: return "embedding";
    case IndexFaultOp::embedding_backward: return "embedding backward";
    case IndexFaultOp::cross_entropy: return "cross_entropy";
    case IndexFaultOp::cross_entropy_backward: return "cross_entropy backward";
    default: return nullptr;
  }
}

// The op's own message, as its host check words it, and where the fault was found.
std::string describe(const IndexFault& f, int device) {
  auto op = static_cast<IndexFaultOp>(f.op);
  std::string where = " (found on cuda:" + std::to_string(device) +
                      " and reported at the next synchronisation: what the step computed after it is not valid)";
  if (op_name(op) == nullptr)
    return "a CUDA kernel recorded a bad index of unknown origin (op " + std::to_string(f.op) + ")" + where;
  std::string got = ", got " + std::to_string(f.value);
  if (op == IndexFaultOp::embedding || op == IndexFaultOp::embedding_backward)
    return std::string(op_name(op)) + ": expected indices in [0, " + std::to_string(f.bound) + ")" + got +
           " at position " + std::to_string(f.position) + where;
  return std::string(op_name(op)) + ": expected targets in [0, " + std::to_string(f.bound) + ") or ignore_index " +
         std::to_string(f.ignore_index) + got + " at row " + std::to_string(f.position) + where;
}

}  // namespace

IndexFault* index_fault_record(int index) {
  DeviceRecord& d = slot(index);
  IndexFault* record = d.record.load(std::memory_order_acquire);
  if (record == nullptr) {
    std::lock_guard lock(g_records_mutex);
    record = d.record.load(std::memory_order_acquire);
    if (record == nullptr) {
      void* p = nullptr;
      REMAT_CUDA_CHECK(cudaMalloc(&p, sizeof(IndexFault)));
      REMAT_CUDA_CHECK(cudaMemset(p, 0, sizeof(IndexFault)));
      record = static_cast<IndexFault*>(p);
      d.record.store(record, std::memory_order_release);
    }
  }
  d.pending.store(true, std::memory_order_release);
  return record;
}

void throw_index_faults(int index) {
  if (index < 0 || index >= kMaxDevices) return;
  DeviceRecord& d = slot(index);
  // A kernel queued after this exchange marks the device again and is read next time.
  if (!d.pending.exchange(false, std::memory_order_acq_rel)) return;
  int current = 0;
  REMAT_CUDA_CHECK(cudaGetDevice(&current));
  REMAT_CUDA_CHECK(cudaSetDevice(index));
  IndexFault found{};
  // On the compute (legacy default) stream: after every checking kernel queued so far.
  IndexFault* record = d.record.load(std::memory_order_acquire);
  cudaError_t read = cudaMemcpy(&found, record, sizeof(IndexFault), cudaMemcpyDeviceToHost);
  cudaError_t clear = found.claimed != 0 && read == cudaSuccess ? cudaMemset(record, 0, sizeof(IndexFault)) : cudaSuccess;
  REMAT_CUDA_CHECK(cudaSetDevice(current));  // the caller's device stays current
  REMAT_CUDA_CHECK(read);
  REMAT_CUDA_CHECK(clear);
  if (found.claimed != 0) REMAT_FAIL(describe(found, index));
}

bool index_checks_on_host() {
  static const bool on_host = [] {
    const char* env = std::getenv("REMAT_CUDA_INDEX_CHECK");
    std::string value = env == nullptr ? "" : env;
    REMAT_CHECK(value.empty() || value == "device" || value == "host",
                "REMAT_CUDA_INDEX_CHECK: expected device or host, got '", value, "'");
    return value == "host";
  }();
  return on_host;
}

}  // namespace remat
