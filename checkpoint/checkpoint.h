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

#include "../runtime/tensor.h"
#include "options.h"

namespace remat {

class Graph;

// Everything recorded while the scope lives forms one region. Under no-grad it does nothing.
class CheckpointScope {
 public:
  explicit CheckpointScope(CheckpointOptions options = {});
  // Closing applies the policy. If the policy throws while an exception is already propagating,
  // the region keeps everything instead (no terminate); otherwise the error propagates.
  ~CheckpointScope() noexcept(false);
  CheckpointScope(const CheckpointScope&) = delete;
  CheckpointScope& operator=(const CheckpointScope&) = delete;

  bool active() const { return graph_ != nullptr; }
  int region() const { return region_; }

 private:
  std::shared_ptr<Graph> graph_;
  int region_ = -1;
  int uncaught_ = 0;
};

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
