// Shapes and strides (in elements, row-major), and the broadcasting rule shared by all ops.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace remat {

using Shape = std::vector<int64_t>;
using Strides = std::vector<int64_t>;

int64_t numel_of(const Shape& shape);  // unchecked: for shapes of tensors that exist
// The element count of `shape`, checked: sizes >= 0, and the count and its bytes at `element_size`
// within int64. Throws naming `what` otherwise. Every tensor is made through it.
int64_t checked_numel(const Shape& shape, size_t element_size, const char* what);
Strides contiguous_strides(const Shape& shape);
// Strides that present the elements of a tensor of `shape` and `strides` as `new_shape` (the same
// count) without moving them, or an empty optional when no strides can (a reshape must copy). A
// run of dimensions that is contiguous within itself may be split or merged anywhere: the heads of
// a fused projection's slice, [B, T, C] with a row stride of 3C, reshape to [B, T, H, D] in place.
std::optional<Strides> view_strides(const Shape& shape, const Strides& strides, const Shape& new_shape);
std::string shape_str(const Shape& shape);  // "[2,3,4]"
// Wraps a possibly negative axis into [0, rank); throws naming `what` when out of range.
int64_t wrap_axis(int64_t axis, int64_t rank, const char* what);
// NumPy broadcasting of two shapes; throws naming `op` when incompatible.
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);

}  // namespace remat
