// Op spans for timeline traces and profiles: forward, backward and replay of every node while a
// Tracer is active on this thread (one pointer check per op otherwise). Spans nest (a replay runs
// inside the backward node that needed it), so each event names its parent; with time_gpu(d),
// every span also records events on GPU d's compute stream, which resolve_gpu_times() turns into
// the GPU time the span's kernels took.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace remat {

struct TraceEvent {
  std::string name;   // op name (or region name for a whole replay)
  std::string phase;  // "forward", "backward", "replay"
  double start_us = 0, duration_us = 0;
  int id = -1, parent = -1;  // parent: the span this one ran inside, -1 at the top
  double gpu_us = -1;        // after resolve_gpu_times() on a tracer timing a GPU, else -1
  std::shared_ptr<void> gpu_start, gpu_end;  // the GPU events until resolved
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

  // Spans from now on also time their kernels on GPU `device` (-1: host times only).
  void time_gpu(int device) { gpu_device_ = device; }
  int gpu_device() const { return gpu_device_; }
  // An event recorded now on the timed GPU's compute stream.
  std::shared_ptr<void> gpu_event() const;
  // Waits for the GPU and fills every event's gpu_us (letting go of its GPU events).
  void resolve_gpu_times();

  // The span stack: open() returns a new span's id, whose parent is current() at that moment.
  int open() {
    int id = next_id_++;
    stack_.push_back(id);
    return id;
  }
  void close() { stack_.pop_back(); }
  int current() const { return stack_.empty() ? -1 : stack_.back(); }

 private:
  std::chrono::steady_clock::time_point epoch_;
  std::vector<TraceEvent> events_;
  std::vector<int> stack_;
  int next_id_ = 0;
  int gpu_device_ = -1;
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
      parent_ = tracer_->current();
      id_ = tracer_->open();
      if (tracer_->gpu_device() >= 0) gpu_start_ = tracer_->gpu_event();
      start_ = tracer_->now_us();
    }
  }
  ~TraceSpan() {
    if (!tracer_) return;
    TraceEvent e;
    e.name = name_;
    e.phase = phase_;
    e.start_us = start_;
    e.duration_us = tracer_->now_us() - start_;
    e.id = id_;
    e.parent = parent_;
    if (gpu_start_) {
      e.gpu_start = std::move(gpu_start_);
      try {
        e.gpu_end = tracer_->gpu_event();
      } catch (...) {  // a destructor must not throw: the span keeps its host time only
        e.gpu_start.reset();
      }
    }
    tracer_->close();
    tracer_->add(std::move(e));
  }
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

 private:
  Tracer* tracer_;
  const char* name_ = nullptr;
  const char* phase_ = nullptr;
  double start_ = 0;
  int id_ = -1, parent_ = -1;
  std::shared_ptr<void> gpu_start_;
};

// Time per op and phase over a traced step. An op run inside another span (a backward node's
// matmuls) counts as part of it; any other span run inside one (a replay in a backward node) is
// taken off it and counted on its own. GPU times where the tracer timed a GPU, else host times.
// Sorted by time, largest first.
struct OpTime {
  std::string name, phase;
  int calls = 0;
  double total_us = 0;
};
std::vector<OpTime> self_times(const Tracer& tracer);

}  // namespace remat
