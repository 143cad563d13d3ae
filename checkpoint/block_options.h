// What each way of treating a block costs the budget planner, from the recorded step's tape: the
// bytes it keeps, rebuilds and offloads, its forward working set and its time (planner.h explains
// the terms). Internal to the planner (planner.cpp builds the tape, plan_search.cpp searches).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "autograd/graph.h"
#include "checkpoint/planner.h"

namespace remat::planning {

inline int64_t value_bytes(const ValueInfo& v) {
  return numel_of(v.shape) * static_cast<int64_t>(dtype_size(v.dtype));
}

// A value is known by the graph and value that produced it, whatever graph reads it.
using Key = std::pair<Graph*, int64_t>;

// Bytes that values hold in memory, added up once per storage: values sharing one (a view and its
// base, the heads split from one projection) count it once, at the storage's size. A storage made
// before the step (its data, say) counts nothing: the step's activations are measured above what
// was alive at its start. A value whose data the step no longer holds counts its own size.
class HeldBytes {
 public:
  explicit HeldBytes(uint64_t step_first_storage) : step_first_storage_(step_first_storage) {}
  // Adds a value; returns the bytes that adds (0 for a storage counted already).
  int64_t add(const Key& k) {
    const ValueInfo& v = k.first->values[k.second];
    int64_t bytes = 0;
    if (!v.data.defined() || !v.data.storage()) bytes = value_bytes(v);
    else if (storages_.insert(v.data.storage().get()).second && v.data.storage()->serial() >= step_first_storage_)
      bytes = static_cast<int64_t>(v.data.storage()->bytes());
    total_ += bytes;
    return bytes;
  }
  int64_t total() const { return total_; }

 private:
  uint64_t step_first_storage_;
  std::set<const Storage*> storages_;
  int64_t total_ = 0;
};

// What a step's activations are: not the parameters.
bool counts(const Key& k);
// The storage of a value's data (null where the graph no longer holds it).
const Storage* storage_of(const Key& k);

// A block as recorded: its nodes in recording order, its non-parameter inputs, the values its
// nodes save, and which node produced each of its values.
struct BlockTape {
  std::vector<TapeNode> nodes;
  std::set<Key> inputs, saved;
  std::map<Key, size_t> producer_of;
  const std::map<const Storage*, size_t>* released = nullptr;  // ProgramReleases::released()
  uint64_t step_first_storage = 0;  // the serial of the step's first storage
  const Node& node(size_t i) const { return *nodes[i].graph->nodes[nodes[i].index]; }
};

// An option before the timeline is known: besides its costs, the saved storages it lets go of in
// forward, each with the event count at which the program released it.
struct Candidate {
  BlockOption option;
  std::vector<std::pair<size_t, int64_t>> releases;  // (event count, bytes)
};

// The block's candidate options (besides keep): every prefix of its ops ordered by recorded time
// per output byte (views first, as they cost no memory of their own); the op classes cumulatively;
// the sets by what is dropped; with `offload`, variants of those that move saved outputs to host
// memory. Those keeping no less than the block without checkpointing are left out; `undominated`
// filters the rest once the timeline gives their forward peaks.
std::vector<Candidate> block_candidates(const BlockTape& b, int64_t saved_bytes, bool offload);

// A block's forward working set when the storages in `releases` go at their event counts: the
// most alive above the block's start (alive[first]) at any point of its events [first, end).
int64_t forward_peak(const std::vector<int64_t>& alive, size_t first, size_t end,
                     std::vector<std::pair<size_t, int64_t>> releases);

// The block's options once each candidate's forward peak is known: keep first, then those no
// other beats in kept bytes, replay peak, forward peak, what offload holds and time.
std::vector<BlockOption> undominated(std::vector<BlockOption> candidates, int64_t saved_bytes,
                                     int64_t forward_peak_bytes);

}  // namespace remat::planning
