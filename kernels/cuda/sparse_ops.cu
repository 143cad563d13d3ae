// CUDA embedding lookup and its deterministic backward: token positions are grouped by id on the
// host (a counting sort, stable), and each weight row then sums its tokens in position order, the
// order the CPU uses, with no atomics.
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace remat {

namespace {

using namespace cuda;

__device__ __forceinline__ int64_t index_at(const void* idx, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(idx)[i] : static_cast<const int32_t*>(idx)[i];
}

template <typename T>
__global__ void embedding_kernel(const void* idx, bool is64, const T* w, T* out, int64_t n, int64_t c) {
  REMAT_GRID_STRIDE(e, n * c) out[e] = w[index_at(idx, is64, e / c) * c + e % c];
}

template <typename T>
__global__ void embedding_backward_kernel(const T* dy, const int64_t* order, const int64_t* offsets, T* dw,
                                          int64_t vocab, int64_t c) {
  REMAT_GRID_STRIDE(e, vocab * c) {
    int64_t row = e / c, j = e % c;
    Acc<T> acc = 0;
    for (int64_t p = offsets[row]; p < offsets[row + 1]; ++p) acc += load(dy, order[p] * c + j);
    dw[e] = cast_to<T>(acc);
  }
}

std::vector<int64_t> checked_indices(const Tensor& idx, int64_t vocab) {
  std::vector<int64_t> host = idx.to_vector<int64_t>();
  for (size_t i = 0; i < host.size(); ++i)
    REMAT_CHECK(host[i] >= 0 && host[i] < vocab, "embedding: expected indices in [0, ", vocab, "), got ", host[i],
                " at position ", i);
  return host;
}

}  // namespace

Tensor CudaBackend::embedding(const Tensor& idx, const Tensor& weight) {
  set_device_of(weight);
  int64_t n = idx.numel(), c = weight.size(1);
  checked_indices(idx, weight.size(0));
  Shape out_shape = idx.shape();
  out_shape.push_back(c);
  Tensor out = Tensor::empty(out_shape, weight.dtype(), weight.device());
  if (n * c == 0) return out;
  dispatch(weight.dtype(), "embedding", [&]<typename T>() {
    embedding_kernel<T><<<blocks_for(n * c), kThreads>>>(idx.raw_data(), idx.dtype() == DType::i64, weight.data<T>(),
                                                         out.data<T>(), n, c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor CudaBackend::embedding_backward(const Tensor& dy, const Tensor& idx, int64_t vocab) {
  set_device_of(dy);
  int64_t c = dy.size(-1);
  std::vector<int64_t> ids = checked_indices(idx, vocab);
  // Counting sort of positions by id: offsets[v] .. offsets[v + 1] are id v's positions, ascending.
  std::vector<int64_t> offsets(vocab + 1, 0), order(ids.size());
  for (int64_t id : ids) ++offsets[id + 1];
  for (int64_t v = 0; v < vocab; ++v) offsets[v + 1] += offsets[v];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (size_t i = 0; i < ids.size(); ++i) order[next[ids[i]]++] = static_cast<int64_t>(i);
  Tensor order_dev, offsets_dev;
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    order_dev = Tensor::from_vector(order, {static_cast<int64_t>(order.size())}, dy.device());
    offsets_dev = Tensor::from_vector(offsets, {vocab + 1}, dy.device());
  }
  Tensor dw = Tensor::empty({vocab, c}, dy.dtype(), dy.device());
  if (vocab * c == 0) return dw;
  dispatch(dy.dtype(), "embedding_backward", [&]<typename T>() {
    embedding_backward_kernel<T><<<blocks_for(vocab * c), kThreads>>>(dy.data<T>(), order_dev.data<int64_t>(),
                                                                      offsets_dev.data<int64_t>(), dw.data<T>(), vocab, c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dw;
}

}  // namespace remat
