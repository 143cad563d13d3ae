// The one list of ops: name, number of inputs and outputs (-1: variadic). Used by the dispatcher,
// by `remat ops`, by docs/ops.md and by the test index (every op must have its tests).
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace remat {

// X(name, inputs, outputs)
#define REMAT_OPS(X)            \
  X(add, 2, 1)                  \
  X(sub, 2, 1)                  \
  X(mul, 2, 1)                  \
  X(div, 2, 1)                  \
  X(add_scalar, 1, 1)           \
  X(mul_scalar, 1, 1)           \
  X(pow_scalar, 1, 1)           \
  X(neg, 1, 1)                  \
  X(exp, 1, 1)                  \
  X(log, 1, 1)                  \
  X(tanh, 1, 1)                 \
  X(sqrt, 1, 1)                 \
  X(rsqrt, 1, 1)                \
  X(relu, 1, 1)                 \
  X(gelu, 1, 1)                 \
  X(silu, 1, 1)                 \
  X(sigmoid, 1, 1)              \
  X(sum, 1, 1)                  \
  X(mean, 1, 1)                 \
  X(max, 1, 1)                  \
  X(reshape, 1, 1)              \
  X(permute, 1, 1)              \
  X(slice, 1, 1)                \
  X(concat, -1, 1)              \
  X(split, 1, -1)               \
  X(expand, 1, 1)               \
  X(contiguous, 1, 1)           \
  X(matmul, 2, 1)               \
  X(linear, -1, 1)              \
  X(layer_norm, 3, 3)           \
  X(softmax, 1, 1)              \
  X(attention, 3, 2)            \
  X(dropout, 1, 1)              \
  X(dropout_add, 2, 1)          \
  X(embedding, 2, 1)            \
  X(cross_entropy, 2, 2)        \
  X(linear_cross_entropy, 3, 2) \
  X(conv2d, -1, 1)              \
  X(group_norm, 3, 3)           \
  X(upsample_nearest, 1, 1)     \
  X(avg_pool, 1, 1)             \
  X(modulate, 3, 1)             \
  X(timestep_embedding, 1, 1)   \
  X(cast, 1, 1)                 \
  X(custom, -1, -1)

enum class OpKind : uint8_t {
#define REMAT_OP_ENUM(name, in, out) name,
  REMAT_OPS(REMAT_OP_ENUM)
#undef REMAT_OP_ENUM
};

struct OpInfo {
  const char* name;
  int inputs;   // -1: variadic
  int outputs;  // -1: variadic
};

inline constexpr std::array kOpInfo = {
#define REMAT_OP_INFO(name, in, out) OpInfo{#name, in, out},
    REMAT_OPS(REMAT_OP_INFO)
#undef REMAT_OP_INFO
};
inline constexpr int kOpCount = static_cast<int>(kOpInfo.size());
static_assert(kOpCount == static_cast<int>(OpKind::custom) + 1, "op table and enum out of step");

inline constexpr const char* op_name(OpKind op) { return kOpInfo[static_cast<int>(op)].name; }
// Throws listing the known op names when `name` is not one.
OpKind parse_op(const std::string& name);

}  // namespace remat
