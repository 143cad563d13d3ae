// CPU dropout (Philox mask) and dropout_add, embedding lookup and its deterministic backward, fused
// cross-entropy.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "runtime/philox.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/vector_math.h"

namespace remat {

namespace {

// f(start, len, bits) for each chunk of whole Philox blocks of n elements, with the mask bits of the
// chunk's elements [start, start + len) drawn at once.
template <typename F>
void for_mask_chunks(int64_t n, uint64_t seed, uint64_t offset, F&& f) {
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for if (n > cpu::kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * kChunk, len = std::min<int64_t>(kChunk, n - start);
    uint32_t bits[kChunk];
    philox::fill_bits(seed, offset, static_cast<uint64_t>(start), static_cast<uint64_t>(len), bits);
    f(start, len, bits);
  }
}

// y = x * keep_scale where the element's mask bits say keep, else 0. Values passed in, not read
// through a lambda's captures: the compiler must assume that stores to y may change those, and
// would not vectorise the loop.
template <typename T>
void drop_chunk(const T* x, T* y, int64_t len, const uint32_t* bits, float threshold, T keep_scale) {
  for (int64_t j = 0; j < len; ++j) y[j] = philox::uniform_from_bits(bits[j]) >= threshold ? x[j] * keep_scale : T(0);
}

// y = residual + y.
template <typename T>
void add_chunk(const T* residual, T* y, int64_t len) {
  for (int64_t j = 0; j < len; ++j) y[j] = residual[j] + y[j];
}

}  // namespace

Tensor CpuBackend::dropout(const Tensor& x_in, double p, uint64_t seed, uint64_t offset, DType out) {
  const Tensor x = out == x_in.dtype() ? x_in : x_in.to(out);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "dropout", [&]<typename T>() {
    const T* px = x.data<T>();
    T* py = y.data<T>();
    T keep_scale = T(1) / (T(1) - static_cast<T>(p));
    float threshold = static_cast<float>(p);
    for_mask_chunks(x.numel(), seed, offset, [&](int64_t start, int64_t len, const uint32_t* bits) {
      drop_chunk(px + start, py + start, len, bits, threshold, keep_scale);
    });
  });
  return y;
}

// One dtype here (the CPU has no bf16 arithmetic). The dropped values are written out and added in
// a second loop: in one, the compiler may contract r + x * scale into an FMA, one rounding where
// dropout and then add round twice.
Tensor CpuBackend::dropout_add(const Tensor& x, const Tensor& residual, double p, uint64_t seed, uint64_t offset) {
  REMAT_CHECK(x.dtype() == residual.dtype() && x.shape() == residual.shape(),
              "dropout_add: expected x and residual of one dtype and shape on the cpu, got ", x.meta_str(), " and ",
              residual.meta_str());
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "dropout_add", [&]<typename T>() {
    const T *px = x.data<T>(), *pr = residual.data<T>();
    T* py = y.data<T>();
    T keep_scale = T(1) / (T(1) - static_cast<T>(p));
    float threshold = static_cast<float>(p);
    for_mask_chunks(x.numel(), seed, offset, [&](int64_t start, int64_t len, const uint32_t* bits) {
      drop_chunk(px + start, py + start, len, bits, threshold, keep_scale);
      add_chunk(pr + start, py + start, len);
    });
  });
  return y;
}

Tensor CpuBackend::embedding(const Tensor& idx, const Tensor& weight) {
  int64_t n = idx.numel(), vocab = weight.size(0), c = weight.size(1);
  Shape out_shape = idx.shape();
  out_shape.push_back(c);
  for (int64_t i = 0; i < n; ++i) {
    int64_t id = cpu::index_at(idx, i);
    REMAT_CHECK(id >= 0 && id < vocab, "embedding: expected indices in [0, ", vocab, "), got ", id, " at position ", i);
  }
  Tensor out = Tensor::empty(out_shape, weight.dtype());
  size_t row_bytes = static_cast<size_t>(c) * dtype_size(weight.dtype());
  const char* pw = static_cast<const char*>(weight.raw_data());
  char* po = static_cast<char*>(out.raw_data());
#pragma omp parallel for if (n * c > cpu::kParallelGrain)
  for (int64_t i = 0; i < n; ++i) memcpy(po + i * row_bytes, pw + cpu::index_at(idx, i) * row_bytes, row_bytes);
  return out;
}

// Each row of dW adds its tokens' gradients in token order (a fixed order: the CUDA kernel's too).
// The tokens are grouped by id (a stable sort keeps token order within an id), so each id's row is
// summed a contiguous row at a time and the ids run in parallel. Channel by channel over every
// token, each addition went to a random row of dW: 76 ms for gpt2's [8, 1024] tokens and
// [50304, 768] table, most of it cache misses.
Tensor CpuBackend::embedding_backward(const Tensor& dy, const Tensor& idx, int64_t vocab) {
  const int64_t n = idx.numel(), c = dy.size(-1);
  Tensor dw = Tensor::zeros({vocab, c}, dy.dtype());
  std::vector<int64_t> ids(static_cast<size_t>(n)), order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = cpu::index_at(idx, i);
    REMAT_CHECK(ids[i] >= 0 && ids[i] < vocab, "embedding backward: expected indices in [0, ", vocab, "), got ",
                ids[i], " at position ", i);
  }
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  std::vector<int64_t> starts;  // where each id's tokens begin in `order`, then n
  for (int64_t k = 0; k < n; ++k)
    if (k == 0 || ids[order[k]] != ids[order[k - 1]]) starts.push_back(k);
  starts.push_back(n);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  cpu::dispatch_float(dy.dtype(), "embedding_backward", [&]<typename T>() {
    const T* pdy = dy.data<T>();
    T* pdw = dw.data<T>();
#pragma omp parallel for schedule(dynamic, 16) if (n * c > cpu::kParallelGrain)
    for (int64_t g = 0; g < groups; ++g) {
      T* row = pdw + ids[order[starts[g]]] * c;
      for (int64_t k = starts[g]; k < starts[g + 1]; ++k) {
        const T* src = pdy + order[k] * c;
        for (int64_t j = 0; j < c; ++j) row[j] += src[j];
      }
    }
  });
  return dw;
}

std::vector<Tensor> CpuBackend::cross_entropy_rows(const Tensor& logits, const Tensor& targets,
                                                   const CrossEntropyRows& rows) {
  int64_t n = logits.size(0), v = logits.size(1), ignore_index = rows.ignore_index;
  Tensor lse = Tensor::empty({n}, logits.dtype());
  Tensor row_loss = Tensor::empty({n}, logits.dtype());
  for (int64_t i = 0; i < n; ++i) {
    int64_t t = cpu::index_at(targets, i);
    REMAT_CHECK(t == ignore_index || (t >= 0 && t < v), "cross_entropy: expected targets in [0, ", v,
                ") or ignore_index ", ignore_index, ", got ", t, " at row ", rows.first_row + i);
  }
  cpu::dispatch_float(logits.dtype(), "cross_entropy", [&]<typename T>() {
    const T* pl = logits.data<T>();
    T *plse = lse.data<T>(), *ploss = row_loss.data<T>();
#pragma omp parallel for if (n * v > cpu::kParallelGrain)
    for (int64_t i = 0; i < n; ++i) {
      const T* row = pl + i * v;
      const T mx = cpu::lane_max(row, v);
      plse[i] = mx + std::log(cpu::sum_exp_shifted(row, mx, v));
      int64_t t = cpu::index_at(targets, i);
      ploss[i] = t == ignore_index ? T(0) : plse[i] - row[t];
    }
  });
  return {row_loss, lse};
}

Tensor CpuBackend::cross_entropy_mean(const Tensor& row_loss, const Tensor& targets, int64_t, int64_t ignore_index) {
  int64_t n = row_loss.size(0);
  Tensor loss = Tensor::empty({}, row_loss.dtype());
  cpu::dispatch_float(row_loss.dtype(), "cross_entropy", [&]<typename T>() {
    const T* ploss = row_loss.data<T>();
    // In row order, the used rows only: the same sum whether the rows came in one call or in chunks.
    T total = 0;
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (cpu::index_at(targets, i) == ignore_index) continue;
      total += ploss[i];
      ++count;
    }
    // All rows ignored: the mean is 0/0; PyTorch returns NaN, so do we.
    loss.data<T>()[0] = count ? total / static_cast<T>(count) : std::numeric_limits<T>::quiet_NaN();
  });
  return loss;
}

Tensor CpuBackend::cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                                          const Tensor& lse, const CrossEntropyRows& rows) {
  int64_t n = logits.size(0), v = logits.size(1), ignore_index = rows.ignore_index;
  const Tensor& counted = rows.batch_targets.defined() ? rows.batch_targets : targets;
  Tensor dl = Tensor::empty(logits.shape(), logits.dtype());
  cpu::dispatch_float(logits.dtype(), "cross_entropy_backward", [&]<typename T>() {
    const T *pl = logits.data<T>(), *plse = lse.data<T>();
    T* pd = dl.data<T>();
    int64_t count = 0;
    for (int64_t i = 0; i < counted.numel(); ++i) count += cpu::index_at(counted, i) != ignore_index;
    T g = dloss.data<T>()[0] / static_cast<T>(count ? count : 1);
#pragma omp parallel for if (n * v > cpu::kParallelGrain)
    for (int64_t i = 0; i < n; ++i) {
      int64_t t = cpu::index_at(targets, i);
      T* row = pd + i * v;
      if (t == ignore_index) {
        for (int64_t j = 0; j < v; ++j) row[j] = 0;
        continue;
      }
      // d(logits) = (softmax - onehot(target)) * dloss / count
      cpu::exp_shifted(pl + i * v, plse[i], row, v);
      for (int64_t j = 0; j < v; ++j) row[j] *= g;
      row[t] -= g;
    }
  });
  return dl;
}

}  // namespace remat
