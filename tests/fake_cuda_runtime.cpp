// The simulated CUDA runtime of tests/fake_cuda_runtime.h: the runtime API functions remat's
// host-side CUDA code calls, defined over host memory and queues that run on request.
#include "fake_cuda_runtime.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FAKE_CUDA_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(FAKE_CUDA_ASAN)
#include <sanitizer/asan_interface.h>
#define FAKE_CUDA_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FAKE_CUDA_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FAKE_CUDA_POISON(p, n) ((void)(p), (void)(n))
#define FAKE_CUDA_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// The runtime's opaque handle types, defined here: a stream is a queue, an event a pair of
// generation counters (the latest record, and the latest record its stream has reached).
struct CUevent_st {
  int device = 0;
  uint64_t recorded = 0;
  uint64_t completed = 0;
  bool destroyed = false;
};

struct CUstream_st {
  struct Op {
    enum Kind { copy, kernel, record, wait };
    explicit Op(Kind k) : kind(k) {}
    Kind kind;
    void* dst = nullptr;
    const void* src = nullptr;
    size_t n = 0;
    cudaMemcpyKind direction = cudaMemcpyDefault;
    std::function<void()> work;
    CUevent_st* event = nullptr;
    uint64_t generation = 0;
  };
  int device = 0;
  bool compute = false;
  std::deque<Op> ops;
};

namespace fake_cuda {

namespace {

struct State {
  std::recursive_mutex mutex;
  int devices = 1;
  size_t capacity = size_t(16) << 30;
  Counters counters;
  std::map<const void*, long long> launches_by_kernel;  // since the process began
  std::map<const char*, std::pair<size_t, int>> device_blocks;  // start -> (bytes, device)
  std::vector<std::string> misuse;
  uint64_t generation = 0;
  // Streams, events and pinned blocks outlive reset(): remat keeps its copy streams and pinned
  // blocks in statics for the life of the process, as it may with the real runtime.
  std::vector<std::unique_ptr<CUstream_st>> compute_streams, copy_streams;
  std::vector<std::unique_ptr<CUevent_st>> events;
  std::map<const void*, int> max_dynamic_shared;  // per kernel, from cudaFuncSetAttribute
};

State& state() {
  static auto* s = new State();
  return *s;
}

thread_local int current_device = 0;
thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t error, const std::string& why) {
  state().misuse.push_back(why);
  last_error = error;
  return error;
}

CUstream_st* compute_stream(int device) {
  State& s = state();
  while (static_cast<int>(s.compute_streams.size()) <= device) {
    auto stream = std::make_unique<CUstream_st>();
    stream->device = static_cast<int>(s.compute_streams.size());
    stream->compute = true;
    s.compute_streams.push_back(std::move(stream));
  }
  return s.compute_streams[device].get();
}

// The stream a call means: 0 (and cudaStreamLegacy) is the current device's compute stream.
CUstream_st* resolve(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy) return compute_stream(current_device);
  return stream;
}

const std::pair<const char* const, std::pair<size_t, int>>* find_block(const void* p, size_t n) {
  auto& blocks = state().device_blocks;
  auto it = blocks.upper_bound(static_cast<const char*>(p));
  if (it == blocks.begin()) return nullptr;
  --it;
  const char* c = static_cast<const char*>(p);
  return c + n <= it->first + it->second.first ? &*it : nullptr;
}

bool runnable(const CUstream_st::Op& op) {
  return op.kind != CUstream_st::Op::wait || op.event->completed >= op.generation;
}

void execute(CUstream_st& stream, CUstream_st::Op& op) {
  switch (op.kind) {
    case CUstream_st::Op::copy: {
      // Each device end must be allocated when the copy runs, on the stream's own device (remat
      // copies between host and device only; a peer copy would be a mistake here).
      auto end_ok = [&](const void* p) {
        auto* block = find_block(p, op.n);
        if (!block) state().misuse.push_back("a copy ran on device memory that is no longer allocated");
        else if (block->second.second != stream.device)
          state().misuse.push_back("a copy on a stream of cuda:" + std::to_string(stream.device) +
                                   " touched memory of cuda:" + std::to_string(block->second.second));
        return block && block->second.second == stream.device;
      };
      bool to_device = op.direction == cudaMemcpyHostToDevice || op.direction == cudaMemcpyDeviceToDevice;
      bool from_device = op.direction == cudaMemcpyDeviceToHost || op.direction == cudaMemcpyDeviceToDevice;
      if ((to_device && !end_ok(op.dst)) || (from_device && !end_ok(op.src))) return;
      std::memmove(op.dst, op.src, op.n);
      return;
    }
    case CUstream_st::Op::kernel: op.work(); return;
    case CUstream_st::Op::record: op.event->completed = std::max(op.event->completed, op.generation); return;
    case CUstream_st::Op::wait: return;
  }
}

// Queues an operation. With REMAT_FAKE_CUDA_EAGER=1 in the environment the device then runs
// everything it can at once: a GPU that is never behind the host, against the default of one
// that runs only when the host waits for it.
void queue(CUstream_st* stream, CUstream_st::Op op) {
  static const bool eager = [] {
    const char* e = std::getenv("REMAT_FAKE_CUDA_EAGER");
    return e != nullptr && std::string(e) == "1";
  }();
  stream->ops.push_back(std::move(op));
  if (eager) run(Order::compute_first);
}

}  // namespace

void reset(int devices, size_t capacity) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  for (auto& stream : s.compute_streams) stream->ops.clear();
  for (auto& stream : s.copy_streams) stream->ops.clear();
  for (auto& [start, block] : s.device_blocks) std::free(const_cast<char*>(start));
  s.device_blocks.clear();
  s.devices = devices;
  s.capacity = capacity;
  s.counters = {};
  s.misuse.clear();
  current_device = 0;
  last_error = cudaSuccess;
}

Counters counters() {
  std::lock_guard lock(state().mutex);
  return state().counters;
}

bool is_device_memory(const void* p, size_t n) {
  std::lock_guard lock(state().mutex);
  return find_block(p, n) != nullptr;
}

void enqueue(cudaStream_t stream, std::function<void()> work) {
  std::lock_guard lock(state().mutex);
  CUstream_st::Op op(CUstream_st::Op::kernel);
  op.work = std::move(work);
  fake_cuda::queue(resolve(stream), std::move(op));
}

void launch(const void* kernel, const unsigned grid[3], const unsigned block[3], size_t shared_bytes,
            std::function<void()> body) {
  State& s = state();
  std::lock_guard lock(s.mutex);
  auto dims = [](const unsigned d[3]) {
    char text[64];
    std::snprintf(text, sizeof text, "(%u, %u, %u)", d[0], d[1], d[2]);
    return std::string(text);
  };
  uint64_t threads = uint64_t(block[0]) * block[1] * block[2];
  auto found = s.max_dynamic_shared.find(kernel);
  size_t shared_limit = found != s.max_dynamic_shared.end() ? static_cast<size_t>(found->second) : 48 * 1024;
  std::string wrong;
  if (threads == 0 || threads > 1024 || block[2] > 64) wrong = "a block of " + dims(block) + " threads";
  else if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535 ||
           grid[0] > 2147483647u)
    wrong = "a grid of " + dims(grid) + " blocks";
  else if (shared_bytes > shared_limit)
    wrong = std::to_string(shared_bytes) + " bytes of dynamic shared memory (the kernel may use " +
            std::to_string(shared_limit) + ")";
  if (!wrong.empty()) {
    fail(cudaErrorInvalidConfiguration, "a launch with " + wrong);
    return;
  }
  CUstream_st::Op op(CUstream_st::Op::kernel);
  op.work = std::move(body);
  fake_cuda::queue(resolve(nullptr), std::move(op));
  ++s.counters.launches;
  ++s.launches_by_kernel[kernel];
}

namespace {

// Runs one operation: the head of the first stream in `order` whose head can run. False when none can.
bool step(Order order) {
  State& s = state();
  std::vector<CUstream_st*> streams;
  for (auto& st : s.compute_streams) streams.push_back(st.get());
  for (auto& st : s.copy_streams) streams.push_back(st.get());
  if (order == Order::copies_first)
    std::stable_partition(streams.begin(), streams.end(), [](auto* st) { return !st->compute; });
  for (CUstream_st* st : streams) {
    if (st->ops.empty() || !runnable(st->ops.front())) continue;
    CUstream_st::Op op = std::move(st->ops.front());
    st->ops.pop_front();
    execute(*st, op);
    return true;
  }
  return false;
}

}  // namespace

void run(Order order) {
  std::lock_guard lock(state().mutex);
  while (step(order)) {
  }
}

size_t pending() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  size_t n = 0;
  for (auto& st : s.compute_streams) n += st->ops.size();
  for (auto& st : s.copy_streams) n += st->ops.size();
  return n;
}

std::vector<std::string> misuse() {
  std::lock_guard lock(state().mutex);
  return state().misuse;
}

}  // namespace fake_cuda

using fake_cuda::state;

extern "C" {

cudaError_t cudaGetLastError() {
  cudaError_t e = fake_cuda::last_error;
  fake_cuda::last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unexpected error (fake_cuda)";
  }
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard lock(state().mutex);
  if (device < 0 || device >= state().devices)
    return fake_cuda::fail(cudaErrorInvalidDevice, "cudaSetDevice(" + std::to_string(device) + ")");
  fake_cuda::current_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = fake_cuda::current_device;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  size_t live = 0;
  for (auto& [start, block] : s.device_blocks)
    if (block.second == fake_cuda::current_device) live += block.first;
  if (live + size > s.capacity) {
    ++s.counters.failed_mallocs;
    fake_cuda::last_error = cudaErrorMemoryAllocation;  // an expected failure, not a misuse
    return cudaErrorMemoryAllocation;
  }
  // 256-byte alignment: what cudaMalloc promises, and no more.
  size_t rounded = std::max<size_t>((size + 255) / 256 * 256, 256);
  char* p = static_cast<char*>(std::aligned_alloc(256, rounded));
  // Under AddressSanitizer the rounding is off limits: a kernel reading past the bytes asked for
  // is an error, as under compute-sanitizer on a GPU.
  FAKE_CUDA_POISON(p + size, rounded - size);
  s.device_blocks[p] = {size, fake_cuda::current_device};
  ++s.counters.device_mallocs;
  s.counters.device_live += size;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (ptr == nullptr) return cudaSuccess;
  auto it = s.device_blocks.find(static_cast<const char*>(ptr));
  if (it == s.device_blocks.end())
    return fake_cuda::fail(cudaErrorInvalidValue, "cudaFree of a pointer cudaMalloc did not return");
  fake_cuda::run(fake_cuda::Order::compute_first);  // cudaFree waits for the device's queued work
  s.counters.device_live -= it->second.first;
  ++s.counters.device_frees;
  const size_t size = it->second.first;
  FAKE_CUDA_UNPOISON(static_cast<char*>(ptr) + size, std::max<size_t>((size + 255) / 256 * 256, 256) - size);
  std::free(ptr);
  s.device_blocks.erase(it);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int) {
  std::lock_guard lock(state().mutex);
  *ptr = std::malloc(std::max<size_t>(size, 1));  // never freed: remat keeps its pinned blocks
  ++state().counters.host_allocs;
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  if (!(flags & cudaStreamNonBlocking))
    return fake_cuda::fail(cudaErrorInvalidValue, "a blocking stream (fake_cuda simulates non-blocking ones only)");
  auto st = std::make_unique<CUstream_st>();
  st->device = fake_cuda::current_device;
  *stream = st.get();
  s.copy_streams.push_back(std::move(st));
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  auto e = std::make_unique<CUevent_st>();
  e->device = fake_cuda::current_device;
  *event = e.get();
  s.events.push_back(std::move(e));
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard lock(state().mutex);
  if (event->destroyed) return fake_cuda::fail(cudaErrorInvalidResourceHandle, "an event destroyed twice");
  event->destroyed = true;  // a pending record still completes, as on a GPU
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  auto& s = state();
  std::lock_guard lock(s.mutex);
  CUstream_st* st = fake_cuda::resolve(stream);
  if (event->destroyed) return fake_cuda::fail(cudaErrorInvalidResourceHandle, "a record of a destroyed event");
  if (event->device != st->device)
    return fake_cuda::fail(cudaErrorInvalidResourceHandle,
                           "an event of cuda:" + std::to_string(event->device) + " recorded on a stream of cuda:" +
                               std::to_string(st->device));
  CUstream_st::Op op(CUstream_st::Op::record);
  op.event = event;
  op.generation = event->recorded = ++s.generation;
  fake_cuda::queue(st, std::move(op));
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard lock(state().mutex);
  if (event->destroyed) return fake_cuda::fail(cudaErrorInvalidResourceHandle, "a query of a destroyed event");
  return event->completed >= event->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  std::lock_guard lock(state().mutex);
  if (event->destroyed) return fake_cuda::fail(cudaErrorInvalidResourceHandle, "a wait on a destroyed event");
  CUstream_st::Op op(CUstream_st::Op::wait);
  op.event = event;
  op.generation = event->recorded;  // the record made before this call, as on a GPU
  fake_cuda::queue(fake_cuda::resolve(stream), std::move(op));
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  std::lock_guard lock(state().mutex);
  *count = state().devices;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  std::lock_guard lock(state().mutex);
  if (device < 0 || device >= state().devices) return fake_cuda::fail(cudaErrorInvalidDevice, "properties of a device");
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "fake_cuda emulated device %d", device);
  prop->major = 9;
  prop->minor = 0;
  prop->totalGlobalMem = state().capacity;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  std::lock_guard lock(state().mutex);
  if (device < 0 || device >= state().devices)
    return fake_cuda::fail(cudaErrorInvalidDevice, "an attribute of a device");
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;  // an H200's
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return fake_cuda::fail(cudaErrorInvalidValue, "a device attribute fake_cuda does not simulate");
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  std::lock_guard lock(state().mutex);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024)
    return fake_cuda::fail(cudaErrorInvalidValue, "a kernel attribute out of an H200's range");
  state().max_dynamic_shared[func] = value;
  return cudaSuccess;
}

// The points where the host waits for the device: everything queued runs.
cudaError_t cudaDeviceSynchronize() {
  fake_cuda::run(fake_cuda::Order::compute_first);
  return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t) {
  fake_cuda::run(fake_cuda::Order::compute_first);  // a query finds the emulated device done
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  std::lock_guard lock(state().mutex);
  if (event->destroyed) return fake_cuda::fail(cudaErrorInvalidResourceHandle, "a wait for a destroyed event");
  // The device runs until it reaches the event, and no further.
  while (event->completed < event->recorded && fake_cuda::step(fake_cuda::Order::compute_first)) {
  }
  return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  std::lock_guard lock(state().mutex);
  if (start->completed < start->recorded || end->completed < end->recorded)
    return fake_cuda::fail(cudaErrorNotReady, "the time between events not yet reached");
  *ms = static_cast<float>(end->completed - start->completed) * 1e-3f;  // generations stand in for time
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  fake_cuda::run(fake_cuda::Order::compute_first);  // ordered after the device's queued work
  std::lock_guard lock(state().mutex);
  if (count == 0) return cudaSuccess;
  bool device_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  bool device_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if ((device_dst && !fake_cuda::find_block(dst, count)) || (device_src && !fake_cuda::find_block(src, count)))
    return fake_cuda::fail(cudaErrorInvalidValue, "a cudaMemcpy on device memory that is not allocated");
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  std::lock_guard lock(state().mutex);
  if (count == 0) return cudaSuccess;  // any pointer, as the runtime allows
  if (!fake_cuda::find_block(ptr, count))
    return fake_cuda::fail(cudaErrorInvalidValue, "a memset of device memory that is not allocated");
  CUstream_st::Op op(CUstream_st::Op::kernel);
  op.work = [ptr, value, count] { std::memset(ptr, value, count); };
  fake_cuda::queue(fake_cuda::resolve(stream), std::move(op));
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  cudaError_t e = cudaMemsetAsync(ptr, value, count, nullptr);
  if (e == cudaSuccess) fake_cuda::run(fake_cuda::Order::compute_first);
  return e;
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t stream) {
  std::lock_guard lock(state().mutex);
  if (kind != cudaMemcpyDeviceToDevice)
    return fake_cuda::fail(cudaErrorInvalidValue, "a 2-D copy of a kind fake_cuda does not simulate");
  if (height > 0 && (!fake_cuda::find_block(dst, dpitch * (height - 1) + width) ||
                     !fake_cuda::find_block(src, spitch * (height - 1) + width)))
    return fake_cuda::fail(cudaErrorInvalidValue, "a 2-D copy on device memory that is not allocated");
  CUstream_st::Op op(CUstream_st::Op::kernel);
  op.work = [=] {
    for (size_t r = 0; r < height; ++r)
      std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  };
  fake_cuda::queue(fake_cuda::resolve(stream), std::move(op));
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
  std::lock_guard lock(state().mutex);
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDeviceToDevice)
    return fake_cuda::fail(cudaErrorInvalidValue, "a copy of a kind fake_cuda does not simulate");
  CUstream_st::Op op(CUstream_st::Op::copy);
  op.dst = dst;
  op.src = src;
  op.n = count;
  op.direction = kind;
  fake_cuda::queue(fake_cuda::resolve(stream), std::move(op));
  return cudaSuccess;
}

// For a program that loads the emulated part through REMAT_CUDA_MODULE and cannot name this
// namespace (tests/host_enqueue.cpp): the kernels and library calls queued so far.
long long fake_cuda_launches() { return fake_cuda::counters().launches; }

// Launches so far per kernel (the kernel's host address, which names it through the module's
// symbol table), for a per-kernel breakdown: `visit` is called once per kernel launched.
void fake_cuda_launches_by_kernel(void (*visit)(const void* kernel, long long launches, void* context), void* context) {
  std::lock_guard lock(fake_cuda::state().mutex);
  for (const auto& [kernel, n] : fake_cuda::state().launches_by_kernel) visit(kernel, n, context);
}

}  // extern "C"
