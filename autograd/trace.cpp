// The tracer's GPU events and the per-op profile of a traced step.
#include "autograd/trace.h"

#include <algorithm>
#include <map>
#include <unordered_map>

#include "runtime/cuda_backend.h"

namespace remat {

std::shared_ptr<void> Tracer::gpu_event() const { return cuda_record_event(gpu_device_); }

void Tracer::resolve_gpu_times() {
  for (TraceEvent& e : events_) {
    if (e.gpu_start && e.gpu_end) e.gpu_us = 1000.0 * cuda_elapsed_ms(e.gpu_start, e.gpu_end);
    e.gpu_start.reset();
    e.gpu_end.reset();
  }
}

std::vector<OpTime> self_times(const Tracer& tracer) {
  const auto& events = tracer.events();
  auto time_of = [](const TraceEvent& e) { return e.gpu_us >= 0 ? e.gpu_us : e.duration_us; };
  std::unordered_map<int, const TraceEvent*> by_id;
  for (const TraceEvent& e : events) by_id[e.id] = &e;
  // An op run inside another span (a backward node's matmuls, say) is part of that span's work.
  auto folded = [&](const TraceEvent& e) { return e.phase == "forward" && by_id.count(e.parent) > 0; };
  auto owner = [&](const TraceEvent& e) {  // the nearest listed span around e, or nullptr
    auto found = by_id.find(e.parent);
    while (found != by_id.end() && folded(*found->second)) found = by_id.find(found->second->parent);
    return found == by_id.end() ? nullptr : found->second;
  };
  std::unordered_map<int, double> inside;  // span id -> time of the listed spans run inside it
  for (const TraceEvent& e : events)
    if (!folded(e))
      if (const TraceEvent* o = owner(e)) inside[o->id] += time_of(e);
  std::map<std::pair<std::string, std::string>, OpTime> by_op;
  for (const TraceEvent& e : events) {
    if (folded(e)) continue;
    OpTime& t = by_op[{e.phase, e.name}];
    t.name = e.name;
    t.phase = e.phase;
    t.calls += 1;
    auto found = inside.find(e.id);
    t.total_us += std::max(0.0, time_of(e) - (found == inside.end() ? 0.0 : found->second));
  }
  std::vector<OpTime> out;
  for (auto& [key, t] : by_op) out.push_back(std::move(t));
  std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.total_us > b.total_us; });
  return out;
}

}  // namespace remat
