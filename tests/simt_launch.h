// The prelude of the emulated CUDA part (tests/meson.build: remat_cuda_emulated): the CUDA part's
// own sources, compiled by the host compiler with this header first, run their kernels under the
// SIMT emulator on the simulated runtime of fake_cuda_runtime.h. REMAT_LAUNCH (runtime/cuda/launch.h)
// becomes `launcher`, which checks the configuration and queues the kernel on the current device's
// compute stream; CUB's radix sort is a stable sort queued the same way. cuBLAS is fake_cublas.cpp.
#pragma once

#include "simt_emulator.h"  // first: defines REMAT_SIMT_EMULATION and the CUDA built-ins

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fake_cuda_runtime.h"

namespace remat_simt {

inline Dim3 to_dim3(dim3 d) { return {d.x, d.y, d.z}; }
template <typename I>
  requires std::is_integral_v<I>
Dim3 to_dim3(I x) {
  return {static_cast<unsigned>(x), 1, 1};
}

// REMAT_LAUNCH(grid, block, shared_bytes, kernel)(args...): the arguments converted to the kernel's
// parameter types now (as a launch does), the kernel run when the stream reaches it.
template <typename G, typename B, typename... P>
auto launcher(G grid, B block, size_t shared_bytes, void (*kernel)(P...)) {
  return [=](auto&&... args) {
    static_assert(sizeof...(args) == sizeof...(P), "a launch with the wrong number of arguments");
    std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
    const Dim3 g = to_dim3(grid), b = to_dim3(block);
    const unsigned gd[3] = {g.x, std::max(g.y, 1u), std::max(g.z, 1u)};
    const unsigned bd[3] = {b.x, std::max(b.y, 1u), std::max(b.z, 1u)};
    fake_cuda::launch(reinterpret_cast<const void*>(kernel), gd, bd, shared_bytes, [=] {
      launch(g, b, shared_bytes, [&] { std::apply(kernel, params); });
    });
  };
}

}  // namespace remat_simt

// CUB's radix sort of key-value pairs, as remat calls it: stable, on the bits [begin_bit, end_bit).
namespace cub {
struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out, const V* values_in,
                               V* values_out, int n, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t stream = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 256;  // a size query, as CUB answers it
      return cudaSuccess;
    }
    const unsigned zero[3] = {1, 1, 1};
    fake_cuda::launch(reinterpret_cast<const void*>(&SortPairs<K, V>), zero, zero, 0, [=] {
      const K mask = end_bit - begin_bit >= static_cast<int>(sizeof(K) * 8) ? ~K(0)
                                                                           : ((K(1) << (end_bit - begin_bit)) - 1)
                                                                                 << begin_bit;
      std::vector<int> order(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return (keys_in[a] & mask) < (keys_in[b] & mask); });
      std::vector<K> k(n);
      std::vector<V> v(n);
      for (int i = 0; i < n; ++i) k[i] = keys_in[order[i]], v[i] = values_in[order[i]];
      std::copy(k.begin(), k.end(), keys_out);
      std::copy(v.begin(), v.end(), values_out);
    });
    (void)stream;
    return cudaGetLastError();
  }
};
}  // namespace cub
