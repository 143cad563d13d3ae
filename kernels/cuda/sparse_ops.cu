// CUDA embedding lookup and its deterministic backward. Indices are checked on the GPU (a bad one is
// reported at the next synchronisation, runtime/cuda/index_faults.h) and token positions grouped by
// id there with CUB's radix sort, which is stable: each weight row then sums its tokens in position
// order, the order the CPU uses, with no atomics and no copy to the host. REMAT_CUDA_INDEX_CHECK=host
// keeps the reference path: indices checked and grouped on the host.
#ifndef REMAT_SIMT_EMULATION  // the emulated CUDA part has its own (tests/simt_launch.h)
#include <cub/device/device_radix_sort.cuh>
#endif

#include <limits>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/embedding_kernels.cuh"
#include "runtime/cuda/index_faults.h"

namespace remat {

namespace {

using namespace cuda;
using namespace cuda::embedding_kernels;

std::vector<int64_t> checked_indices(const Tensor& idx, int64_t vocab) {
  std::vector<int64_t> host = idx.to_vector<int64_t>();
  for (size_t i = 0; i < host.size(); ++i)
    REMAT_CHECK(host[i] >= 0 && host[i] < vocab, "embedding: expected indices in [0, ", vocab, "), got ", host[i],
                " at position ", i);
  return host;
}

// The reference grouping on the host: a stable counting sort of positions by id.
void group_on_host(const Tensor& idx, int64_t vocab, Tensor& order_dev, Tensor& offsets_dev, Device device) {
  std::vector<int64_t> ids = checked_indices(idx, vocab);
  std::vector<int32_t> offsets(vocab + 1, 0), order(ids.size());
  for (int64_t id : ids) ++offsets[id + 1];
  for (int64_t v = 0; v < vocab; ++v) offsets[v + 1] += offsets[v];
  std::vector<int32_t> next(offsets.begin(), offsets.end() - 1);
  for (size_t i = 0; i < ids.size(); ++i) order[next[ids[i]]++] = static_cast<int32_t>(i);
  order_dev = Tensor::from_vector(order, {static_cast<int64_t>(order.size())}, device);
  offsets_dev = Tensor::from_vector(offsets, {vocab + 1}, device);
}

// The same grouping on the GPU: keys checked and sorted with their positions (stable), then each
// id's first position found by a binary search.
void group_on_device(const Tensor& idx, int64_t vocab, Tensor& order_dev, Tensor& offsets_dev, Device device) {
  int64_t n = idx.numel();
  int bits = 1;
  while ((int64_t(1) << bits) <= vocab) ++bits;  // enough for every key, `vocab` included
  Tensor keys = Tensor::empty({n}, DType::i32, device), sorted_keys = Tensor::empty({n}, DType::i32, device);
  Tensor positions = Tensor::empty({n}, DType::i32, device);
  order_dev = Tensor::empty({n}, DType::i32, device);
  offsets_dev = Tensor::empty({vocab + 1}, DType::i32, device);
  auto* k_in = static_cast<uint32_t*>(keys.raw_data());
  auto* k_out = static_cast<uint32_t*>(sorted_keys.raw_data());
  if (n > 0) {
    REMAT_LAUNCH(blocks_for(n), kThreads, 0, embedding_keys_kernel)(
        idx.raw_data(), idx.dtype() == DType::i64, n, vocab, k_in, positions.data<int32_t>(),
        index_fault_record(device.index));
    REMAT_CUDA_LAUNCH_CHECK();
    size_t temp_bytes = 0;
    REMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, k_in, k_out, positions.data<int32_t>(),
                                                     order_dev.data<int32_t>(), static_cast<int>(n), 0, bits));
    Tensor temp = Tensor::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, DType::u8, device);
    REMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw_data(), temp_bytes, k_in, k_out,
                                                     positions.data<int32_t>(), order_dev.data<int32_t>(),
                                                     static_cast<int>(n), 0, bits));
  }
  REMAT_LAUNCH(blocks_for(vocab + 1), kThreads, 0, embedding_offsets_kernel)(
      k_out, n, vocab, offsets_dev.data<int32_t>());
  REMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

Tensor CudaBackend::embedding(const Tensor& idx, const Tensor& weight) {
  set_device_of(weight);
  int64_t n = idx.numel(), c = weight.size(1);
  bool on_host = index_checks_on_host();
  if (on_host) checked_indices(idx, weight.size(0));
  Shape out_shape = idx.shape();
  out_shape.push_back(c);
  Tensor out = Tensor::empty(out_shape, weight.dtype(), weight.device());
  if (n * c == 0) return out;
  IndexFault* fault = on_host ? nullptr : index_fault_record(weight.device().index);
  dispatch(weight.dtype(), "embedding", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(n * c), kThreads, 0, embedding_kernel<T>)(
        idx.raw_data(), idx.dtype() == DType::i64, weight.data<T>(), out.data<T>(), n, c, weight.size(0), fault);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor CudaBackend::embedding_backward(const Tensor& dy, const Tensor& idx, int64_t vocab) {
  set_device_of(dy);
  int64_t c = dy.size(-1), n = idx.numel();
  // Positions and offsets are 32-bit (and the sort keys hold `vocab` itself).
  REMAT_CHECK(n < std::numeric_limits<int32_t>::max() && vocab < std::numeric_limits<int32_t>::max(),
              "embedding backward on cuda: expected fewer than 2^31 - 1 indices and rows, got ", n, " and ", vocab);
  Tensor order_dev, offsets_dev;
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    if (index_checks_on_host()) group_on_host(idx, vocab, order_dev, offsets_dev, dy.device());
    else group_on_device(idx, vocab, order_dev, offsets_dev, dy.device());
  }
  Tensor dw = Tensor::empty({vocab, c}, dy.dtype(), dy.device());
  if (vocab * c == 0) return dw;
  dispatch(dy.dtype(), "embedding_backward", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for(vocab * c), kThreads, 0, embedding_backward_kernel<T>)(
        dy.data<T>(), order_dev.data<int32_t>(), offsets_dev.data<int32_t>(), dw.data<T>(), vocab, c);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dw;
}

}  // namespace remat
