// The CUDA caching allocator: best-fit blocks from cached segments, split on allocation and
// coalesced with free neighbours on release; on out-of-memory it returns free segments to the
// driver and retries once before failing with the figures a user needs. Or, with the cache off, a
// cudaMalloc and cudaFree per block.
#include "runtime/cuda/caching_allocator.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "runtime/cuda/cuda_check.h"

namespace remat {

namespace {

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

bool CachingAllocator::caching_from_environment() {
  const char* value = std::getenv("REMAT_CUDA_CACHING");
  if (value == nullptr || std::string(value) == "1") return true;
  REMAT_CHECK(std::string(value) == "0", "REMAT_CUDA_CACHING: expected 1 (cache device memory, the default) or 0 (a ",
              "cudaMalloc per tensor, for compute-sanitizer), got '", value, "'");
  return false;
}

CachingAllocator::~CachingAllocator() {
  // Segments are left to the driver at exit (the CUDA runtime may already be shutting down);
  // only the bookkeeping is freed.
  std::vector<Block*> all(small_pool_.begin(), small_pool_.end());
  all.insert(all.end(), large_pool_.begin(), large_pool_.end());
  for (auto& [ptr, block] : live_) all.push_back(block);
  for (Block* b : all) delete b;
}

CachingAllocator::Block* CachingAllocator::take_free_block(Pool& pool, size_t size) {
  Block key{nullptr, size, false};
  auto it = pool.lower_bound(&key);
  if (it == pool.end()) return nullptr;
  Block* b = *it;
  pool.erase(it);
  return b;
}

CachingAllocator::Block* CachingAllocator::new_segment(size_t segment_bytes, bool small) {
  REMAT_CUDA_CHECK(cudaSetDevice(device_));
  void* ptr = nullptr;
  if (cudaMalloc(&ptr, segment_bytes) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of the failed call
    return nullptr;
  }
  reserved_ += static_cast<int64_t>(segment_bytes);
  ++segments_;
  return new Block{static_cast<char*>(ptr), segment_bytes, small};
}

void CachingAllocator::release_free_segments() {
  for (Pool* pool : {&small_pool_, &large_pool_}) {
    for (auto it = pool->begin(); it != pool->end();) {
      Block* b = *it;
      if (b->prev || b->next) {
        ++it;
        continue;
      }
      REMAT_CUDA_CHECK_NOTHROW(cudaFree(b->ptr));
      reserved_ -= static_cast<int64_t>(b->size);
      --segments_;
      it = pool->erase(it);
      delete b;
    }
  }
}

void CachingAllocator::out_of_memory(size_t bytes) const {
  MemoryStats s = stats();
  REMAT_FAIL("out of memory on cuda:", device_, ": requested ", bytes, " bytes, allocated ", s.total.current,
             ", reserved ", s.reserved, ", peak ", s.total.peak,
             " (free memory elsewhere on the device, or lower the batch or use a checkpoint policy)");
}

void* CachingAllocator::raw_allocate(size_t bytes) {
  if (!caching_) {
    REMAT_CUDA_CHECK(cudaSetDevice(device_));
    void* ptr = nullptr;
    if (cudaMalloc(&ptr, std::max<size_t>(bytes, 1)) != cudaSuccess) {
      cudaGetLastError();
      out_of_memory(bytes);
    }
    reserved_ += static_cast<int64_t>(bytes);
    std::lock_guard lock(mutex_);
    ++segments_;
    return ptr;
  }
  size_t size = round_up(bytes, kAlign);
  bool small = size <= kSmallRequest;
  std::unique_lock lock(mutex_);
  Pool& pool = small ? small_pool_ : large_pool_;
  Block* b = take_free_block(pool, size);
  if (!b) {
    size_t segment = small ? kSmallSegment : round_up(size, kLargeRound);
    b = new_segment(segment, small);
    if (!b) {
      release_free_segments();
      b = new_segment(segment, small);
    }
    if (!b) {
      lock.unlock();
      out_of_memory(bytes);
    }
  }
  // Split off the tail when it is worth keeping: any aligned rest in the small pool, more than a
  // small request in the large pool (so large segments are not shredded into small pieces).
  size_t rest = b->size - size;
  if (small ? rest >= kAlign : rest > kSmallRequest) {
    Block* tail = new Block{b->ptr + size, rest, small};
    tail->prev = b;
    tail->next = b->next;
    if (b->next) b->next->prev = tail;
    b->next = tail;
    b->size = size;
    pool.insert(tail);
  }
  b->free = false;
  live_[b->ptr] = b;
  return b->ptr;
}

void CachingAllocator::raw_deallocate(void* ptr, size_t bytes) noexcept {
  std::lock_guard lock(mutex_);
  if (!caching_) {
    // cudaFree waits for the device: no kernel still queued can read the block once it is gone.
    REMAT_CUDA_CHECK_NOTHROW(cudaFree(ptr));
    reserved_ -= static_cast<int64_t>(bytes);
    --segments_;
    return;
  }
  auto it = live_.find(ptr);
  if (it == live_.end()) {
    fprintf(stderr, "remat: cuda:%d: free of a pointer this allocator did not hand out\n", device_);
    return;
  }
  Block* b = it->second;
  live_.erase(it);
  b->free = true;
  Pool& pool = b->small ? small_pool_ : large_pool_;
  if (b->next && b->next->free) {
    Block* n = b->next;
    pool.erase(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next) n->next->prev = b;
    delete n;
  }
  if (b->prev && b->prev->free) {
    Block* p = b->prev;
    pool.erase(p);
    p->size += b->size;
    p->next = b->next;
    if (b->next) b->next->prev = p;
    delete b;
    b = p;
  }
  pool.insert(b);
}

void CachingAllocator::empty_cache() {
  std::lock_guard lock(mutex_);
  release_free_segments();
}

int64_t CachingAllocator::segment_count() const {
  std::lock_guard lock(mutex_);
  return segments_;
}

}  // namespace remat
