// Per-op save/recompute policies: a region asks its policy, for every op whose output a node
// inside the region saved, whether to keep that output or rebuild it by replay in backward.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "../kernels/op_list.h"
#include "../runtime/tensor.h"

namespace remat {

// MUST_* and PREFER_* mirror PyTorch's CheckpointPolicy. In eager mode both strengths act the same
// inside one region; across nested regions a MUST_SAVE of an inner region is kept even when an
// outer region prefers to recompute. Offload variants move saved tensors to host memory on GPU and
// behave as save on CPU.
enum class Decision : uint8_t { must_save, prefer_save, must_recompute, prefer_recompute, must_offload, prefer_offload };
const char* decision_name(Decision d);
inline bool is_save(Decision d) {
  return d == Decision::must_save || d == Decision::prefer_save || d == Decision::must_offload ||
         d == Decision::prefer_offload;
}
inline bool is_must(Decision d) {
  return d == Decision::must_save || d == Decision::must_recompute || d == Decision::must_offload;
}

struct ValueMeta {
  Shape shape;
  DType dtype = DType::f32;
  Device device;
};

// What a policy sees of one op: its kind and name, its inputs' and outputs' metadata, the user
// tag of its first output (checkpoint_name), whether this call comes from replay, and its position
// in the region.
struct PolicyContext {
  OpKind kind = OpKind::custom;
  std::string op_name;
  std::vector<ValueMeta> inputs;
  std::vector<ValueMeta> outputs;
  std::string tag;
  bool is_recompute = false;
  // The op's place among the ops recorded in the asking region (0: its first op). Which of a
  // block's ops to recompute can so be decided op by op (the budget planner does).
  int64_t position = -1;
};

using PolicyFn = std::function<Decision(const PolicyContext&)>;

struct Policy {
  std::string name;
  PolicyFn decide;
};

// What a memory budget covers: the activations (what checkpointing changes), or every byte on the
// device (parameters, gradients, optimizer state, activations, workspace).
enum class BudgetScope { activations, total };

// Recompute everything: full activation checkpointing.
Policy save_nothing();
// Save everything: a region that drops nothing (useful as a baseline).
Policy save_all();
// Selective checkpointing by op kind: outputs of the listed ops are saved (MUST_SAVE), the rest
// recomputed. The `ops` preset lists matmul, linear and attention.
Policy save_ops(const std::vector<OpKind>& ops, std::string name = "");
Policy ops_preset();
// By user tag (checkpoint_name): tensors named in `names` are saved, everything else recomputed;
// recompute_names does the opposite (named tensors recomputed, the rest saved).
Policy save_names(const std::vector<std::string>& names);
Policy recompute_names(const std::vector<std::string>& names);

}  // namespace remat
