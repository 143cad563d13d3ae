// linear_cross_entropy: a language model's head and its loss as one op, the logits made a chunk of
// rows at a time and never whole (backward makes each chunk again, with its gradient in its place).
// Under bf16 autocast it takes the f32 weight itself, as linear does (LinearNode in matmul.cpp says
// why): its bf16 copy is autocast's kept one, and dW comes out in f32, rounded once.
#include <algorithm>

#include "autograd/ops/op_helpers.h"

namespace remat {

namespace {

// Rows [first, first + count) of a contiguous tensor (1-D or 2-D), as a view.
Tensor rows_of(const Tensor& t, int64_t first, int64_t count) {
  Shape shape = t.shape();
  shape[0] = count;
  int64_t row = t.dim() == 1 ? 1 : t.size(1);
  return t.view(shape, contiguous_strides(shape), t.offset() + first * row);
}

// The logits of a chunk take at most this many bytes: gpt2's 50304-word vocabulary in bf16 gives
// chunks of 640 rows (13 chunks at B 8, T 1024, in place of 786 MiB of logits).
constexpr int64_t kChunkBytes = int64_t{64} << 20;

class LinearCrossEntropyNode final : public Node {
 public:
  LinearCrossEntropyNode(int64_t ignore_index, int64_t chunk_rows, DType logits_dtype, DType compute,
                         bool weight_parameter)
      : ignore_index_(ignore_index),
        chunk_rows_(chunk_rows),
        logits_dtype_(logits_dtype),
        compute_(compute),
        weight_parameter_(weight_parameter) {}
  OpKind kind() const override { return OpKind::linear_cross_entropy; }

  std::vector<Tensor> forward(const std::vector<Tensor>& in) const override {
    const Tensor h = detail::dense(in[0]), targets = detail::dense(in[2]);
    Backend& backend = backend_for(kind(), h.device());
    const Tensor w = detail::in_dtype(backend, in[1], compute_, weight_parameter_);
    const int64_t n = h.size(0);
    const DType loss_dtype = accumulation_dtype(logits_dtype_);
    Tensor row_loss = Tensor::empty({n}, loss_dtype, h.device()), lse = Tensor::empty({n}, loss_dtype, h.device());
    for (int64_t first = 0; first < n; first += chunk_rows_) {
      const int64_t rows = std::min(chunk_rows_, n - first);
      std::vector<Tensor> out = backend.cross_entropy_rows(chunk_logits(backend, h, w, first, rows),
                                                           rows_of(targets, first, rows), chunk(first, targets));
      backend.copy_into_slice(row_loss, out[0], 0, first);
      backend.copy_into_slice(lse, out[1], 0, first);
    }
    return {backend.cross_entropy_mean(row_loss, targets, w.size(0), ignore_index_), lse};
  }

  bool output_differentiable(size_t i) const override { return i == 0; }  // lse is a statistic
  std::vector<int> saved_indices(size_t) const override { return {0, 1, 2, 4}; }  // h, W, targets, lse

  std::vector<Tensor> backward(const BackwardContext& ctx) const override {
    const Tensor g = detail::dense(ctx.grad_output(0));
    const Tensor h = detail::dense(ctx.saved(0)), targets = detail::dense(ctx.saved(2)), lse = ctx.saved(3);
    const Tensor& weight = ctx.saved(1);  // f32 under bf16 autocast, the master weight
    Backend& backend = backend_for(kind(), g.device());
    const Tensor w = detail::in_dtype(backend, weight, compute_, weight_parameter_);
    const int64_t n = h.size(0);
    const bool want_dh = ctx.needs_input_grad(0), want_dw = ctx.needs_input_grad(1);
    Tensor dh = want_dh ? Tensor::empty(h.shape(), h.dtype(), h.device()) : Tensor();
    // dW sums over every row: the chunks' GEMMs add into one tensor in the accumulation dtype
    // (f32 for bf16 products), rounded once at the end as one GEMM over all rows would be (to a
    // bf16 weight's dtype; an f32 master weight takes the sums as they are).
    Tensor dw;
    if (want_dw) {
      const DType dw_dtype = accumulation_dtype(w.dtype());
      dw = n == 0 ? Tensor::zeros(w.shape(), dw_dtype, w.device()) : Tensor::empty(w.shape(), dw_dtype, w.device());
    }
    for (int64_t first = 0; first < n && (want_dh || want_dw); first += chunk_rows_) {
      const int64_t rows = std::min(chunk_rows_, n - first);
      const Tensor chunk_targets = rows_of(targets, first, rows), chunk_lse = rows_of(lse, first, rows);
      Tensor logits = chunk_logits(backend, h, w, first, rows);
      // The chunk's logits are this op's own: their gradient is written over them where it can be.
      Tensor dz;
      if (detail::sole_owner(logits) &&
          backend.cross_entropy_backward_in_place(g, logits, chunk_targets, chunk_lse, chunk(first, targets))) {
        dz = std::move(logits);
      } else {
        dz = backend.cross_entropy_backward(g, logits, chunk_targets, chunk_lse, chunk(first, targets));
        logits = Tensor();
      }
      // Back in the GEMM's dtype, as the cast's backward rounds it in the unfused path.
      if (dz.dtype() != h.dtype()) dz = backend.cast(dz, h.dtype());
      if (want_dh) {
        Tensor dh_rows = rows_of(dh, first, rows);
        backend.matmul_into(dh_rows, dz, w, false, false, false);  // dh = dz W, written in place
      }
      if (want_dw) backend.matmul_into(dw, dz, rows_of(h, first, rows), true, false, first > 0);  // += dz^T h
    }
    if (want_dw && dw.dtype() != weight.dtype()) dw = backend.cast(dw, weight.dtype());
    return {dh, dw, Tensor()};
  }

 private:
  Backend::CrossEntropyRows chunk(int64_t first, const Tensor& targets) const {
    return {.ignore_index = ignore_index_, .first_row = first, .batch_targets = targets};
  }

  // h[rows] W^T, in the dtype the loss reads them in.
  Tensor chunk_logits(Backend& backend, const Tensor& h, const Tensor& w, int64_t first, int64_t rows) const {
    Tensor logits = backend.matmul(rows_of(h, first, rows), w, false, true);
    return logits.dtype() == logits_dtype_ ? logits : backend.cast(logits, logits_dtype_);
  }

  int64_t ignore_index_, chunk_rows_;
  DType logits_dtype_;
  DType compute_;          // h's dtype: the weight's, or autocast's with an f32 master weight
  bool weight_parameter_;  // that f32 weight is a parameter: its copy comes from autocast's cache
};

}  // namespace

int64_t linear_cross_entropy_chunk_rows(int64_t rows, int64_t vocab, DType logits_dtype) {
  const int64_t row_bytes = std::max<int64_t>(1, vocab) * static_cast<int64_t>(dtype_size(logits_dtype));
  int64_t chunk = std::clamp<int64_t>(kChunkBytes / row_bytes, 1, std::max<int64_t>(rows, 1));
  if (chunk < rows && chunk > 64) chunk -= chunk % 64;  // whole tiles of the GEMMs
  return chunk;
}

Tensor linear_cross_entropy(const Tensor& h_in, const Tensor& weight_in, const Tensor& targets, int64_t ignore_index,
                            int64_t chunk_rows) {
  Tensor h = detail::autocast_compute(h_in);
  // Under bf16 autocast an f32 weight goes to the node as it is (linear's master weight).
  const bool master = detail::takes_f32_weight(h, weight_in);
  Tensor weight = master ? weight_in : detail::autocast_compute(weight_in);
  detail::check_float(h, "linear_cross_entropy", "h");
  detail::check_float(weight, "linear_cross_entropy", "weight");
  if (!master) detail::check_same(h, weight, "linear_cross_entropy");
  REMAT_CHECK(weight.device() == h.device(), "linear_cross_entropy: expected h and weight on the same device, got ",
              h.meta_str(), " and ", weight.meta_str());
  detail::check_index(targets, "linear_cross_entropy", "targets");
  REMAT_CHECK(h.dim() == 2 && weight.dim() == 2 && targets.dim() == 1 && h.size(1) == weight.size(1) &&
                  targets.size(0) == h.size(0),
              "linear_cross_entropy: expected h [N, C], weight [V, C] and targets [N], got ", shape_str(h.shape()),
              ", ", shape_str(weight.shape()), " and ", shape_str(targets.shape()));
  REMAT_CHECK(targets.device() == h.device(), "linear_cross_entropy: expected targets on ", h.device().str(), ", got ",
              targets.device().str());
  REMAT_CHECK(chunk_rows >= 0, "linear_cross_entropy: expected chunk_rows >= 0 (0: chosen by size), got ", chunk_rows);
  // The loss reads the logits as cross_entropy would read the head's output: bf16 on a GPU as they
  // are, else in f32 when autocast computed them in its dtype.
  const bool reads_compute_dtype = h.dtype() == DType::bf16 && h.device().is_cuda();
  const DType logits_dtype =
      autocast_active() && h.dtype() == autocast_dtype() && !reads_compute_dtype ? DType::f32 : h.dtype();
  if (chunk_rows == 0) chunk_rows = linear_cross_entropy_chunk_rows(h.size(0), weight.size(0), logits_dtype);
  return detail::apply<LinearCrossEntropyNode>({h, weight, targets}, ignore_index, chunk_rows, logits_dtype, h.dtype(),
                                               master && detail::caches_compute_copy(weight))[0];
}

}  // namespace remat
