// The autocast scope and the casting rules of mixed precision (see autocast.h).
#include "autograd/autocast.h"

#include "autograd/ops.h"

namespace remat {

namespace {
thread_local DType t_autocast = DType::f32;
}  // namespace

DType autocast_dtype() { return t_autocast; }
bool autocast_active() { return t_autocast != DType::f32; }

AutocastScope::AutocastScope(DType dtype) : previous_(t_autocast) {
  REMAT_CHECK(is_floating(dtype), "autocast: expected a floating compute dtype, got ", dtype_name(dtype));
  t_autocast = dtype;
}
AutocastScope::~AutocastScope() { t_autocast = previous_; }

DType parse_compute_dtype(const std::string& text, Device device) {
  if (text == "f32") return DType::f32;
  REMAT_CHECK(text == "bf16", "--dtype: expected f32 or bf16, got '", text, "'");
  REMAT_CHECK(device.is_cuda(), "--dtype bf16 computes on cuda only (the cpu kernels compute in f32 and f64); got --device ",
              device.str());
  return DType::bf16;
}

namespace detail {

Tensor autocast_compute(const Tensor& t) {
  if (!autocast_active() || !t.defined() || t.dtype() != DType::f32) return t;
  return cast(t, t_autocast);
}

Tensor autocast_full(const Tensor& t) {
  if (!autocast_active() || !t.defined() || t.dtype() != t_autocast) return t;
  return cast(t, DType::f32);
}

void autocast_match(Tensor& a, Tensor& b) {
  if (!autocast_active() || a.dtype() == b.dtype() || !is_floating(a.dtype()) || !is_floating(b.dtype())) return;
  if (dtype_size(a.dtype()) < dtype_size(b.dtype())) a = cast(a, b.dtype());
  else b = cast(b, a.dtype());
}

}  // namespace detail
}  // namespace remat
