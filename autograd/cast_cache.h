// Autocast's cache of parameters' compute-dtype copies: what linear and matmul use in place of a
// cast, and what optimizers rewrite as they update (the user's controls are in autocast.h).
#pragma once

#include "../kernels/backend.h"
#include "../runtime/tensor.h"

namespace remat::detail {

// Whether an op recording `t` may take its compute-dtype copy from the cache: a parameter (a leaf
// that requires grad, as PyTorch's autocast cache asks), f32 and contiguous.
bool caches_compute_copy(const Tensor& t);

// `t` in `dtype`: the copy kept with t's storage while t is unchanged, else a new cast by
// `backend`, kept for the next use (with the cache off, a plain cast).
Tensor compute_copy(Backend& backend, const Tensor& t, DType dtype);

// For an optimizer about to update `param` in place: its kept copy, laid out as param, where the
// update can write the rounded new values as it writes param's (the copy is current, only the
// cache holds it, param covers its storage); else undefined, and the copy, about to go stale, is
// dropped. compute_copy_updated then marks it current at param's new version.
Tensor compute_copy_for_update(const Tensor& param);
void compute_copy_updated(const Tensor& param);

}  // namespace remat::detail
