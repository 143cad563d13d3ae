// Attention's gradients of a fused projection's heads in one buffer (kernels/attention_layout.h).
#include "kernels/attention_layout.h"

namespace remat {

namespace {

// The strides of [B, H, T, D] heads in a [B, T, 3 H D] projection.
Strides packed_strides(const Tensor& q) {
  const int64_t t = q.size(2), d = q.size(3), c = q.size(1) * d;
  return {t * 3 * c, d, 3 * c, 1};
}

}  // namespace

bool packed_attention_heads(const Tensor& q, const Tensor& k, const Tensor& v) {
  if (q.dim() != 4 || k.shape() != q.shape() || v.shape() != q.shape()) return false;
  const int64_t c = q.size(1) * q.size(3);
  const Strides packed = packed_strides(q);
  return q.storage() == k.storage() && q.storage() == v.storage() && q.strides() == packed &&
         k.strides() == packed && v.strides() == packed && k.offset() == q.offset() + c &&
         v.offset() == q.offset() + 2 * c;
}

std::vector<Tensor> packed_attention_grads(const Tensor& q, bool zeroed) {
  const int64_t c = q.size(1) * q.size(3);
  const Shape shape{q.size(0), q.size(2), 3 * c};
  const Tensor grads =
      zeroed ? Tensor::zeros(shape, q.dtype(), q.device()) : Tensor::empty(shape, q.dtype(), q.device());
  const Strides strides = packed_strides(q);
  return {grads.view(q.shape(), strides, 0), grads.view(q.shape(), strides, c), grads.view(q.shape(), strides, 2 * c)};
}

}  // namespace remat
