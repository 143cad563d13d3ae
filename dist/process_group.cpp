// The process group: MPI when the build has it and an MPI launcher started the process; else one
// process. Collectives are non-blocking MPI calls waited on with failure reports and a deadline.
#include "dist/process_group.h"

#include <algorithm>
#include <climits>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "dist/nccl.h"
#include "kernels/backend.h"
#include "runtime/error.h"

#ifdef REMAT_HAVE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: MPI's C++ bindings are deprecated and warn
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace remat::dist {

namespace {

constexpr int kFailureTag = 7117;  // point-to-point messages that report a failed rank
constexpr size_t kMetaBytes = 128;  // one tensor's description, exchanged before each collective

#ifdef REMAT_HAVE_MPI
// Started by an MPI launcher (Open MPI's mpirun, or any PMI/PMIx launcher).
bool under_launcher() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_RANK");
}

struct Mpi {
  MPI_Comm comm = MPI_COMM_NULL;
  // The second phase of host sums (HostSum), which starts in the order the sums started but at
  // times that differ between ranks: on its own communicator, it never interleaves with the
  // collectives the program starts on `comm`.
  MPI_Comm gather_comm = MPI_COMM_NULL;
  bool owned = false;
  bool broken = false;  // a collective was abandoned: finalising could wait for it forever
  Mpi() {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
      owned = true;
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    MPI_Comm_dup(MPI_COMM_WORLD, &gather_comm);
    MPI_Comm_set_errhandler(gather_comm, MPI_ERRORS_RETURN);
  }
  ~Mpi() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (owned && !finalised && !broken) MPI_Finalize();
  }
};

Mpi& mpi() {
  static Mpi m;
  return m;
}

MPI_Datatype mpi_type(DType d) { return d == DType::f64 ? MPI_DOUBLE : MPI_FLOAT; }
#endif

// ((rank 0 + rank 1) + rank 2) + ...: one pass per rank over contiguous rows, which vectorises.
template <typename T>
void sum_in_rank_order(T* out, const T* gathered, int64_t n, int size) {
  const T* first = gathered;
  const T* second = size > 1 ? gathered + n : nullptr;
  if (second) {
    for (int64_t i = 0; i < n; ++i) out[i] = first[i] + second[i];
  } else {
    std::memcpy(out, first, static_cast<size_t>(n) * sizeof(T));
  }
  for (int r = 2; r < size; ++r) {
    const T* row = gathered + static_cast<int64_t>(r) * n;
    for (int64_t i = 0; i < n; ++i) out[i] += row[i];
  }
}

void check_tensor(const Tensor& t, const char* op) {
  REMAT_CHECK(t.defined(), op, ": expected a tensor, got an undefined one");
  REMAT_CHECK(t.device().is_cpu() || nccl_built(), op, ": expected a tensor on the host (MPI), got ", t.meta_str(),
              " (CUDA tensors go through NCCL, which this build lacks: ", nccl_problem(), ")");
  REMAT_CHECK(t.is_contiguous(), op, ": expected a contiguous tensor, got a strided view ", t.meta_str());
}

#ifdef REMAT_HAVE_MPI
// What must agree across ranks: dtype, shape and the kind of device (each rank has its own GPU).
std::string layout_str(const Tensor& t) {
  return detail::concat(dtype_name(t.dtype()), shape_str(t.shape()), t.device().is_cuda() ? " on cuda" : " on cpu");
}
#endif

}  // namespace

// A sum of host tensors in flight, in two phases that move 2 (P - 1) / P of the tensor per rank,
// as a ring does (an all-gather of whole tensors moves P - 1 of them): (0) each rank receives every
// rank's copy of its own chunk (all-to-all) and adds them in rank order; (1) the summed chunks are
// gathered everywhere. Phase 1 starts strictly in the order the sums started (the group's FIFO of
// waiting sums), on its own communicator, so every rank issues both kinds of call in one order.
struct HostSum {
  Tensor tensor;
  Tensor chunks;  // this rank's chunk from every rank, in rank order
#ifdef REMAT_HAVE_MPI
  MPI_Request request = MPI_REQUEST_NULL;
#endif
  int phase = 0;
  bool done = false;
  bool scatter_only = false;  // done after phase 0 (a reduce-scatter)
  std::vector<int> counts, offsets;      // chunk r: counts[r] elements at offsets[r] (must outlive the calls)
  std::vector<int> mine, mine_offsets;   // this rank's chunk as sent by each rank
};

bool mpi_built() {
#ifdef REMAT_HAVE_MPI
  return true;
#else
  return false;
#endif
}

int local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(name)) {
      char* end = nullptr;
      long r = std::strtol(v, &end, 10);
      if (end != v && *end == 0 && r >= 0 && r < INT_MAX) return static_cast<int>(r);
    }
  return 0;
}

ProcessGroup& ProcessGroup::world() {
  static ProcessGroup group;
  return group;
}

ProcessGroup::ProcessGroup() {
  if (const char* t = std::getenv("REMAT_DIST_TIMEOUT")) {
    char* end = nullptr;
    double s = std::strtod(t, &end);
    REMAT_CHECK(end != t && *end == 0 && s > 0, "REMAT_DIST_TIMEOUT: expected a positive number of seconds, got '", t, "'");
    timeout_s_ = s;
  }
#ifdef REMAT_HAVE_MPI
  if (!under_launcher()) return;
  MPI_Comm_rank(mpi().comm, &rank_);
  MPI_Comm_size(mpi().comm, &size_);
#endif
}

void ProcessGroup::set_timeout(double seconds) {
  REMAT_CHECK(seconds > 0, "process group timeout: expected seconds > 0, got ", seconds);
  timeout_s_ = seconds;
}

void ProcessGroup::fail(const std::string& message) {
  failed_ = message;
#ifdef REMAT_HAVE_MPI
  if (size_ > 1) mpi().broken = true;
#endif
  REMAT_FAIL(message);
}

void ProcessGroup::wait(void* request, const char* op) {
#ifdef REMAT_HAVE_MPI
  auto* req = static_cast<MPI_Request*>(request);
  auto start = std::chrono::steady_clock::now();
  for (int spins = 0;; ++spins) {
    int done = 0;
    int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) fail(detail::concat(op, " on rank ", rank_, ": MPI error ", rc));
    if (done) return;
    std::string failed = peer_failure();
    if (!failed.empty()) fail(detail::concat(op, " on rank ", rank_, ": ", failed));
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s_)
      fail(detail::concat(op, " on rank ", rank_, " did not finish within ", timeout_s_,
                          " s: another rank died, is stuck, or did not reach this collective"));
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
#else
  (void)request;
  (void)op;
#endif
}

std::string ProcessGroup::peer_failure() {
#ifdef REMAT_HAVE_MPI
  if (size_ == 1) return "";
  int reported = 0;
  MPI_Status status;
  MPI_Iprobe(MPI_ANY_SOURCE, kFailureTag, mpi().comm, &reported, &status);
  if (!reported) return "";
  int n = 0;
  MPI_Get_count(&status, MPI_CHAR, &n);
  std::string what(static_cast<size_t>(n), '\0');
  MPI_Recv(what.data(), n, MPI_CHAR, status.MPI_SOURCE, kFailureTag, mpi().comm, MPI_STATUS_IGNORE);
  return detail::concat("rank ", status.MPI_SOURCE, " failed: ", what);
#else
  return "";
#endif
}

ProcessGroup::~ProcessGroup() {
  // The world lives until exit, when the CUDA runtime may already be gone: its communicators are
  // left to the end of the process rather than destroyed through it.
  for (auto& [device, comm] : nccl_) (void)comm.release();
}

NcclComm* ProcessGroup::nccl_for(Device device) {
  auto found = nccl_.find(device.index);
  if (found != nccl_.end()) return found->second.get();
  if (size_ == 1 && !nccl_problem().empty()) return nullptr;  // one process: the identity will do
  auto share_id = [this](char* id, int bytes) {
    if (size_ == 1) return;
    Tensor t = Tensor::empty({bytes}, DType::u8);
    std::memcpy(t.raw_data(), id, static_cast<size_t>(bytes));
    broadcast(t, 0);
    std::memcpy(id, t.raw_data(), static_cast<size_t>(bytes));
  };
  auto comm = std::make_unique<NcclComm>(rank_, size_, device.index, share_id);
  return (nccl_[device.index] = std::move(comm)).get();
}

void ProcessGroup::wait_nccl(NcclComm& comm, const char* op) {
  try {
    comm.wait(op, timeout_s_, [this] { return peer_failure(); });
  } catch (const Error& e) {
    fail(detail::concat(e.message(), " (rank ", rank_, ")"));
  }
}

void ProcessGroup::check_same(const Tensor& t, const char* op, const std::string& chunks) {
  REMAT_CHECK(failed_.empty(), op, ": the process group failed earlier (", failed_, ")");
  check_tensor(t, op);
  if (size_ == 1) return;
#ifdef REMAT_HAVE_MPI
  // Every rank's description of its tensor, compared on every rank: all agree on the verdict.
  char mine[kMetaBytes] = {};
  std::string meta = layout_str(t) + chunks;
  std::memcpy(mine, meta.data(), std::min(meta.size(), kMetaBytes - 1));
  std::vector<char> all(kMetaBytes * static_cast<size_t>(size_));
  MPI_Request req;
  MPI_Iallgather(mine, kMetaBytes, MPI_CHAR, all.data(), kMetaBytes, MPI_CHAR, mpi().comm, &req);
  wait(&req, op);
  bool same = true;
  for (int r = 1; r < size_; ++r) same = same && std::strcmp(&all[kMetaBytes * r], all.data()) == 0;
  if (same) return;
  std::string list;
  for (int r = 0; r < size_; ++r) list += detail::concat(r ? ", " : "", "rank ", r, " has ", &all[kMetaBytes * r]);
  REMAT_FAIL(op, ": expected the same shape and dtype", chunks.empty() ? "" : " in the same chunks",
             " on every rank; ", list);
#else
  (void)chunks;
#endif
}

ProcessGroup::PendingSum ProcessGroup::start_all_reduce_sum(Tensor& t, bool shapes_checked) {
  if (shapes_checked) {
    REMAT_CHECK(failed_.empty(), "all_reduce: the process group failed earlier (", failed_, ")");
    check_tensor(t, "all_reduce");
  } else {
    check_same(t, "all_reduce");
  }
  REMAT_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, "all_reduce: expected f32 or f64, got ", t.meta_str());
  PendingSum pending;
  pending.group_ = this;
  if (t.device().is_cuda()) {
    // NCCL: every rank's tensor gathered on the device, then added in rank order by the device's
    // own kernels (deterministic), all queued in order on the compute stream.
    pending.done_ = true;
    NcclComm* comm = nccl_for(t.device());
    if (!comm) return pending;
    const int64_t n = t.numel();
    Tensor gathered = Tensor::empty({size_, n}, t.dtype(), t.device());
    comm->all_gather(t, gathered);
    Backend& kernels = backend_for(t.device());
    Tensor sum = gathered.view({n}, {1}, 0);
    for (int r = 1; r < size_; ++r) sum = kernels.binary(BinaryFn::add, sum, gathered.view({n}, {1}, r * n));
    copy_bytes(t.raw_data(), t.device(), sum.raw_data(), t.device(), t.nbytes());
    t.storage()->bump_version();
    wait_nccl(*comm, "all_reduce");
    return pending;
  }
  if (size_ == 1) {
    pending.done_ = true;
    return pending;
  }
  const int64_t n = t.numel();
  std::vector<int64_t> counts;
  for (int r = 0; r < size_; ++r) counts.push_back(n / size_ + (r < n % size_ ? 1 : 0));
  return start_host_sum(t, counts, /*scatter_only=*/false);
}

void ProcessGroup::check_chunked(const Tensor& t, const std::vector<int64_t>& counts, bool shapes_checked,
                                 const char* op) {
  REMAT_CHECK(failed_.empty(), op, ": the process group failed earlier (", failed_, ")");
  check_tensor(t, op);
  REMAT_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, op, ": expected f32 or f64, got ", t.meta_str());
  REMAT_CHECK(static_cast<int>(counts.size()) == size_, op, ": expected one chunk size per rank (", size_,
              "), got ", counts.size());
  int64_t total = 0;
  for (int64_t c : counts) {
    REMAT_CHECK(c >= 0, op, ": expected chunk sizes >= 0, got ", c);
    total += c;
  }
  REMAT_CHECK(total == t.numel(), op, ": the chunks hold ", total, " elements, the tensor ", t.numel());
  REMAT_CHECK(total <= INT32_MAX, op, ": expected at most 2^31 - 1 elements per call, got ", total);
  if (shapes_checked) return;
  // The chunk sizes join the description every rank compares: the first few, and a hash of all
  // (the description has a fixed size).
  std::string chunks = " in chunks ";
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the sizes
  for (size_t r = 0; r < counts.size(); ++r) {
    if (r < 4) chunks += detail::concat(r ? "," : "", counts[r]);
    for (int byte = 0; byte < 8; ++byte)
      hash = (hash ^ ((static_cast<uint64_t>(counts[r]) >> (8 * byte)) & 0xff)) * 1099511628211ull;
  }
  if (counts.size() > 4) chunks += detail::concat(",... #", hash % 1000003);
  check_same(t, op, chunks);
}

ProcessGroup::PendingSum ProcessGroup::start_reduce_scatter_sum(Tensor& t, const std::vector<int64_t>& counts,
                                                                bool shapes_checked) {
  check_chunked(t, counts, shapes_checked, "reduce_scatter");
  if (t.device().is_cuda()) return start_all_reduce_sum(t, /*shapes_checked=*/true);
  if (size_ == 1) {
    PendingSum pending;
    pending.group_ = this;
    pending.done_ = true;
    return pending;
  }
  return start_host_sum(t, counts, /*scatter_only=*/true);
}

ProcessGroup::PendingSum ProcessGroup::start_host_sum(Tensor& t, const std::vector<int64_t>& counts,
                                                      bool scatter_only) {
  PendingSum pending;
  pending.group_ = this;
#ifdef REMAT_HAVE_MPI
  // Each element summed in rank order by the rank owning its chunk (HostSum): the same bits on
  // every rank and every run, and the same as adding whole gathered tensors in rank order.
  const int64_t n = t.numel();
  REMAT_CHECK(n <= INT32_MAX, "all_reduce: expected at most 2^31 - 1 elements per call, got ", n);
  auto sum = std::make_shared<HostSum>();
  sum->tensor = t;
  sum->scatter_only = scatter_only;
  for (int r = 0, at = 0; r < size_; ++r) {
    sum->counts.push_back(static_cast<int>(counts[static_cast<size_t>(r)]));
    sum->offsets.push_back(at);
    at += sum->counts.back();
  }
  const int len = sum->counts[static_cast<size_t>(rank_)];
  for (int r = 0; r < size_; ++r) {
    sum->mine.push_back(len);
    sum->mine_offsets.push_back(r * len);
  }
  sum->chunks = Tensor::empty({size_, len}, t.dtype());
  MPI_Ialltoallv(t.raw_data(), sum->counts.data(), sum->offsets.data(), mpi_type(t.dtype()), sum->chunks.raw_data(),
                 sum->mine.data(), sum->mine_offsets.data(), mpi_type(t.dtype()), mpi().comm, &sum->request);
  waiting_.push_back(sum);
  pending.sum_ = sum;
#else
  (void)t, (void)counts, (void)scatter_only;
  pending.done_ = true;
#endif
  return pending;
}

void ProcessGroup::all_gather_chunks(Tensor& t, const std::vector<int64_t>& counts, bool shapes_checked) {
  check_chunked(t, counts, shapes_checked, "all_gather");
  if (t.device().is_cuda()) {  // each chunk broadcast from its rank
    int64_t at = 0;
    for (int r = 0; r < size_; ++r) {
      const int64_t len = counts[static_cast<size_t>(r)];
      if (len > 0) {
        Tensor chunk = t.view({len}, {1}, t.offset() + at);
        broadcast(chunk, r);
      }
      at += len;
    }
    return;
  }
  if (size_ == 1) return;
#ifdef REMAT_HAVE_MPI
  std::vector<int> lens, offsets;
  for (int r = 0, at = 0; r < size_; ++r) {
    lens.push_back(static_cast<int>(counts[static_cast<size_t>(r)]));
    offsets.push_back(at);
    at += lens.back();
  }
  MPI_Request req;
  MPI_Iallgatherv(MPI_IN_PLACE, 0, mpi_type(t.dtype()), t.raw_data(), lens.data(), offsets.data(), mpi_type(t.dtype()),
                  mpi().comm, &req);
  wait(&req, "all_gather");
  t.storage()->bump_version();
#endif
}

bool ProcessGroup::advance(HostSum& target, bool block) {
#ifdef REMAT_HAVE_MPI
  // Whether a request has completed: waited for when `block`, else tested once.
  auto arrived = [&](MPI_Request& request) {
    if (block) {
      wait(&request, "all_reduce");
      return true;
    }
    int done = 0;
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    return done != 0;
  };
  // Phase 1 starts in FIFO order: the sums ahead of the target first (waited for only when the
  // caller blocks on the target, which then needs them).
  while (!waiting_.empty() && !target.done && target.phase == 0) {
    const std::shared_ptr<HostSum> held = waiting_.front();  // alive past pop_front
    HostSum& s = *held;
    if (!arrived(s.request)) return false;
    const int64_t len = s.chunks.size(1), at = s.offsets[static_cast<size_t>(rank_)];
    sum_gathered(static_cast<char*>(s.tensor.raw_data()) + at * static_cast<int64_t>(dtype_size(s.tensor.dtype())),
                 s.tensor.dtype(), s.chunks, len);
    s.chunks = Tensor();
    s.phase = 1;
    waiting_.pop_front();
    if (s.scatter_only) {  // no phase 1: this rank's chunk is its result
      s.tensor.storage()->bump_version();
      s.tensor = Tensor();
      s.done = true;
      continue;
    }
    MPI_Iallgatherv(MPI_IN_PLACE, 0, mpi_type(s.tensor.dtype()), s.tensor.raw_data(), s.counts.data(),
                    s.offsets.data(), mpi_type(s.tensor.dtype()), mpi().gather_comm, &s.request);
  }
  if (!target.done) {
    if (!arrived(target.request)) return false;
    target.tensor.storage()->bump_version();
    target.tensor = Tensor();
    target.done = true;
  }
#else
  (void)block;
  target.done = true;
#endif
  return true;
}

bool ProcessGroup::PendingSum::poll() {
  if (done_ || !sum_) return done_;
  done_ = group_->advance(*sum_, false);
  if (done_) sum_.reset();
  return done_;
}

void ProcessGroup::PendingSum::finish() {
  REMAT_CHECK(group_ != nullptr, "all_reduce: finish() of a sum that was never started");
  if (done_) return;
  group_->advance(*sum_, true);
  sum_.reset();
  done_ = true;
}

void ProcessGroup::sum_gathered(void* out, DType dtype, const Tensor& gathered, int64_t n) {
  if (dtype == DType::f64)
    sum_in_rank_order(static_cast<double*>(out), gathered.data<double>(), n, size_);
  else
    sum_in_rank_order(static_cast<float*>(out), gathered.data<float>(), n, size_);
}

void ProcessGroup::all_reduce_sum(Tensor& t) { start_all_reduce_sum(t).finish(); }

void ProcessGroup::broadcast(Tensor& t, int root) {
  REMAT_CHECK(root >= 0 && root < size_, "broadcast: expected a root rank from 0 to ", size_ - 1, ", got ", root);
  check_same(t, "broadcast");
  if (t.device().is_cuda()) {
    if (NcclComm* comm = nccl_for(t.device())) {
      comm->broadcast(t, root);
      wait_nccl(*comm, "broadcast");
    }
    return;
  }
  if (size_ == 1) return;
#ifdef REMAT_HAVE_MPI
  REMAT_CHECK(t.nbytes() <= INT32_MAX, "broadcast: expected at most 2^31 - 1 bytes per call, got ", t.nbytes());
  MPI_Request req;
  MPI_Ibcast(t.raw_data(), static_cast<int>(t.nbytes()), MPI_BYTE, root, mpi().comm, &req);
  wait(&req, "broadcast");
  t.storage()->bump_version();
#endif
}

Tensor ProcessGroup::all_gather(const Tensor& t) {
  check_same(t, "all_gather");
  Shape shape = t.shape();
  shape.insert(shape.begin(), size_);
  Tensor out = Tensor::empty(shape, t.dtype(), t.device());
  if (t.device().is_cuda()) {
    NcclComm* comm = nccl_for(t.device());
    if (!comm) {
      copy_bytes(out.raw_data(), out.device(), t.raw_data(), t.device(), t.nbytes());
      return out;
    }
    comm->all_gather(t, out);
    wait_nccl(*comm, "all_gather");
    return out;
  }
  if (size_ == 1) {
    std::memcpy(out.raw_data(), t.raw_data(), t.nbytes());
    return out;
  }
#ifdef REMAT_HAVE_MPI
  REMAT_CHECK(t.nbytes() <= INT32_MAX, "all_gather: expected at most 2^31 - 1 bytes per call, got ", t.nbytes());
  MPI_Request req;
  MPI_Iallgather(t.raw_data(), static_cast<int>(t.nbytes()), MPI_BYTE, out.raw_data(), static_cast<int>(t.nbytes()),
                 MPI_BYTE, mpi().comm, &req);
  wait(&req, "all_gather");
#endif
  return out;
}

void ProcessGroup::barrier() {
  REMAT_CHECK(failed_.empty(), "barrier: the process group failed earlier (", failed_, ")");
  if (size_ == 1) return;
#ifdef REMAT_HAVE_MPI
  MPI_Request req;
  MPI_Ibarrier(mpi().comm, &req);
  wait(&req, "barrier");
#endif
}

void ProcessGroup::report_failure(const std::string& what) {
  if (size_ == 1) return;
#ifdef REMAT_HAVE_MPI
  std::vector<MPI_Request> sent;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    sent.emplace_back();
    MPI_Isend(what.data(), static_cast<int>(what.size()), MPI_CHAR, r, kFailureTag, mpi().comm, &sent.back());
  }
  // Small messages go out eagerly; give them a moment, not forever (a peer may be gone).
  auto start = std::chrono::steady_clock::now();
  int done = 0;
  while (!done && std::chrono::steady_clock::now() - start < std::chrono::seconds(5)) {
    MPI_Testall(static_cast<int>(sent.size()), sent.data(), &done, MPI_STATUSES_IGNORE);
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  failed_ = "this rank reported a failure: " + what;
  mpi().broken = true;
#endif
}

}  // namespace remat::dist
