// CPU reductions (sum, max) over any set of axes, each output reduced in a fixed order.
#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/lane_sums.h"

namespace remat {

namespace {

struct ReducePlan {
  Shape out_shape;                    // reduced dims kept as 1
  std::vector<int64_t> out_offsets;   // input offset of each output element's first input
  std::vector<int64_t> red_offsets;   // offsets of the reduced elements relative to it
};

ReducePlan plan_reduce(const Shape& shape, const std::vector<int64_t>& axes) {
  ReducePlan p;
  int64_t rank = static_cast<int64_t>(shape.size());
  Strides strides = contiguous_strides(shape);
  std::vector<bool> reduced(rank, false);
  for (int64_t a : axes) reduced[a] = true;
  p.out_shape = shape;
  for (int64_t a : axes) p.out_shape[a] = 1;
  // Enumerate offsets over the kept dims and over the reduced dims, in row-major order.
  auto enumerate = [&](bool want_reduced) {
    std::vector<int64_t> offsets{0};
    for (int64_t d = 0; d < rank; ++d) {
      if (reduced[d] != want_reduced) continue;
      std::vector<int64_t> next;
      next.reserve(offsets.size() * shape[d]);
      for (int64_t base : offsets)
        for (int64_t i = 0; i < shape[d]; ++i) next.push_back(base + i * strides[d]);
      offsets = std::move(next);
    }
    return offsets;
  };
  p.out_offsets = enumerate(false);
  p.red_offsets = enumerate(true);
  return p;
}

// The input seen as [outer, red, inner] when the reduced axes are one run of adjacent dims.
struct BlockShape {
  int64_t outer = 1, red = 1, inner = 1;
};

std::optional<BlockShape> as_block(const Shape& shape, std::vector<int64_t> axes) {
  if (axes.empty()) return std::nullopt;
  std::sort(axes.begin(), axes.end());
  for (size_t i = 1; i < axes.size(); ++i)
    if (axes[i] != axes[i - 1] + 1) return std::nullopt;
  BlockShape b;
  for (int64_t d = 0; d < static_cast<int64_t>(shape.size()); ++d) {
    if (d < axes.front()) b.outer *= shape[d];
    else if (d <= axes.back()) b.red *= shape[d];
    else b.inner *= shape[d];
  }
  return b;
}

Shape reduced_shape(Shape shape, const std::vector<int64_t>& axes) {
  for (int64_t a : axes) shape[a] = 1;
  return shape;
}

// Folds over the middle of [outer, red, inner] a row at a time, so the inner loop runs over
// contiguous memory and vectorises (bias and broadcast gradients: [B*L, C] -> [C], [B, L, C] ->
// [B, 1, C]). Each output still folds its inputs from r = 0 up, starting at `identity`, as the
// general path does, so the two agree to the bit.
template <typename T, typename Combine>
void fold_block(const T* px, T* po, const BlockShape& b, T identity, Combine combine) {
  constexpr int64_t kTile = 64;  // outputs per task: 256 bytes of f32 per input row
  int64_t tiles = (b.inner + kTile - 1) / kTile;
#pragma omp parallel for if (b.outer * b.red * b.inner > cpu::kParallelGrain)
  for (int64_t job = 0; job < b.outer * tiles; ++job) {
    int64_t o = job / tiles, begin = (job % tiles) * kTile, end = std::min(b.inner, begin + kTile);
    T* dst = po + o * b.inner;
    for (int64_t i = begin; i < end; ++i) dst[i] = identity;
    const T* src = px + o * b.red * b.inner;
    for (int64_t r = 0; r < b.red; ++r) {
      const T* row = src + r * b.inner;
      for (int64_t i = begin; i < end; ++i) dst[i] = combine(dst[i], row[i]);
    }
  }
}

// Elements of a run that sum(x) adds in lanes before adding the pieces' sums one after another.
constexpr int64_t kSumPiece = 8192;

// Sums each run of `red` contiguous elements (the reduced axes are the last ones: x seen as
// [outer, red]) in pieces of kSumPiece elements from the run's start, each piece in 16 interleaved
// lanes (kernels/cpu/lane_sums.h), the pieces' sums then added in order. A fixed order, the same
// for every thread count, that vectorises, runs in parallel however few outputs there are (a
// loss's mean has one), and adds fewer rounding errors than one running sum, which added a
// [16, 257, 1024] tensor one element after another in 24 ms on one core.
template <typename T>
void sum_runs(const T* px, T* po, int64_t outer, int64_t red) {
  const int64_t pieces = (red + kSumPiece - 1) / kSumPiece;
  if (pieces <= 1) {
#pragma omp parallel for if (outer * red > cpu::kParallelGrain)
    for (int64_t o = 0; o < outer; ++o) po[o] = cpu::lane_sum(px + o * red, red);
    return;
  }
  std::vector<T> piece_sums(static_cast<size_t>(outer * pieces));
#pragma omp parallel for
  for (int64_t job = 0; job < outer * pieces; ++job) {
    const int64_t o = job / pieces, begin = job % pieces * kSumPiece;
    piece_sums[job] = cpu::lane_sum(px + o * red + begin, std::min(kSumPiece, red - begin));
  }
  for (int64_t o = 0; o < outer; ++o) {
    T acc = piece_sums[o * pieces];
    for (int64_t p = 1; p < pieces; ++p) acc += piece_sums[o * pieces + p];
    po[o] = acc;
  }
}

// Any reduction: each output folds its inputs into `identity` with `combine`, in row-major order.
template <typename Combine>
Tensor fold(const Tensor& x, const std::vector<int64_t>& axes, const char* op, double identity, Combine combine) {
  ReducePlan plan = plan_reduce(x.shape(), axes);
  Tensor out = Tensor::empty(plan.out_shape, x.dtype());
  cpu::dispatch_float(x.dtype(), op, [&]<typename T>() {
    const T* px = x.data<T>();
    T* po = out.data<T>();
    int64_t n_out = static_cast<int64_t>(plan.out_offsets.size());
    int64_t n_red = static_cast<int64_t>(plan.red_offsets.size());
#pragma omp parallel for if (n_out * n_red > cpu::kParallelGrain)
    for (int64_t o = 0; o < n_out; ++o) {
      const T* base = px + plan.out_offsets[o];
      T acc = static_cast<T>(identity);
      for (int64_t r = 0; r < n_red; ++r) acc = combine(acc, base[plan.red_offsets[r]]);
      po[o] = acc;
    }
  });
  return out;
}

}  // namespace

// Adjacent axes (every reduction remat's models and losses make) take the block paths; others the
// general fold, which lists every input offset.
Tensor CpuBackend::reduce_sum(const Tensor& x, const std::vector<int64_t>& axes) {
  auto block = as_block(x.shape(), axes);
  if (!block) return fold(x, axes, "sum", 0.0, [](auto acc, auto v) { return acc + v; });
  Tensor out = Tensor::empty(reduced_shape(x.shape(), axes), x.dtype());
  cpu::dispatch_float(x.dtype(), "sum", [&]<typename T>() {
    if (block->inner == 1) sum_runs(x.data<T>(), out.data<T>(), block->outer, block->red);
    else fold_block(x.data<T>(), out.data<T>(), *block, T(0), [](T acc, T v) { return acc + v; });
  });
  return out;
}

Tensor CpuBackend::reduce_max(const Tensor& x, const std::vector<int64_t>& axes) {
  for (int64_t a : axes) REMAT_CHECK(x.shape()[a] > 0, "max: cannot reduce an empty axis of ", x.meta_str());
  auto best = [](auto acc, auto v) { return v > acc ? v : acc; };
  auto block = as_block(x.shape(), axes);
  if (!block) return fold(x, axes, "max", -std::numeric_limits<double>::infinity(), best);
  Tensor out = Tensor::empty(reduced_shape(x.shape(), axes), x.dtype());
  cpu::dispatch_float(x.dtype(), "max", [&]<typename T>() {
    fold_block(x.data<T>(), out.data<T>(), *block, -std::numeric_limits<T>::infinity(), best);
  });
  return out;
}

Tensor CpuBackend::reduce_max_backward(const Tensor& dy, const Tensor& x, const Tensor& y) {
  std::vector<int64_t> axes;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (y.shape()[d] == 1 && x.shape()[d] != 1) axes.push_back(d);
  ReducePlan plan = plan_reduce(x.shape(), axes);
  Tensor dx = Tensor::zeros(x.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "max_backward", [&]<typename T>() {
    const T* px = x.data<T>();
    const T* py = y.data<T>();
    const T* pdy = dy.data<T>();
    T* pdx = dx.data<T>();
    int64_t n_out = static_cast<int64_t>(plan.out_offsets.size());
    int64_t n_red = static_cast<int64_t>(plan.red_offsets.size());
#pragma omp parallel for if (n_out * n_red > cpu::kParallelGrain)
    for (int64_t o = 0; o < n_out; ++o) {
      int64_t base = plan.out_offsets[o];
      int64_t ties = 0;
      for (int64_t r = 0; r < n_red; ++r) ties += px[base + plan.red_offsets[r]] == py[o];
      T share = pdy[o] / static_cast<T>(ties);
      for (int64_t r = 0; r < n_red; ++r)
        if (px[base + plan.red_offsets[r]] == py[o]) pdx[base + plan.red_offsets[r]] = share;
    }
  });
  return dx;
}

Tensor CpuBackend::copy_strided(const Tensor& x) { return x.is_contiguous() ? x.clone() : x.as_contiguous(); }

void CpuBackend::copy_into_slice(Tensor& dst, const Tensor& src, int64_t axis, int64_t start) {
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= dst.shape()[d];
  for (int64_t d = axis + 1; d < dst.dim(); ++d) inner *= dst.shape()[d];
  size_t elem = dtype_size(dst.dtype());
  int64_t src_block = src.shape()[axis] * inner, dst_block = dst.shape()[axis] * inner;
  char* pd = static_cast<char*>(dst.raw_data()) + start * inner * static_cast<int64_t>(elem);
  const char* ps = static_cast<const char*>(src.raw_data());
  // Copies over 1 MiB (concat's and split's on dit: its joint sequences, a single block's fused
  // projection) in parallel, a row at a time and a row of 128 KiB or more in pieces of at least
  // 64 KiB: one core's memcpy moves about half of what two do (dit small: concat forward 21.4 ->
  // 11.7 ms a step, split backward 29.1 -> 15.5).
  const int64_t row_bytes = src_block * static_cast<int64_t>(elem), dst_row = dst_block * static_cast<int64_t>(elem);
  const int64_t pieces_per_row = std::max<int64_t>(1, row_bytes >> 16), pieces = outer * pieces_per_row;
#pragma omp parallel for if (outer * row_bytes > (int64_t{1} << 20))
  for (int64_t i = 0; i < pieces; ++i) {
    const int64_t o = i / pieces_per_row, part = i % pieces_per_row;
    const int64_t from = row_bytes * part / pieces_per_row, to = row_bytes * (part + 1) / pieces_per_row;
    memcpy(pd + o * dst_row + from, ps + o * row_bytes + from, static_cast<size_t>(to - from));
  }
}

}  // namespace remat
