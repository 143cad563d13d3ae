// CheckpointScope and checkpoint_sequential.
#include "checkpoint/checkpoint.h"

#include <atomic>
#include <cstdio>
#include <unordered_map>

#include "autograd/grad_mode.h"
#include "checkpoint/region.h"

namespace remat {

CheckpointScope::CheckpointScope(CheckpointOptions options) : options_(std::move(options)) {
  if (!grad_enabled()) return;  // nothing is recorded, so there is nothing to drop
  active_ = true;
  push_recording_scope(this);
}

void CheckpointScope::begin_on(const std::shared_ptr<Graph>& graph) {
  graph_ = graph;
  region_ = RegionManager::of(*graph).open(*graph, options_);
}

void CheckpointScope::close() {
  if (!active_ || closed_) return;
  pop_recording_scope(this, options_.name.empty() ? std::string("(unnamed)") : options_.name);
  closed_ = true;
  if (graph_) RegionManager::of(*graph_).close(*graph_, region_);
}

CheckpointScope::~CheckpointScope() {
  if (!active_ || closed_) return;
  try {
    for (RecordingScope* inner = innermost_recording_scope(); inner != nullptr && inner != this;
         inner = innermost_recording_scope())
      inner->close();
    close();
  } catch (...) {
    // Closing only drops slots; nothing in it is user code. Never terminate over it.
  }
}

namespace {
std::atomic<uint64_t> g_scope_keys{1};
thread_local std::unordered_map<uint64_t, std::vector<std::unique_ptr<CheckpointScope>>> t_hook_scopes;
}  // namespace

uint64_t next_scope_key() { return g_scope_keys.fetch_add(1); }

std::vector<std::unique_ptr<CheckpointScope>>& thread_scopes(uint64_t key) { return t_hook_scopes[key]; }

void close_thread_scope(uint64_t key, bool threw) {
  auto found = t_hook_scopes.find(key);
  if (found == t_hook_scopes.end() || found->second.empty()) return;
  std::unique_ptr<CheckpointScope> scope = std::move(found->second.back());
  found->second.pop_back();
  if (found->second.empty()) t_hook_scopes.erase(found);
  if (!scope) return;
  // Closed here, not in the unique_ptr's destructor, so that an error can propagate.
  if (!threw) {
    scope->close();
    return;
  }
  try {
    scope->close();
  } catch (...) {
    // The forward's own exception is the one to report; the destructor closes what is left.
  }
}

Tensor checkpoint_sequential(const std::vector<TensorFn>& fns, int segments, const Tensor& x,
                             const CheckpointOptions& options) {
  int count = static_cast<int>(fns.size());
  REMAT_CHECK(segments > 0 && segments <= count, "checkpoint_sequential: expected 1 <= segments <= ", count,
              " (the number of functions), got ", segments);
  int size = count / segments;
  Tensor h = x;
  int start = 0;
  for (int s = 0; s < segments; ++s) {
    int stop = s == segments - 1 ? count : start + size;
    auto run = [&] {
      for (int i = start; i < stop; ++i) h = fns[i](h);
    };
    if (s < segments - 1) {
      CheckpointOptions segment_options = options;
      if (!segment_options.name.empty()) segment_options.name += '.' + std::to_string(s);
      CheckpointScope scope(segment_options);
      run();
    } else {
      run();
    }
    start = stop;
  }
  return h;
}

}  // namespace remat
