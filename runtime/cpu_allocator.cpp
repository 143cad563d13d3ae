// The CPU allocator: 64-byte aligned blocks from the C library, large freed blocks kept for reuse.
#include "runtime/cpu_allocator.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "runtime/env_switch.h"
#include "runtime/error.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define REMAT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(REMAT_ASAN)
#include <sanitizer/asan_interface.h>
#define REMAT_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define REMAT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
constexpr bool kCachingByDefault = false;  // AddressSanitizer sees a freed tensor's block as freed
#else
#define REMAT_POISON(p, n) ((void)(p), (void)(n))
#define REMAT_UNPOISON(p, n) ((void)(p), (void)(n))
constexpr bool kCachingByDefault = true;
#endif

namespace remat {

namespace {

EnvSwitch g_caching("REMAT_CPU_CACHING", kCachingByDefault);

// Why a cache: a training step frees and asks again for the same large blocks every step. Given
// back to the C library, they go back to the system whenever malloc trims its heap or unmaps them,
// and each page costs a fault when the next step writes it: gpt small's steps ran up to 9% slower
// on a 2-core VM without the cache (docs/results/cpu.md, session 36). Only blocks of kCachedFrom
// bytes and more are kept (malloc keeps smaller ones itself), by exact size (steps repeat their
// shapes), and never more bytes than were ever live at once: the process holds at most twice its peak.
class CpuAllocator final : public Allocator {
 public:
  static constexpr size_t kAlign = 64;  // a cache line, and an AVX-512 vector
  static constexpr size_t kCachedFrom = 64 << 10;

  Device device() const override { return Device::cpu(); }
  // What a request takes from the C library: whole lines of kAlign bytes (less than bytes on overflow).
  static size_t rounded(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  void release_cache() noexcept override {
    std::lock_guard lock(mutex_);
    for (auto& [bytes, blocks] : cache_)
      for (void* block : blocks) {
        REMAT_UNPOISON(block, bytes);
        std::free(block);
      }
    held_ -= cached_;
    cached_ = 0;
    cache_.clear();
  }

  int64_t cached_bytes() const {
    std::lock_guard lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

 protected:
  void* raw_allocate(size_t bytes) override {
    const size_t size = rounded(bytes);
    REMAT_CHECK(size >= bytes, "out of host memory: requested ", bytes, " bytes; ", usage());
    if (size >= kCachedFrom && g_caching.get())  // (a bad REMAT_CPU_CACHING throws here, not in a free)
      if (void* block = take_cached(size)) return block;
    void* ptr = std::aligned_alloc(kAlign, size);
    if (ptr == nullptr && cached_bytes() > 0) {  // the cache's blocks may be what the system lacks
      release_cache();
      ptr = std::aligned_alloc(kAlign, size);
    }
    REMAT_CHECK(ptr != nullptr, "out of host memory: requested ", bytes, " bytes; ", usage());
    std::lock_guard lock(mutex_);
    held_ += size;
    max_live_ = std::max(max_live_, held_ - cached_);
    return ptr;
  }

  void raw_deallocate(void* ptr, size_t bytes) noexcept override {
    const size_t size = rounded(bytes);
    bool caching = false;
    try {
      caching = g_caching.get();
    } catch (...) {  // a bad REMAT_CPU_CACHING: the next allocation says so
    }
    std::lock_guard lock(mutex_);
    if (caching && size >= kCachedFrom && cached_ + size <= max_live_) {
      try {
        cache_[size].push_back(ptr);
        cached_ += size;
        REMAT_POISON(ptr, size);
        return;
      } catch (...) {  // no memory for the bookkeeping: the block goes back instead
      }
    }
    held_ -= size;
    std::free(ptr);
  }

  int64_t reserved_bytes() const override {
    std::lock_guard lock(mutex_);
    return static_cast<int64_t>(held_);
  }

 private:
  void* take_cached(size_t size) {
    std::lock_guard lock(mutex_);
    auto it = cache_.find(size);
    if (it == cache_.end() || it->second.empty()) return nullptr;
    void* block = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    REMAT_UNPOISON(block, size);
    max_live_ = std::max(max_live_, held_ - cached_);
    return block;
  }

  mutable std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> cache_;  // free blocks by (rounded) size
  size_t cached_ = 0;    // bytes in cache_
  size_t held_ = 0;      // bytes taken from the C library and not given back: live and cached
  size_t max_live_ = 0;  // the most bytes live at once (held_ - cached_), the cache's bound
};

}  // namespace

Allocator& cpu_allocator() {
  // Never destroyed: tensors held by static objects are freed after static destructors run.
  static CpuAllocator* cpu = new CpuAllocator;
  return *cpu;
}

void set_cpu_caching(bool enabled) {
  g_caching.set(enabled);
  if (!enabled) cpu_allocator().release_cache();
}

bool cpu_caching() { return g_caching.get(); }

int64_t cpu_cached_bytes() { return static_cast<CpuAllocator&>(cpu_allocator()).cached_bytes(); }

}  // namespace remat
