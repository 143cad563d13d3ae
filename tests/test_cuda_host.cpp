// remat's host-side CUDA code (the caching allocator, the copy engine) run against a simulated
// runtime (fake_cuda_runtime.h), in every build where the toolkit's headers are: streams run in
// the orders a GPU may take, so a missing dependency or a block reused while a copy still reads or
// writes it shows here, not on the first GPU run.
#include <catch.hpp>

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "fake_cuda_runtime.h"
#include "runtime/cuda/caching_allocator.h"
#include "runtime/cuda/copy_engine.h"
#include "runtime/error.h"

using namespace remat;
using Catch::Matchers::Contains;

namespace {

constexpr auto act = MemoryCategory::activation;
constexpr size_t MiB = size_t(1) << 20;

std::vector<unsigned char> bytes_at(const void* p, size_t n) {
  auto* c = static_cast<const unsigned char*>(p);
  return {c, c + n};
}

void* device_malloc(size_t n) {
  void* p = nullptr;
  REQUIRE(cudaMalloc(&p, n) == cudaSuccess);
  return p;
}

}  // namespace

TEST_CASE("caching allocator: aligned blocks inside segments, never overlapping; freed, every segment goes back",
          "[cuda_host]") {
  fake_cuda::reset();
  {
    CachingAllocator a(0);
    std::mt19937 rng(7);
    std::map<char*, std::pair<size_t, unsigned char>> live;  // start -> (bytes, the tag written there)
    int64_t requested = 0;
    auto check_tag = [](char* p, size_t n, unsigned char tag) {  // nothing else wrote into the block
      size_t wrong = 0;
      for (size_t i = 0; i < n; ++i) wrong += static_cast<unsigned char>(p[i]) != tag;
      REQUIRE(wrong == 0);
    };
    for (int step = 0; step < 3000; ++step) {
      bool grow = live.empty() || rng() % 100 < 55;
      if (grow) {
        size_t n;
        switch (rng() % 3) {
          case 0: n = 1 + rng() % 4096; break;                      // small, shares a segment
          case 1: n = 4096 + rng() % (2 * MiB); break;              // around the small/large line
          default: n = 2 * MiB + rng() % (6 * MiB); break;          // large, its own segment
        }
        auto* p = static_cast<char*>(a.allocate(n, act));
        REQUIRE(reinterpret_cast<uintptr_t>(p) % 256 == 0);  // a segment's alignment, kept by every block
        REQUIRE(fake_cuda::is_device_memory(p, n));
        auto next = live.lower_bound(p);
        if (next != live.end()) REQUIRE(p + n <= next->first);
        if (next != live.begin()) REQUIRE(std::prev(next)->first + std::prev(next)->second.first <= p);
        auto tag = static_cast<unsigned char>(rng());
        std::memset(p, tag, n);
        live[p] = {n, tag};
        requested += static_cast<int64_t>(n);
      } else {
        auto it = std::next(live.begin(), static_cast<long>(rng() % live.size()));
        check_tag(it->first, it->second.first, it->second.second);
        a.deallocate(it->first, it->second.first, act);
        requested -= static_cast<int64_t>(it->second.first);
        live.erase(it);
      }
      MemoryStats s = a.stats();
      REQUIRE(s.total.current == requested);
      REQUIRE(s.reserved == static_cast<int64_t>(fake_cuda::counters().device_live));
      REQUIRE(s.reserved >= s.total.current);
    }
    for (auto& [p, block] : live) {
      check_tag(p, block.first, block.second);
      a.deallocate(p, block.first, act);
    }
    REQUIRE(a.segment_count() > 0);
    a.empty_cache();  // every segment is whole again: coalescing left no piece behind
    CHECK(a.segment_count() == 0);
    CHECK(a.stats().reserved == 0);
    CHECK(fake_cuda::counters().device_live == 0);
    CHECK(fake_cuda::counters().device_frees == fake_cuda::counters().device_mallocs);
  }
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("caching allocator: once warm, a repeated step takes nothing from the driver", "[cuda_host]") {
  fake_cuda::reset();
  CachingAllocator a(0);
  // One step's pattern: activations allocated in forward order, most freed in reverse, a few
  // gradients and workspace blocks in between (sizes of a small GPT's step, in bytes).
  const std::vector<size_t> sizes = {3 * MiB, 768 * 4, 4 * MiB, 4 * MiB, 1 * MiB + 8, 300, 9 * MiB, 12 * MiB, 2 * MiB};
  auto step = [&] {
    std::vector<void*> held;
    for (size_t n : sizes) {
      held.push_back(a.allocate(n, act));
      void* scratch = a.allocate(n / 3 + 1, MemoryCategory::workspace);
      a.deallocate(scratch, n / 3 + 1, MemoryCategory::workspace);
    }
    for (size_t i = sizes.size(); i-- > 0;) a.deallocate(held[i], sizes[i], act);
  };
  step();
  int after_first = fake_cuda::counters().device_mallocs;
  REQUIRE(after_first > 0);
  for (int i = 0; i < 5; ++i) step();
  CHECK(fake_cuda::counters().device_mallocs == after_first);
  CHECK(fake_cuda::counters().failed_mallocs == 0);
  a.empty_cache();
  CHECK(fake_cuda::counters().device_live == 0);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("caching allocator off (REMAT_CUDA_CACHING=0): a cudaMalloc and a cudaFree per block, the same counters",
          "[cuda_host]") {
  fake_cuda::reset(1, 10 * MiB);
  CachingAllocator a(0, /*caching=*/false);
  void* p = a.allocate(3 * MiB, act);
  void* q = a.allocate(1000, act);
  CHECK(fake_cuda::counters().device_mallocs == 2);
  CHECK(fake_cuda::counters().device_live == 3 * MiB + 1000);  // the bytes asked for, not segments
  CHECK(a.stats().reserved == static_cast<int64_t>(3 * MiB + 1000));
  CHECK(a.stats().total.current == static_cast<int64_t>(3 * MiB + 1000));
  a.deallocate(p, 3 * MiB, act);
  CHECK(fake_cuda::counters().device_frees == 1);  // at once: nothing cached
  REQUIRE_THROWS_WITH(a.allocate(10 * MiB, act), Contains("out of memory on cuda:0: requested 10485760 bytes"));
  a.deallocate(q, 1000, act);
  CHECK(fake_cuda::counters().device_live == 0);
  CHECK(a.segment_count() == 0);
  CHECK(fake_cuda::misuse().empty());
  setenv("REMAT_CUDA_CACHING", "maybe", 1);
  CHECK_THROWS_WITH(CachingAllocator::caching_from_environment(), Contains("REMAT_CUDA_CACHING: expected 1"));
  setenv("REMAT_CUDA_CACHING", "0", 1);
  CHECK_FALSE(CachingAllocator::caching_from_environment());
  unsetenv("REMAT_CUDA_CACHING");
  CHECK(CachingAllocator::caching_from_environment());
}

TEST_CASE("caching allocator: out of memory returns cached segments and retries, then fails with the figures",
          "[cuda_host]") {
  fake_cuda::reset(1, 10 * MiB);
  CachingAllocator a(0);
  void* p = a.allocate(3 * MiB, act);  // a 4 MiB segment
  void* q = a.allocate(1000, act);     // a 2 MiB small segment
  a.deallocate(p, 3 * MiB, act);       // cached, not returned
  REQUIRE(fake_cuda::counters().device_live == 6 * MiB);
  // 6 MiB more does not fit beside the cache: the free large segment goes back, the retry fits.
  void* r = a.allocate(6 * MiB, act);
  CHECK(fake_cuda::counters().failed_mallocs == 1);
  CHECK(fake_cuda::counters().device_live == 8 * MiB);
  CHECK(a.segment_count() == 2);
  // Nothing left to return: the request fails and says what was asked for and what is held.
  REQUIRE_THROWS_WITH(a.allocate(4 * MiB, act),
                      Contains("out of memory on cuda:0: requested 4194304 bytes") &&
                          Contains("allocated 6292456") && Contains("reserved 8388608"));
  // The allocator still works after the failure, and the small segment kept serving.
  void* s = a.allocate(512 * 1024, act);
  CHECK(fake_cuda::is_device_memory(s, 512 * 1024));
  for (auto [ptr, n] : {std::pair{q, size_t(1000)}, {r, 6 * MiB}, {s, size_t(512 * 1024)}}) a.deallocate(ptr, n, act);
  a.empty_cache();
  CHECK(fake_cuda::counters().device_live == 0);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("copy engine: a staged copy's page-locked block is not reused before its copy has run", "[cuda_host]") {
  fake_cuda::reset();
  const size_t n = 4096;
  auto* dst = static_cast<unsigned char*>(device_malloc(3 * n));
  std::vector<unsigned char> host(n);
  for (int i = 0; i < 3; ++i) {  // the caller's buffer changes (or dies) as soon as the call returns
    std::memset(host.data(), 'a' + i, n);
    cuda::copy_staged_to_device(dst + i * n, 0, host.data(), n);
  }
  CHECK(cuda::poll_copies() == 3);  // nothing has run: every block is still held
  fake_cuda::run(fake_cuda::Order::compute_first);
  for (int i = 0; i < 3; ++i) CHECK(bytes_at(dst + i * n, n) == std::vector<unsigned char>(n, 'a' + i));
  CHECK(cuda::poll_copies() == 0);
  // The blocks are back in the cache: more staged copies of that size allocate no pinned memory.
  int host_allocs = fake_cuda::counters().host_allocs;
  for (int i = 0; i < 3; ++i) cuda::copy_staged_to_device(dst + i * n, 0, host.data(), n);
  fake_cuda::run(fake_cuda::Order::compute_first);
  CHECK(cuda::poll_copies() == 0);
  CHECK(fake_cuda::counters().host_allocs == host_allocs);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("copy engine: an offload copy starts after the kernels queued before it", "[cuda_host]") {
  fake_cuda::reset();
  const size_t n = 1000;
  auto* dev = static_cast<unsigned char*>(device_malloc(n));
  std::vector<unsigned char> host(n, 0);
  // The kernel that writes the activation is queued; then the activation is offloaded.
  fake_cuda::enqueue(nullptr, [dev, n] { std::memset(dev, 7, n); });
  CopyTicket ticket = cuda::copy_async(host.data(), dev, n, 0, false, nullptr);
  fake_cuda::run(fake_cuda::Order::copies_first);  // the copy stream would go first if it could
  CHECK(host == std::vector<unsigned char>(n, 7));
  ticket.reset();
  CHECK(cuda::poll_copies() == 0);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("copy engine: kernels after wait_for_copy read the copy; what it keeps lives until a poll after it ran",
          "[cuda_host]") {
  fake_cuda::reset();
  const size_t n = 512;
  auto* dev = static_cast<unsigned char*>(device_malloc(n));
  std::vector<unsigned char> host(n, 42), seen;
  bool released = false;
  std::shared_ptr<const void> keep(host.data(), [&released](const void*) { released = true; });
  CopyTicket ticket = cuda::copy_async(dev, host.data(), n, 0, true, std::move(keep));
  cuda::wait_for_copy(ticket);
  fake_cuda::enqueue(nullptr, [&seen, dev, n] { seen = bytes_at(dev, n); });  // the kernel reading it
  ticket.reset();  // a dropped ticket: its event is destroyed, its copy still runs
  CHECK(cuda::poll_copies() == 1);
  CHECK_FALSE(released);
  fake_cuda::run(fake_cuda::Order::compute_first);  // the compute stream must wait for the copy
  CHECK(seen == std::vector<unsigned char>(n, 42));
  CHECK_FALSE(released);  // only a poll lets go
  CHECK(cuda::poll_copies() == 0);
  CHECK(released);
  CHECK(fake_cuda::pending() == 0);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE(
    "copy engine: a device block dropped while a prefetch writes it stays out of the cache until the copy has run",
    "[cuda_host]") {
  fake_cuda::reset();
  CachingAllocator a(0);
  const size_t n = 64 * 1024;
  std::vector<unsigned char> host(n, 9);
  void* block = a.allocate(n, act);
  {
    // What Graph::prefetch does: the destination is owned by what the copy keeps.
    std::shared_ptr<const void> keep(block, [&a, n](const void* p) { a.deallocate(const_cast<void*>(p), n, act); });
    CopyTicket ticket = cuda::copy_async(block, host.data(), n, 0, true, std::move(keep));
  }  // the prefetch is dropped (a released value, the end of backward) before its copy ran
  void* other = a.allocate(n, act);
  CHECK(other != block);  // handed to the next kernel, the copy would overwrite its output
  fake_cuda::enqueue(nullptr, [other, n] { std::memset(other, 1, n); });
  fake_cuda::run(fake_cuda::Order::compute_first);
  CHECK(bytes_at(other, n) == std::vector<unsigned char>(n, 1));
  CHECK(cuda::poll_copies() == 0);
  void* again = a.allocate(n, act);
  CHECK(again == block);  // back in the cache once the copy ran and a poll saw it
  a.deallocate(again, n, act);
  a.deallocate(other, n, act);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("copy engine: copies to a second device use that device's streams and events", "[cuda_host]") {
  fake_cuda::reset(2);
  const size_t n = 256;
  REQUIRE(cudaSetDevice(1) == cudaSuccess);
  auto* dev1 = static_cast<unsigned char*>(device_malloc(2 * n));
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  std::vector<unsigned char> a(n, 3), b(n, 4), offloaded(n, 0);
  CopyTicket ticket = cuda::copy_async(dev1, a.data(), n, 1, true, nullptr);
  int current = -1;
  REQUIRE(cudaGetDevice(&current) == cudaSuccess);
  CHECK(current == 0);  // the caller's device stays current
  cuda::copy_staged_to_device(dev1 + n, 1, b.data(), n);
  REQUIRE(cudaGetDevice(&current) == cudaSuccess);
  CHECK(current == 0);
  // A kernel of cuda:1 writes its second half; an offload of it must wait for that kernel.
  REQUIRE(cudaSetDevice(1) == cudaSuccess);
  fake_cuda::enqueue(nullptr, [dev1, n] { std::memset(dev1 + n, 5, n); });
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  CopyTicket back = cuda::copy_async(offloaded.data(), dev1 + n, n, 1, false, nullptr);
  CHECK(cuda::poll_copies() == 3);  // polled from another current device
  fake_cuda::run(fake_cuda::Order::copies_first);
  CHECK(bytes_at(dev1, n) == a);
  CHECK(bytes_at(dev1 + n, n) == std::vector<unsigned char>(n, 5));  // the staged copy, then the kernel
  CHECK(offloaded == std::vector<unsigned char>(n, 5));
  ticket.reset();
  back.reset();
  CHECK(cuda::poll_copies() == 0);
  CHECK(fake_cuda::misuse().empty());
}

TEST_CASE("copy engine: wait_for_copies waits for the oldest copies and lets go of what they kept", "[cuda_host]") {
  fake_cuda::reset();
  const size_t n = 128;
  auto* dev = static_cast<unsigned char*>(device_malloc(3 * n));
  std::vector<unsigned char> host(3 * n, 5);
  std::vector<bool> released(3, false);
  std::vector<CopyTicket> tickets;
  for (int i = 0; i < 3; ++i) {
    std::shared_ptr<const void> keep(host.data(), [&released, i](const void*) { released[i] = true; });
    tickets.push_back(cuda::copy_async(dev + i * n, host.data() + i * n, n, 0, true, std::move(keep)));
  }
  CHECK(cuda::wait_for_copies(0, 5) == 0);  // at most five in flight already: no wait
  CHECK(released == std::vector<bool>{false, false, false});
  CHECK(cuda::wait_for_copies(0, 1) == 2);  // the two oldest waited for, their ends let go
  CHECK(released[0]);
  CHECK(released[1]);
  CHECK_FALSE(released[2]);  // the newest may still be in flight
  CHECK(bytes_at(dev, 2 * n) == std::vector<unsigned char>(2 * n, 5));
  tickets.clear();
  fake_cuda::run(fake_cuda::Order::compute_first);
  CHECK(cuda::poll_copies() == 0);
  CHECK(released[2]);
  CHECK(fake_cuda::misuse().empty());
}
