// Differentiable ops on tensors. Shapes: B batch, T time, C channels, H heads, D head dim, V vocab.
// Every op validates its inputs and throws remat::Error naming what it expected and what it got.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../runtime/tensor.h"

namespace remat {

// Elementwise, broadcasting like NumPy.
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add_scalar(const Tensor& x, double s);
Tensor mul_scalar(const Tensor& x, double s);
Tensor pow_scalar(const Tensor& x, double exponent);
Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor relu(const Tensor& x);
Tensor gelu(const Tensor& x);  // tanh approximation (GPT-2)
Tensor silu(const Tensor& x);
Tensor sigmoid(const Tensor& x);

// Reductions over `axes` (all axes when empty).
Tensor sum(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdim = false);
Tensor mean(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdim = false);
Tensor max(const Tensor& x, std::vector<int64_t> axes = {}, bool keepdim = false);

// Shape ops. reshape, permute, slice and expand return views where the layout allows.
Tensor reshape(const Tensor& x, Shape shape);  // one dim may be -1
Tensor permute(const Tensor& x, std::vector<int64_t> dims);
Tensor transpose(const Tensor& x, int64_t dim0, int64_t dim1);
Tensor slice(const Tensor& x, int64_t axis, int64_t start, int64_t end);
Tensor concat(const std::vector<Tensor>& xs, int64_t axis);
std::vector<Tensor> split(const Tensor& x, int64_t axis, std::vector<int64_t> sizes);
Tensor expand(const Tensor& x, Shape shape);
Tensor contiguous(const Tensor& x);

// a[..., M, K] @ b[..., K, N] (op(a) = a^T when trans_a, likewise b). Batch dims equal, or b 2-D.
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);
// x[..., I] W[O, I]^T + bias[O]; bias may be undefined.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());
// What a norm of f32 x returns under autocast. It runs in f32 either way; `f32` returns f32, as
// PyTorch's autocast does. `compute` returns the compute dtype (bf16 on GPUs), for a norm whose
// output feeds GEMMs (linear, matmul, attention) that would cast it anyway: the bits of that cast,
// without its pass over memory in forward and its gradient's in backward. With several such
// consumers their gradients then add up in the compute dtype (a cast each adds them in f32).
// Outside autocast both return x's dtype.
enum class AutocastOutput { f32, compute };

// Normalises the last axis: x[..., C], weight[C], bias[C].
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5,
                  AutocastOutput output = AutocastOutput::f32);
Tensor softmax(const Tensor& x);  // over the last axis
// q, k, v [B, H, T, D] -> [B, H, T, D]; scale defaults to 1/sqrt(D).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale = 0.0);
// Zeroes each element with probability p and scales the rest by 1/(1-p); identity when !training.
// The mask comes from the global Philox stream and is stored as (seed, offset) on the node.
Tensor dropout(const Tensor& x, double p, bool training = true);
// residual + dropout(x, p, training): a residual connection after a dropout (GPT-2's blocks), with
// the same mask and bits as the two ops, in one kernel each way (two forward and, under autocast
// with bf16 x and f32 residual, three backward: the add's gradient cast, then dropout's). x and
// residual of one shape; others (broadcasting) run as the two ops.
Tensor dropout_add(const Tensor& x, const Tensor& residual, double p, bool training = true);
// idx[...] (i32/i64) into weight[V, C] -> [..., C].
Tensor embedding(const Tensor& idx, const Tensor& weight);
// logits[N, V], targets[N] (i32/i64) -> mean negative log-likelihood over rows != ignore_index.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100);
// cross_entropy(matmul(h, weight, false, true), targets) for h [N, C], weight [V, C] (a language
// model's head and its loss) without ever holding the [N, V] logits: they are made chunk_rows rows
// at a time (0: chunks of at most 64 MiB of logits), and again in backward, where each chunk's
// gradient takes its place. One more head GEMM per step for N x V logits' bytes. In one chunk,
// the unfused path's bits (the same GEMMs, the row losses summed in cross_entropy's order); in
// several, within rounding of it (a GEMM over fewer rows may round them differently; dW is summed
// chunk by chunk).
Tensor linear_cross_entropy(const Tensor& h, const Tensor& weight, const Tensor& targets, int64_t ignore_index = -100,
                            int64_t chunk_rows = 0);
// The chunk linear_cross_entropy takes for `rows` rows of `vocab` logits of `logits_dtype`.
int64_t linear_cross_entropy_chunk_rows(int64_t rows, int64_t vocab, DType logits_dtype);

// Images are [N, C, H, W]. conv2d: weight [Cout, Cin, kh, kw], bias [Cout] or undefined.
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(), int stride = 1, int padding = 0);
// Normalises each of `groups` groups of C/groups channels over them and all positions: x [N, C, ...].
Tensor group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int groups, double eps = 1e-5);
Tensor upsample_nearest(const Tensor& x, int factor = 2);  // [N, C, H, W] -> [N, C, fH, fW]
Tensor avg_pool(const Tensor& x, int factor = 2);          // [N, C, H, W] -> [N, C, H/f, W/f]
// adaLN modulation: x [B, T, C], shift and scale [B, C] -> x * (1 + scale) + shift.
Tensor modulate(const Tensor& x, const Tensor& shift, const Tensor& scale);
// Sinusoidal embedding of (diffusion) times t [B] -> [B, dim] (dim even): cos then sin of t * f_i.
Tensor timestep_embedding(const Tensor& t, int dim, double max_period = 10000.0);
// The same values in another floating dtype; the gradient is cast back. No-op for the same dtype.
Tensor cast(const Tensor& x, DType dtype);

// Names a tensor for policies that save or recompute by name (like JAX checkpoint_name).
// Returns the tensor with its tag set; updates the recorded value when it is already on a tape.
Tensor checkpoint_name(Tensor t, const std::string& name);

// A user-defined op (like torch.autograd.Function). forward must be a pure function of its inputs;
// `saved` lists the inputs (0..n-1) and outputs (n..) that backward reads through ctx.saved(i).
struct CustomOp {
  std::string name;
  std::function<std::vector<Tensor>(const std::vector<Tensor>&)> forward;
  // (grad_outputs, saved tensors) -> one gradient per input (undefined where none).
  std::function<std::vector<Tensor>(const std::vector<Tensor>&, const std::vector<Tensor>&)> backward;
  std::vector<int> saved;
};
std::vector<Tensor> custom(const CustomOp& op, const std::vector<Tensor>& inputs);

// Operators.
inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator-(const Tensor& x) { return neg(x); }
inline Tensor operator+(const Tensor& x, double s) { return add_scalar(x, s); }
inline Tensor operator-(const Tensor& x, double s) { return add_scalar(x, -s); }
inline Tensor operator*(const Tensor& x, double s) { return mul_scalar(x, s); }
inline Tensor operator/(const Tensor& x, double s) { return mul_scalar(x, 1.0 / s); }
inline Tensor operator*(double s, const Tensor& x) { return mul_scalar(x, s); }

}  // namespace remat
