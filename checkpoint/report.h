// What a policy saves: runs one forward with the policy applied and lists, per region, every
// tensor produced inside it that backward reads, with its op, shape, bytes and whether it is kept.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "../autograd/module.h"
#include "options.h"

namespace remat {

struct SavedTensorEntry {
  std::string region;  // innermost region that produced it
  int depth = 0;       // nesting depth of that region
  std::string op;      // the op that produced it
  Shape shape;
  DType dtype = DType::f32;
  int64_t bytes = 0;
  bool saved = false;  // kept through forward; false: rebuilt by replay in backward
};

struct SaveReport {
  std::string policy;
  int regions = 0;
  std::vector<SavedTensorEntry> entries;
  int64_t saved_bytes = 0, recomputed_bytes = 0;
  std::map<std::string, int64_t> saved_by_op, recomputed_by_op;
  int64_t offload_decisions = 0;  // MUST/PREFER_OFFLOAD answers; on CPU they keep the tensor
  std::string note;
  std::string to_string() const;  // a table and the totals
};

// Applies `policy` (the policy string) to `model`, runs `forward` once in training mode with grad
// enabled (the random stream is restored afterwards), reads the regions off the tape, and removes
// the checkpoint hooks again.
SaveReport what_is_saved(Module& model, const std::string& policy, const std::function<Tensor()>& forward);
// The same with the whole model as one region under `options` (custom per-op policies).
SaveReport what_is_saved(Module& model, const CheckpointOptions& options, const std::function<Tensor()>& forward);

}  // namespace remat
