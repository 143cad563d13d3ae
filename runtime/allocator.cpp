// Counting allocator base and the CPU allocator (64-byte aligned, for vector loads).
#include "runtime/allocator.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>

#include "runtime/cpu_allocator.h"
#include "runtime/error.h"

namespace remat {

const char* category_name(MemoryCategory c) {
  switch (c) {
    case MemoryCategory::parameter: return "parameter";
    case MemoryCategory::gradient: return "gradient";
    case MemoryCategory::optimizer: return "optimizer";
    case MemoryCategory::activation: return "activation";
    case MemoryCategory::workspace: return "workspace";
  }
  return "?";
}

void* Allocator::allocate(size_t bytes, MemoryCategory category) {
  if (bytes == 0) return nullptr;
  int64_t cap = limit();
  if (cap > 0) {
    int64_t now = stats().total.current;
    REMAT_CHECK(static_cast<int64_t>(bytes) <= cap - now, "out of memory on ", device().str(), ": a ",
                category_name(category), " tensor of ", bytes, " bytes would pass the limit of ", cap, " bytes; ", usage());
  }
  void* ptr = raw_allocate(bytes);
  count(static_cast<int64_t>(bytes), category);
  return ptr;
}

void Allocator::deallocate(void* ptr, size_t bytes, MemoryCategory category) noexcept {
  if (!ptr) return;
  raw_deallocate(ptr, bytes);
  count(-static_cast<int64_t>(bytes), category);
}

namespace {

// Per thread, by device slot (cpu, then cuda:0..15): what this thread allocated and freed.
constexpr int kThreadSlots = 17;
thread_local std::array<MemoryStats, kThreadSlots> t_thread_stats{};

int thread_slot(Device device) { return device.is_cpu() ? 0 : device.index + 1 < kThreadSlots ? device.index + 1 : -1; }

}  // namespace

namespace {

// Bytes handed out (> 0) or returned (< 0) under one counter.
void add_to(MemoryCounters& c, int64_t bytes) {
  c.current += bytes;
  if (bytes > 0) c.allocated += bytes;
  else c.freed -= bytes;
  if (c.current > c.peak) c.peak = c.current;
}

}  // namespace

void Allocator::count(int64_t bytes, MemoryCategory category) noexcept {
  const auto c = static_cast<int>(category);
  if (int slot = thread_slot(device()); slot >= 0) {
    add_to(t_thread_stats[slot].total, bytes);
    add_to(t_thread_stats[slot].by_category[c], bytes);
  }
  std::lock_guard lock(mutex_);
  add_to(stats_.total, bytes);
  add_to(stats_.by_category[c], bytes);
  note_event(bytes, category);
}

void Allocator::recount(size_t bytes, MemoryCategory from, MemoryCategory to) noexcept {
  if (bytes == 0 || from == to) return;
  const auto n = static_cast<int64_t>(bytes);
  auto move = [&](MemoryStats& s) {
    add_to(s.by_category[static_cast<int>(from)], -n);
    add_to(s.by_category[static_cast<int>(to)], n);
  };
  if (int slot = thread_slot(device()); slot >= 0) move(t_thread_stats[slot]);
  std::lock_guard lock(mutex_);
  move(stats_);
  note_event(-n, from);
  note_event(n, to);
}

void Allocator::note_event(int64_t bytes, MemoryCategory category) {
  if (!recording_) return;
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - record_start_).count();
  events_.push_back({us, bytes, category});
}

MemoryStats Allocator::stats() const {
  std::lock_guard lock(mutex_);
  MemoryStats s = stats_;
  s.reserved = reserved_bytes();
  return s;
}

void Allocator::reset_peak() {
  std::lock_guard lock(mutex_);
  stats_.total.peak = stats_.total.current;
  for (auto& c : stats_.by_category) c.peak = c.current;
}

void Allocator::set_limit(int64_t bytes) {
  REMAT_CHECK(bytes >= 0, "memory limit: expected bytes >= 0 (0: none), got ", bytes);
  std::lock_guard lock(mutex_);
  limit_ = bytes;
}

int64_t Allocator::limit() const {
  std::lock_guard lock(mutex_);
  return limit_;
}

std::string Allocator::usage() const {
  MemoryStats s = stats();
  std::string out = std::to_string(s.total.current) + " bytes allocated now (";
  for (int c = 0; c < kMemoryCategoryCount; ++c)
    out += std::string(c ? ", " : "") + category_name(static_cast<MemoryCategory>(c)) + " " +
           std::to_string(s.by_category[c].current);
  return out + "), peak " + std::to_string(s.total.peak);
}

void Allocator::start_recording(std::chrono::steady_clock::time_point epoch) {
  std::lock_guard lock(mutex_);
  recording_ = true;
  events_.clear();
  record_start_ = epoch;
}

std::vector<MemoryEvent> Allocator::stop_recording() {
  std::lock_guard lock(mutex_);
  recording_ = false;
  return std::move(events_);
}

size_t Allocator::recorded_events() const {
  std::lock_guard lock(mutex_);
  return events_.size();
}

namespace {

thread_local MemoryCategory t_category = MemoryCategory::activation;

}  // namespace

Allocator* cuda_allocator(int index);  // runtime/cuda; throws when CUDA is not built or absent

Allocator& allocator_for(Device device) {
  if (device.is_cpu()) return cpu_allocator();
  return *cuda_allocator(device.index);
}

MemoryStats memory_stats(Device device) { return allocator_for(device).stats(); }

void empty_cache(Device device) { allocator_for(device).release_cache(); }

std::string format_bytes(int64_t bytes) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (std::abs(v) >= 1024 && u < 5) v /= 1024, ++u;
  char text[48];
  std::snprintf(text, sizeof text, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return text;
}

int64_t parse_byte_count(const std::string& text) {
  const char* accepted = ": expected a number of bytes, optionally with K, M, G, T, KiB, MiB, GiB or TiB";
  char* end = nullptr;
  double value = text.empty() ? 0 : std::strtod(text.c_str(), &end);
  REMAT_CHECK(!text.empty() && end != text.c_str() && std::isfinite(value), "byte count '", text, "'", accepted);
  std::string unit(end);
  const std::pair<const char*, double> units[] = {{"", 1},          {"K", 1e3},         {"M", 1e6},
                                                  {"G", 1e9},       {"T", 1e12},        {"KiB", 1024.0},
                                                  {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}};
  for (const auto& [name, scale] : units)
    if (unit == name) {
      double bytes = value * scale;
      REMAT_CHECK(bytes >= 1 && bytes <= 4.0e18, "byte count '", text, "': expected between 1 byte and 4e18 bytes");
      return static_cast<int64_t>(bytes);
    }
  REMAT_FAIL("byte count '", text, "': unknown unit '", unit, "'", accepted);
}

int64_t host_memory_bytes() {
  int64_t physical = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGE_SIZE));
  int64_t cap = allocator_for(Device::cpu()).limit();
  return cap > 0 && cap < physical ? cap : physical;
}

void set_memory_limit(Device device, int64_t bytes) { allocator_for(device).set_limit(bytes); }
void reset_peak_memory(Device device) { allocator_for(device).reset_peak(); }

MemoryStats thread_memory_stats(Device device) {
  int slot = thread_slot(device);
  REMAT_CHECK(slot >= 0, "thread_memory_stats: counted for cpu and cuda:0..", kThreadSlots - 2, ", not ", device.str());
  return t_thread_stats[slot];
}

void reset_thread_peak_memory(Device device) {
  int slot = thread_slot(device);
  if (slot < 0) return;
  MemoryStats& s = t_thread_stats[slot];
  s.total.peak = s.total.current;
  for (auto& c : s.by_category) c.peak = c.current;
}

MemoryCategory current_memory_category() { return t_category; }
MemoryCategoryScope::MemoryCategoryScope(MemoryCategory category) : previous_(t_category) { t_category = category; }
MemoryCategoryScope::~MemoryCategoryScope() { t_category = previous_; }

}  // namespace remat
