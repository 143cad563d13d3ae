// The [B, H, T, D] layouts the tensor-core attention paths share (attention_heads.h).
#include "kernels/cuda/attention_heads.h"

#include <cstdint>

namespace remat::cuda {

Tensor readable_heads(const Tensor& x) {
  const auto& st = x.strides();
  const bool fits = (x.size(3) == 1 || st[3] == 1) && st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(x.raw_data()) % 16 == 0;
  return fits ? x : x.as_contiguous();
}

Tensor empty_heads(const Tensor& like) {
  const int64_t b = like.size(0), h = like.size(1), t = like.size(2), d = like.size(3);
  return Tensor::empty({b, t, h, d}, like.dtype(), like.device()).view({b, h, t, d}, {t * h * d, d, h * d, 1}, 0);
}

Tensor in_bthd_layout(const Tensor& x) {
  const Shape& shape = x.shape();
  const int64_t h = shape[1], t = shape[2], d = shape[3];
  const Strides bthd = {t * h * d, d, h * d, 1};
  const Strides& st = x.strides();
  if (st == bthd && reinterpret_cast<uintptr_t>(x.raw_data()) % 16 == 0) return x;
  // x's [B, T, H, D] view, copied contiguous, seen again as [B, H, T, D].
  const Tensor copy = x.view({shape[0], t, h, d}, {st[0], st[2], st[1], st[3]}, x.offset()).as_contiguous();
  return copy.view(shape, bthd, copy.offset());
}

}  // namespace remat::cuda
