// Per-device allocators with {current, peak, allocated, freed} counters, overall and per category.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "device.h"

namespace remat {

// What a block of memory is for; peak memory is reported per category.
enum class MemoryCategory : uint8_t { parameter, gradient, optimizer, activation, workspace };
inline constexpr int kMemoryCategoryCount = 5;
const char* category_name(MemoryCategory c);

struct MemoryCounters {
  int64_t current = 0;    // bytes live now
  int64_t peak = 0;       // max of current since the last reset_peak()
  int64_t allocated = 0;  // bytes handed out in total
  int64_t freed = 0;      // bytes returned in total
};

struct MemoryStats {
  MemoryCounters total;
  std::array<MemoryCounters, kMemoryCategoryCount> by_category{};
  int64_t reserved = 0;  // bytes held from the system: live, and cached for reuse (empty_cache gives those back)
  const MemoryCounters& operator[](MemoryCategory c) const { return by_category[static_cast<int>(c)]; }
};

// One alloc (+bytes) or free (-bytes) event, for the memory timeline.
struct MemoryEvent {
  double time_us;
  int64_t bytes;
  MemoryCategory category;
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  void* allocate(size_t bytes, MemoryCategory category);
  void deallocate(void* ptr, size_t bytes, MemoryCategory category) noexcept;
  // Bytes allocated as `from` that now hold a `to` (a gradient written over an activation): freed
  // from the one category, allocated to the other; the total does not change.
  void recount(size_t bytes, MemoryCategory from, MemoryCategory to) noexcept;

  MemoryStats stats() const;
  void reset_peak();  // peak := current, overall and per category
  // A cap on the bytes handed out at once (0: none): a request past it throws, as one the system
  // refuses does, naming the request and the counters by category.
  void set_limit(int64_t bytes);
  int64_t limit() const;
  // "N bytes now (parameter ..., gradient ..., ...), peak M": for out-of-memory messages.
  std::string usage() const;
  // The recorder keeps every alloc/free event until stopped; used by traces and timelines.
  // Event times are microseconds since `epoch` (default: now), so they line up with other clocks.
  void start_recording(std::chrono::steady_clock::time_point epoch = std::chrono::steady_clock::now());
  std::vector<MemoryEvent> stop_recording();
  // Events recorded so far: marks a point of the timeline by event index (the budget planner's
  // block boundaries).
  size_t recorded_events() const;
  virtual Device device() const = 0;
  // Gives the blocks a caching allocator keeps for reuse back to the system (none by default).
  virtual void release_cache() noexcept {}

 protected:
  virtual void* raw_allocate(size_t bytes) = 0;
  virtual void raw_deallocate(void* ptr, size_t bytes) noexcept = 0;
  virtual int64_t reserved_bytes() const { return stats_.total.current; }

 private:
  void count(int64_t bytes, MemoryCategory category) noexcept;
  void note_event(int64_t bytes, MemoryCategory category);  // for the recorder; mutex_ held
  mutable std::mutex mutex_;
  MemoryStats stats_;
  int64_t limit_ = 0;
  bool recording_ = false;
  std::vector<MemoryEvent> events_;
  std::chrono::steady_clock::time_point record_start_;
};

// The allocator of a device (cpu, or cuda:N when the CUDA backend is built).
Allocator& allocator_for(Device device);
MemoryStats memory_stats(Device device = Device::cpu());
// Gives `device`'s cached free blocks back to the system (the CPU allocator's, or the CUDA caching
// allocator's wholly free segments); live tensors keep theirs.
void empty_cache(Device device = Device::cpu());
// "1.5 GiB", "300 KiB", "12 bytes": for messages.
std::string format_bytes(int64_t bytes);
// "8GiB", "512M", "1e9", "4096": a byte count (K M G T powers of 1000, KiB MiB GiB TiB of 1024),
// from 1 byte to 4e18; anything else is an error saying what is accepted.
int64_t parse_byte_count(const std::string& text);
// The physical memory of this machine, or the cpu allocator's limit when one is set and smaller.
int64_t host_memory_bytes();
// A cap on what `device`'s allocator hands out at once (0 removes it); `remat train --max-memory`.
void set_memory_limit(Device device, int64_t bytes);
// What this thread allocated and freed on `device` (cpu, cuda:0..15): current is its allocations
// minus its frees, so memory one thread allocates and another frees shows on both.
MemoryStats thread_memory_stats(Device device = Device::cpu());
void reset_thread_peak_memory(Device device = Device::cpu());
void reset_peak_memory(Device device = Device::cpu());

// The category new tensors are counted under on this thread. Default: activation.
MemoryCategory current_memory_category();

// RAII: count allocations made in this scope under `category`.
class MemoryCategoryScope {
 public:
  explicit MemoryCategoryScope(MemoryCategory category);
  ~MemoryCategoryScope();
  MemoryCategoryScope(const MemoryCategoryScope&) = delete;
  MemoryCategoryScope& operator=(const MemoryCategoryScope&) = delete;

 private:
  MemoryCategory previous_;
};

}  // namespace remat
