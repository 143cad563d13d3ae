// A group of processes that train together: MPI (Open MPI from Debian) for tensors on the host,
// NCCL for CUDA tensors (each rank on its own device; see dist/nccl.h).
// Every collective is deterministic: the same bits on every rank and on every run for a given
// number of ranks (sums run in rank order). Mismatched tensors across ranks, a rank that reported
// a failure, or a collective that does not finish within the timeout give a clear error on every
// rank that waits, never a hang. Without MPI in the build, or outside an MPI launcher, the world
// is one process and every collective is the identity.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../runtime/tensor.h"

namespace remat::dist {

class NcclComm;
struct HostSum;

// Whether this build has MPI.
bool mpi_built();
// This process's rank among those of the job on its machine (the launcher's OMPI_COMM_WORLD_LOCAL_RANK,
// or PMIx's / MPICH's equivalent); 0 outside a launcher.
int local_rank();

class ProcessGroup {
 public:
  // Every process of the job (MPI is initialised on first use and finalised at exit).
  static ProcessGroup& world();

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Seconds a rank waits in one collective before it gives up (default 300, or REMAT_DIST_TIMEOUT).
  void set_timeout(double seconds);
  double timeout() const { return timeout_s_; }

  // In place, on every rank: the sum over ranks, added in rank order. f32 or f64, contiguous; the
  // same shape and dtype on every rank (checked). Host tensors go through MPI, CUDA tensors through
  // NCCL (each rank on its own device; gathered, then added in rank order on the device).
  void all_reduce_sum(Tensor& t);
  // all_reduce_sum started now and finished later, so that the data travel while this rank
  // computes: poll() lets MPI move them (call it now and then), finish() waits and writes the sum.
  // On the host it moves 2 (P - 1) / P of the tensor per rank, as a ring does: each rank sums one
  // chunk (every rank's copy of it, in rank order), then the summed chunks are gathered everywhere.
  class PendingSum {
   public:
    PendingSum() = default;
    bool started() const { return sum_ != nullptr || done_; }
    bool poll();
    void finish();

   private:
    friend class ProcessGroup;
    ProcessGroup* group_ = nullptr;
    std::shared_ptr<HostSum> sum_;  // in flight on the host (null for CUDA tensors and one rank)
    bool done_ = false;
  };
  // shapes_checked: the caller has already made sure that every rank passes the same shape and
  // dtype here (DataParallel checks its buckets' layout once); skips the exchange of descriptions,
  // a round trip that would make each rank wait for the others before its data can leave.
  PendingSum start_all_reduce_sum(Tensor& t, bool shapes_checked = false);
  // The first half of an all-reduce, started now and finished later as above: t is this rank's
  // values, laid out as consecutive chunks of counts[r] elements, one per rank in rank order (the
  // same counts on every rank). Once finished, chunk r of t on rank r holds the sum over ranks,
  // added in rank order (all_reduce_sum's bits there); the other chunks are unspecified. On the
  // host it moves (P - 1) / P of the tensor per rank; CUDA tensors get the whole all_reduce_sum.
  PendingSum start_reduce_scatter_sum(Tensor& t, const std::vector<int64_t>& counts, bool shapes_checked = false);
  // The other half, in place: chunk r of t (laid out by counts as above) from rank r, on every rank.
  void all_gather_chunks(Tensor& t, const std::vector<int64_t>& counts, bool shapes_checked = false);
  // In place: `root`'s data on every rank.
  void broadcast(Tensor& t, int root = 0);
  // [size, ...t.shape]: every rank's t, in rank order.
  Tensor all_gather(const Tensor& t);
  void barrier();

  // Tells every other rank that this one failed (they throw "rank R failed: <what>" from the
  // collective they wait in, or the next one); call it before leaving a step on an exception.
  void report_failure(const std::string& what);

  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;
  ~ProcessGroup();

 private:
  ProcessGroup();
  // A failure another rank reported, "rank R failed: <what>", or "" (MPI; never blocks).
  std::string peer_failure();
  // The NCCL communicator of `device`, made collectively on first use; null for one process
  // without NCCL (collectives on CUDA tensors are then the identity).
  NcclComm* nccl_for(Device device);
  void wait_nccl(NcclComm& comm, const char* op);
  // Waits for a started request, polling for failure reports and the timeout.
  void wait(void* request, const char* op);
  // out[0, n) = the n-element rows of `gathered` added in rank order.
  void sum_gathered(void* out, DType dtype, const Tensor& gathered, int64_t n);
  // Starts a host sum of t over ranks, chunk r (counts[r] elements) summed by rank r; gathered
  // everywhere afterwards unless `scatter_only`.
  PendingSum start_host_sum(Tensor& t, const std::vector<int64_t>& counts, bool scatter_only);
  // Moves host sums on: phase 1 of the waiting sums in the order they started, then the target's
  // completion; blocks for them when `block`. True once the target's sum is written.
  bool advance(HostSum& target, bool block);
  // The checks every collective makes first: the group is usable, t is a contiguous f32/f64 tensor
  // (the same on every rank unless shapes_checked), counts has one entry per rank summing to t's size.
  void check_chunked(const Tensor& t, const std::vector<int64_t>& counts, bool shapes_checked, const char* op);
  // Throws on every rank unless every rank passes a tensor of the same shape and dtype (and the
  // same `chunks`, a description of how it is split).
  void check_same(const Tensor& t, const char* op, const std::string& chunks = "");
  [[noreturn]] void fail(const std::string& message);

  int rank_ = 0, size_ = 1;
  double timeout_s_ = 300;
  std::string failed_;  // set once this group can no longer be used
  std::map<int, std::unique_ptr<NcclComm>> nccl_;  // by device index
  std::deque<std::shared_ptr<HostSum>> waiting_;  // host sums in phase 0, in the order they started
};

}  // namespace remat::dist
