// Helpers shared by the op definitions: contiguity, input checks, reduction to a broadcast shape.
#pragma once

#include "../autocast.h"
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

// Sums a broadcast gradient back down to `shape`.
Tensor sum_to(const Tensor& g, const Shape& shape);

// Records a node of type N built from `args`, returning its outputs.
template <typename N, typename... Args>
std::vector<Tensor> apply(const std::vector<Tensor>& inputs, Args&&... args) {
  return record(std::make_unique<N>(std::forward<Args>(args)...), inputs);
}

}  // namespace remat::detail
