// Op spans for timeline traces: forward, backward and replay of every node while a Tracer is
// active on this thread (one pointer check per op otherwise).
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace remat {

struct TraceEvent {
  std::string name;   // op name (or region name for a whole replay)
  std::string phase;  // "forward", "backward", "replay"
  double start_us = 0, duration_us = 0;
};

class Tracer {
 public:
  Tracer() : epoch_(std::chrono::steady_clock::now()) {}
  double now_us() const {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - epoch_).count();
  }
  std::chrono::steady_clock::time_point epoch() const { return epoch_; }
  void add(TraceEvent e) { events_.push_back(std::move(e)); }
  const std::vector<TraceEvent>& events() const { return events_; }

 private:
  std::chrono::steady_clock::time_point epoch_;
  std::vector<TraceEvent> events_;
};

Tracer* active_tracer();
// RAII: make `tracer` active on this thread for the scope.
class TracerScope {
 public:
  explicit TracerScope(Tracer* tracer);
  ~TracerScope();
  TracerScope(const TracerScope&) = delete;
  TracerScope& operator=(const TracerScope&) = delete;

 private:
  Tracer* previous_;
};

// Times its scope into the active tracer, if any.
class TraceSpan {
 public:
  TraceSpan(const char* name, const char* phase) : tracer_(active_tracer()) {
    if (tracer_) {
      name_ = name;
      phase_ = phase;
      start_ = tracer_->now_us();
    }
  }
  ~TraceSpan() {
    if (tracer_) tracer_->add({name_, phase_, start_, tracer_->now_us() - start_});
  }
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  Tracer* tracer_;
  const char* name_ = nullptr;
  const char* phase_ = nullptr;
  double start_ = 0;
};

}  // namespace remat
