// Mixed precision: inside an AutocastScope, GEMM-like ops (linear, matmul, attention, conv2d) cast
// their f32 inputs to the compute dtype (bf16 on GPUs), normalisations, softmax and the loss run
// in f32, and a binary op on two floating dtypes computes in the wider one (add and sub of f32 and
// bf16 of one shape without a cast node where the backend widens in its kernel). Parameters, their
// gradients and the optimizer stay f32 (master weights); the casts are ops on the tape, so
// checkpoint replays repeat them exactly. linear in bf16 (and matmul by a 2-D f32 weight) takes
// f32 weights as they are and casts them inside its node (autograd/ops/matmul.cpp says why). A
// norm that only feeds GEMMs may return the compute dtype itself (AutocastOutput in ops.h), and
// dropout_add adds a bf16 branch to an f32 residual as add does: the casts' bits without them.
#pragma once

#include <string>

#include "../runtime/tensor.h"

namespace remat {

// The compute dtype of ops recorded on this thread; f32 when no scope is active.
DType autocast_dtype();
bool autocast_active();

class AutocastScope {
 public:
  // `dtype` must be floating; f32 switches autocast off inside the scope.
  explicit AutocastScope(DType dtype);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  DType previous_;
};

// The cache of parameters' compute-dtype copies. linear and matmul under bf16 autocast cast an f32
// parameter (a leaf that requires grad) once and keep the copy with it while it is unchanged: the
// next forward, checkpoint replays and backward take the copy instead of casting again, and AdamW
// rewrites it as it updates the parameter, so a training step casts no weight at all (gpt2 in bf16:
// 146 cast launches a step otherwise). Same bits as the casts. A copy is current while its
// parameter's version is the one it was made at: every write through remat (ops, copy_, fill_,
// optimizers, load_state_dict, collectives) moves the version on; a program that writes a
// parameter's memory itself (data<T>(), raw_data()) must call storage()->bump_version() after, as
// autograd's checks of saved tensors already ask. The copies are counted as parameters (half the
// f32 bytes of the weights cast, bf16), freed with their parameters or by clear_autocast_cache().
// On by default; REMAT_AUTOCAST_CACHE=0 (or set_autocast_cache_enabled(false), which also frees
// the copies) casts at every use, as before.
void set_autocast_cache_enabled(bool enabled);
bool autocast_cache_enabled();
void clear_autocast_cache();
struct AutocastCacheStats {
  int64_t copies = 0;     // copies kept now
  int64_t bytes = 0;      // their bytes
  int64_t hits = 0;       // uses served by a kept copy (since the process started)
  int64_t casts = 0;      // copies made
  int64_t refreshes = 0;  // copies rewritten by an optimizer's update
};
AutocastCacheStats autocast_cache_stats();

// "f32" or "bf16" (the CLI's --dtype); bf16 needs a cuda device, the CPU kernels compute in f32/f64.
DType parse_compute_dtype(const std::string& text, Device device);

namespace detail {
// For GEMM-like ops: f32 tensors in the compute dtype (others, and undefined ones, unchanged).
Tensor autocast_compute(const Tensor& t);
// For precision-sensitive ops: tensors of the compute dtype back in f32.
Tensor autocast_full(const Tensor& t);
// For binary ops: both in the wider floating dtype when they differ and autocast is active.
void autocast_match(Tensor& a, Tensor& b);
}  // namespace detail

}  // namespace remat
