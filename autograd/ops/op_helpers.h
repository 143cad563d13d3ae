// Helpers shared by the op definitions: contiguity, input checks, reduction to a broadcast shape.
#pragma once

#include "../autocast.h"
#include "../cast_cache.h"
#include "../graph.h"
#include "../ops.h"
#include "../../kernels/backend.h"

namespace remat::detail {

// The kernels read contiguous memory; views are copied here, explicitly.
inline Tensor dense(const Tensor& t) {
  if (!t.defined() || t.is_contiguous()) return t;
  return backend_for(t.device()).copy_strided(t);
}

// Whether `t` alone holds the whole of its storage (contiguous, from its start, no other tensor or
// view on it): a backward may then write its result over it instead of allocating another.
inline bool sole_owner(const Tensor& t) {
  return t.defined() && t.storage() && t.storage().use_count() == 1 && t.is_contiguous() && t.offset() == 0 &&
         t.nbytes() == t.storage()->bytes();
}

inline void check_defined(const Tensor& t, const char* op, const char* what) {
  REMAT_CHECK(t.defined(), op, ": ", what, " is undefined");
}

inline void check_float(const Tensor& t, const char* op, const char* what) {
  check_defined(t, op, what);
  REMAT_CHECK(is_floating(t.dtype()), op, ": expected ", what, " to be floating point, got ", t.meta_str());
}

inline void check_same(const Tensor& a, const Tensor& b, const char* op) {
  REMAT_CHECK(a.dtype() == b.dtype(), op, ": expected tensors of the same dtype, got ", a.meta_str(), " and ",
              b.meta_str());
  REMAT_CHECK(a.device() == b.device(), op, ": expected tensors on the same device, got ", a.meta_str(), " and ",
              b.meta_str());
}

inline void check_index(const Tensor& t, const char* op, const char* what) {
  check_defined(t, op, what);
  REMAT_CHECK(t.dtype() == DType::i32 || t.dtype() == DType::i64, op, ": expected ", what,
              " of dtype i32 or i64, got ", t.meta_str());
}

// Whether a GEMM-like op (linear, matmul, linear_cross_entropy) under bf16 autocast takes its f32
// weight into its node, as the master weight, and computes in bf16 (LinearNode in matmul.cpp says
// why): x in bf16 (after autocast's cast) and the weight f32 (bf16 only: the f32 gradient of bf16
// products is matmul_into's, and f16 and f64 have none).
inline bool takes_f32_weight(const Tensor& x, const Tensor& weight) {
  return autocast_dtype() == DType::bf16 && x.defined() && x.dtype() == DType::bf16 && weight.defined() &&
         weight.dtype() == DType::f32;
}

// t in `dtype`: itself, or a cast by the backend (inside a node, not a node of its own); for a
// parameter (caches_compute_copy when the op was recorded), autocast's kept copy.
inline Tensor in_dtype(Backend& backend, const Tensor& t, DType dtype, bool parameter = false) {
  if (t.dtype() == dtype) return dense(t);
  return parameter ? compute_copy(backend, t, dtype) : backend.cast(dense(t), dtype);
}

// Sums a broadcast gradient back down to `shape`.
Tensor sum_to(const Tensor& g, const Shape& shape);

// Records a node of type N built from `args`, returning its outputs.
template <typename N, typename... Args>
std::vector<Tensor> apply(const std::vector<Tensor>& inputs, Args&&... args) {
  return record(std::make_unique<N>(std::forward<Args>(args)...), inputs);
}

}  // namespace remat::detail
