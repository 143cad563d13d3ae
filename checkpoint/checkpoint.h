// The three ways to open a checkpoint region: an RAII scope, a function wrapper, and
// checkpoint_sequential over a list of functions.
#pragma once

#include <concepts>
#include <exception>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../autograd/graph.h"
#include "../runtime/tensor.h"
#include "options.h"

namespace remat {

// Everything recorded while the scope lives forms one region, on the graph its first op records
// onto (the scopes open together share it). Under no-grad it does nothing.
class CheckpointScope final : public RecordingScope {
 public:
  explicit CheckpointScope(CheckpointOptions options = {});
  // Closes the region if close() was not called. Never throws. A scope destroyed while scopes opened
  // after it are still open closes them first (their regions end here too).
  ~CheckpointScope() override;
  CheckpointScope(const CheckpointScope&) = delete;
  CheckpointScope& operator=(const CheckpointScope&) = delete;

  // Closes the region now. Throws, changing nothing, when a scope opened after this one is still open.
  void close() override;
  bool active() const { return active_ && !closed_; }
  int region() const { return region_; }
  void begin_on(const std::shared_ptr<Graph>& graph) override;

 private:
  CheckpointOptions options_;
  bool active_ = false, closed_ = false;
  std::shared_ptr<Graph> graph_;
  int region_ = -1;
};

// Scopes that module hooks open in a pre-hook and close in a post-hook, kept per thread under a
// key of the hook's own (next_scope_key): a module called from two threads has a scope in each.
uint64_t next_scope_key();
std::vector<std::unique_ptr<CheckpointScope>>& thread_scopes(uint64_t key);
// Closes the innermost scope of `key` on this thread (none: nothing). While an exception is
// propagating (`threw`) a failure to close is swallowed; otherwise it propagates.
void close_thread_scope(uint64_t key, bool threw);

// Runs fn(args...) inside a region and returns its result. Replay in backward re-executes the
// recorded ops, never fn.
template <typename F, typename... Args>
  requires std::invocable<F, Args...>
auto checkpoint(const CheckpointOptions& options, F&& fn, Args&&... args) {
  CheckpointScope scope(options);
  return std::invoke(std::forward<F>(fn), std::forward<Args>(args)...);
}

template <typename F, typename... Args>
  requires(!std::is_same_v<std::decay_t<F>, CheckpointOptions> && std::invocable<F, Args...>)
auto checkpoint(F&& fn, Args&&... args) {
  return checkpoint(CheckpointOptions{}, std::forward<F>(fn), std::forward<Args>(args)...);
}

using TensorFn = std::function<Tensor(const Tensor&)>;

// Splits `fns` into `segments` consecutive groups (sizes as even as possible, the remainder in the
// last); each of the first segments-1 groups runs as one region, the last runs plainly.
Tensor checkpoint_sequential(const std::vector<TensorFn>& fns, int segments, const Tensor& x,
                             const CheckpointOptions& options = {});

}  // namespace remat
