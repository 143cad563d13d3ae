// The CUDA caching allocator: device memory is taken from the driver in segments and handed out
// as best-fit blocks, split and coalesced in place, so that a training step does no cudaMalloc
// once the cache is warm. Same counters as the CPU allocator, plus the bytes reserved in segments.
// REMAT_CUDA_CACHING=0 turns the cache off: every tensor gets its own cudaMalloc and cudaFree, so
// that compute-sanitizer (and AddressSanitizer on the emulated GPU) sees each tensor's bounds,
// where a read past a tensor inside a cached segment goes unnoticed. Slow: for debugging.
#pragma once

#include <atomic>
#include <cstddef>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>

#include "../allocator.h"

namespace remat {

class CachingAllocator final : public Allocator {
 public:
  // Requests up to kSmallRequest bytes share kSmallSegment segments; larger ones get their own
  // segment, rounded up to kLargeRound. Block sizes are multiples of kAlign, so every block keeps
  // its segment's alignment (cudaMalloc's: at least 256 bytes).
  static constexpr size_t kAlign = 512;
  static constexpr size_t kSmallRequest = 1u << 20;
  static constexpr size_t kSmallSegment = 2u << 20;
  static constexpr size_t kLargeRound = 2u << 20;

  explicit CachingAllocator(int device, bool caching = caching_from_environment())
      : device_(device), caching_(caching) {}
  // REMAT_CUDA_CACHING: unset or 1 caches, 0 does not; anything else throws.
  static bool caching_from_environment();
  ~CachingAllocator() override;
  Device device() const override { return Device::cuda(device_); }
  // Returns every wholly free segment to the driver.
  void empty_cache();
  void release_cache() noexcept override { empty_cache(); }
  int64_t segment_count() const;

 protected:
  void* raw_allocate(size_t bytes) override;
  void raw_deallocate(void* ptr, size_t bytes) noexcept override;
  int64_t reserved_bytes() const override { return reserved_.load(); }

 private:
  struct Block {
    char* ptr;
    size_t size;
    bool small;            // which pool
    bool free = true;
    Block* prev = nullptr;  // neighbours inside the same segment
    Block* next = nullptr;
  };
  struct BySize {
    bool operator()(const Block* a, const Block* b) const {
      return a->size != b->size ? a->size < b->size : a->ptr < b->ptr;
    }
  };
  using Pool = std::set<Block*, BySize>;

  Block* take_free_block(Pool& pool, size_t size);
  Block* new_segment(size_t segment_bytes, bool small);  // nullptr when the driver is out of memory
  void release_free_segments();                           // caller holds mutex_
  [[noreturn]] void out_of_memory(size_t bytes) const;

  int device_;
  bool caching_;
  mutable std::mutex mutex_;
  Pool small_pool_, large_pool_;
  std::unordered_map<void*, Block*> live_;
  std::atomic<int64_t> reserved_{0};
  int64_t segments_ = 0;
};

}  // namespace remat
