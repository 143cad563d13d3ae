// Parsing and printing of dtypes, devices and shapes.
#include <cctype>
#include <charconv>

#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/shape.h"

namespace remat {

DType parse_dtype(const std::string& name) {
  for (DType t : {DType::f32, DType::f64, DType::i32, DType::i64, DType::u8, DType::bf16, DType::f16})
    if (name == dtype_name(t)) return t;
  REMAT_FAIL("unknown dtype '", name, "': expected one of f32, f64, i32, i64, u8, bf16, f16");
}

std::string Device::str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

Device parse_device(const std::string& text) {
  if (text == "cpu") return Device::cpu();
  if (text == "cuda") return Device::cuda(0);
  if (text.rfind("cuda:", 0) == 0) {
    int index = -1;
    const char* end = text.data() + text.size();
    auto [stop, error] = std::from_chars(text.data() + 5, end, index);
    if (error == std::errc() && stop == end && text.size() > 5 && std::isdigit(static_cast<unsigned char>(text[5])))
      return Device::cuda(index);
    REMAT_FAIL("unknown device '", text, "': expected cuda:N with N a device index from 0 to 2^31 - 1");
  }
  REMAT_FAIL("unknown device '", text, "': expected cpu, cuda or cuda:N");
}

// Unsigned arithmetic: a shape that overflows (rejected by checked_numel wherever tensors are made)
// must not be undefined behaviour on the way to that error.
int64_t numel_of(const Shape& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return static_cast<int64_t>(n);
}

std::optional<Strides> view_strides(const Shape& shape, const Strides& strides, const Shape& new_shape) {
  if (numel_of(shape) == 0) return contiguous_strides(new_shape);  // nothing to address
  // Size-1 dimensions carry no layout: dropped from the old shape, any stride in the new one.
  Shape old_shape;
  Strides old_strides;
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != 1) old_shape.push_back(shape[i]), old_strides.push_back(strides[i]);
  Strides out(new_shape.size(), 1);
  int64_t v = static_cast<int64_t>(new_shape.size()) - 1;  // the next new dimension, from the back
  // Walk the old dimensions from the back in chunks that are contiguous within themselves (each
  // dimension's stride = the next one's stride x size); each chunk must be exactly covered by
  // consecutive new dimensions, which then take strides from the chunk's innermost stride.
  for (int64_t d = static_cast<int64_t>(old_shape.size()) - 1; d >= 0;) {
    int64_t end = d, chunk = old_shape[d];
    while (d > 0 && old_strides[d - 1] == old_strides[d] * old_shape[d]) chunk *= old_shape[--d];
    int64_t step = old_strides[end], covered = 1;
    while (v >= 0 && (covered < chunk || new_shape[v] == 1)) {
      out[v] = covered * step;
      covered *= new_shape[v--];
    }
    if (covered != chunk) return std::nullopt;
    --d;
  }
  for (; v >= 0; --v) {  // leading size-1 dimensions
    if (new_shape[v] != 1) return std::nullopt;
    out[v] = 1;
  }
  return out;
}

Strides contiguous_strides(const Shape& shape) {
  Strides strides(shape.size());
  uint64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = static_cast<int64_t>(s);
    s *= static_cast<uint64_t>(shape[i]);
  }
  return strides;
}

int64_t checked_numel(const Shape& shape, size_t element_size, const char* what) {
  int64_t n = 1;
  bool zero = false;
  for (int64_t d : shape) {
    REMAT_CHECK(d >= 0, what, ": expected non-negative sizes, got ", shape_str(shape));
    zero = zero || d == 0;
  }
  if (zero) return 0;  // [0, 2^40, 2^40] is empty, not an overflow
  for (int64_t d : shape)
    REMAT_CHECK(!__builtin_mul_overflow(n, d, &n), what, ": the shape ", shape_str(shape),
                " has more elements than a 64-bit count holds");
  int64_t bytes = 0;
  REMAT_CHECK(!__builtin_mul_overflow(n, static_cast<int64_t>(element_size), &bytes), what, ": the shape ",
              shape_str(shape), " needs more bytes than a 64-bit size holds (", n, " elements of ", element_size, ")");
  return n;
}

std::string shape_str(const Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

int64_t wrap_axis(int64_t axis, int64_t rank, const char* what) {
  REMAT_CHECK(axis >= -rank && axis < rank, what, ": expected an axis in [", -rank, ", ", rank,
              "), got ", axis);
  return axis < 0 ? axis + rank : axis;
}

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    REMAT_CHECK(da == db || da == 1 || db == 1, op, ": expected broadcastable shapes, got ",
                shape_str(a), " and ", shape_str(b));
    out[i] = da == 1 ? db : da;
  }
  return out;
}

}  // namespace remat
