// Checkpoint regions as tape segments. A region is a contiguous range of tape nodes; its policy
// decides for each op as it is recorded, and saved slots of values it will not keep are dropped as
// soon as they are created (at close, the inputs of nested regions produced inside follow). In
// backward, a node's unpack of a dropped slot replays, from the recorded nodes, what that node
// reads, starting from the nearest available values (saved outputs, kept or rebuilt values, the
// region's inputs); dropped slots of nodes still to come that the pass rebuilt on the way are kept
// for them, so no pass rebuilds a value twice; rebuilt tensors are freed after their last consumer.
// A whole-model region then holds at once only what the next few backward nodes need.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../autograd/graph.h"
#include "counters.h"
#include "options.h"

namespace remat {

// A slot that keeps a region's input alive (values produced before the region). An outer region
// may drop it; then it is rebuilt like any saved slot.
struct RegionInput {
  int64_t value = -1;
  SlotState state = SlotState::kept;
};

struct Region {
  int id = -1;
  int parent = -1;
  int depth = 0;
  int64_t begin = 0, end = -1;  // node range [begin, end); end = -1 while open
  CheckpointOptions options;
  std::vector<RegionInput> inputs;
  // Outputs of ops the policy said to save, held so that replay starts from them instead of
  // re-running those ops (even when no backward slot reads them).
  std::vector<RegionInput> saved_outputs;
  std::vector<Decision> decisions;  // the policy's answer for each node since begin, taken at record time
  RegionCounters counters;
  bool replayed = false;  // at least once in the current backward
  std::vector<std::string> forward_ops, replay_ops;  // debug mode only
  bool contains(int64_t node) const { return node >= begin && (end < 0 || node < end); }
};

// The checkpoint layer's SavedTensorHooks: one per graph, installed when the first region opens.
class RegionManager final : public SavedTensorHooks {
 public:
  static RegionManager& of(Graph& graph);  // installs on first use

  int open(Graph& graph, CheckpointOptions options);
  void close(Graph& graph, int region);
  const std::vector<Region>& regions() const { return regions_; }

  void on_record(Graph& graph, int64_t node, const std::vector<Tensor>& inputs,
                 const std::vector<Tensor>& outputs) override;
  Tensor unpack_dropped(Graph& graph, int64_t node, size_t slot) override;
  void on_tag(Graph& graph, int64_t value, const Tensor& data) override;
  void before_backward(Graph& graph, bool retain_graph, int64_t root_value) override;
  void after_backward_node(Graph& graph, int64_t node, bool retain_graph) override;
  void before_slot_release(Graph& graph, int64_t node, size_t slot) override;
  void after_backward(Graph& graph, bool retain_graph) override;
  std::string open_region() const override;

 private:
  // A dropped slot (node >= 0) or a nested region's dropped input (node = -1 - region, slot = input).
  struct Target {
    int64_t node, slot, value;
  };
  // One replay pass of `region`: rebuilds `targets` for the backward node at `position`.
  void replay(Graph& graph, int region, const std::vector<Target>& targets, int64_t position);
  // The outer region rebuilds the dropped inputs of `child`, all of them (held until backward leaves it).
  void replay_inputs_of(Graph& graph, int child, int64_t position);
  // Whether a dropped slot (or nested region input) of `region` still waits for its data in this
  // backward, which is at `position`.
  bool pending(const Graph& graph, int region, int64_t node, int64_t slot, int64_t position) const;
  bool available(const Graph& graph, int64_t value) const { return graph.values[value].data.defined(); }
  // The saved outputs of `region` that a replay still to come may read, given what stays available
  // until each waiting slot's node runs: values held for slots, kept slots, the region's inputs, and
  // `will_hold` (values this pass is about to hold, by the node they are held for).
  std::unordered_set<int64_t> saved_outputs_still_needed(const Graph& graph, int region,
                                                         const std::unordered_map<int64_t, int64_t>& will_hold) const;
  // Whether every node of `region` not yet through a backward runs in this one (saved outputs may
  // then go early; another loss's later backward could still need them otherwise).
  bool whole_region_in_this_backward(const Graph& graph, int region);
  // Lets go of a saved output `region` holds for replay.
  void release_saved_output(Graph& graph, int region, int64_t value);
  // The last slots that read `value` (`going` holds of it) are going: the regions that keep it, or
  // the value it is a view of, as a saved output and whose replays still to come cannot read it let
  // go of it now, not when a replay or the end of backward gets to it (gpt's logits under `ops`,
  // whose gradient may then take their place).
  void release_saved_outputs_done_with(Graph& graph, int64_t value, int going);
  void hold_rebuilt(Graph& graph, int64_t node, int64_t slot, int64_t value, const Tensor& data);
  void release_rebuilt(Graph& graph, int64_t node, int64_t slot, int64_t value);
  // Gives the data of `value`, whose last kept slot (of `node`) is going, to the dropped slots that
  // still wait for it.
  void hand_over(Graph& graph, int64_t node, int64_t value);
  // Whether every node of the region has been through a backward (`finishing` is about to be):
  // only then may its inputs go, since two losses can share a region.
  bool all_done(const Graph& graph, const Region& r, int64_t finishing) const;
  std::string debug_text(const Region& r) const;
  [[noreturn]] void fail(const Region& r, const std::string& message) const;

  std::vector<Region> regions_;
  std::vector<int> open_;  // stack of open region ids
  // Rebuilt data held for a dropped slot: (node, slot) for node slots, (-1 - region, input) for region inputs.
  std::set<std::pair<int64_t, int64_t>> rebuilt_holds_;
  std::unordered_set<int64_t> must_saved_;      // producer nodes some region marked MUST_SAVE
  std::unordered_set<int64_t> dropped_values_;  // values already counted in bytes_dropped
  std::set<int> offload_devices_;              // the GPUs whose saved outputs went to host memory
  // This backward: the root's value (-1: not on this graph, or between backwards), retain_graph,
  // and per region whether all its remaining nodes are the root's ancestors (computed on first use).
  int64_t backward_root_ = -1;
  bool backward_retains_ = true;
  std::unordered_map<int, bool> whole_region_;
  // value -> its dropped slots, (node, slot) or (-1 - region, input), to hand data over to them.
  std::unordered_map<int64_t, std::vector<std::pair<int64_t, int64_t>>> dropped_slots_;
};

}  // namespace remat
