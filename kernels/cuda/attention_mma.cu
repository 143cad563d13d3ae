// Attention on the tensor cores with remat's own kernels: bf16 q/k/v [B, H, T, D] (D 32, 64 or
// 128; strided heads read where they lie, outputs written [B, T, H, D]: attention_mma.h), mma.sync
// m16n8k16 with f32 accumulation, flash style (an online softmax over key tiles double-buffered in
// shared memory by cp.async, only the row log-sum-exp saved). The backward rebuilds the
// probabilities from it in two kernels, dq by query tiles and dk/dv by key tiles, each summing in
// a fixed order: no atomics, so a replay repeats the bits and every policy stays bitwise equal to
// none. `auto` (the default) and set_cuda_attention(mma) choose it where it applies; the flash
// kernel of attention.cu stays the reference it is tested against.

#include "kernels/cuda/attention_mma.h"

#include <cstdlib>
#include <string>

#include "kernels/attention_layout.h"
#include "kernels/cuda/attention_heads.h"
#include "kernels/cuda/attention_mma_kernels.cuh"
#include "kernels/cuda/cuda_common.cuh"
#include "runtime/cuda_devices.h"
#include "runtime/workspace.h"

namespace remat::cuda {

namespace {

using namespace mma_attention;

// Runs f.template operator()<D>() for the head dims the kernels are built for.
template <typename F>
void dispatch_mma_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    case 128: return f.template operator()<128>();
    default: REMAT_FAIL("attention (mma): head dim ", d, " is not 32, 64 or 128");
  }
}

// Row tiles a warp for each kernel (kBlockRows says what they are) from REMAT_CUDA_MMA_TILES,
// read at each call: unset or "auto", kDefaultRowTiles (0 here); "1" or "2", all three kernels;
// three digits ("211"), forward, dq and dk/dv each. A GPU's measurements compare them
// (tools/gpu_session.sh); the bits are the same. Head dim 128 takes one whatever is asked: two do
// not fit its registers.
struct RowTiles {
  int forward, dq, dkv;
};
RowTiles row_tiles() {
  const char* env = std::getenv("REMAT_CUDA_MMA_TILES");
  const std::string value = env != nullptr ? env : "";
  if (value.empty() || value == "auto") return {0, 0, 0};
  REMAT_CHECK((value.size() == 1 || value.size() == 3) && value.find_first_not_of("12") == std::string::npos,
              "REMAT_CUDA_MMA_TILES: expected auto, 1, 2 or three of them (forward, dq, dk/dv: 211), got '", value,
              "'");
  const std::string each = value.size() == 1 ? std::string(3, value[0]) : value;
  return {each[0] - '0', each[1] - '0', each[2] - '0'};  // dispatch_row_tiles takes one at head dim 128
}

// Runs f.template operator()<kM>() for `tiles` row tiles a warp (0: the default; 2 built at head
// dims up to 64).
template <int D, typename F>
void dispatch_row_tiles(int tiles, F&& f) {
  if (tiles == 0) tiles = kDefaultRowTiles<D>;
  if constexpr (D <= 64) {
    if (tiles == 2) return f.template operator()<2>();
  }
  return f.template operator()<1>();
}

dim3 grid(int64_t heads, int64_t t, int rows_per_block) {
  REMAT_CHECK(heads <= 65535, "attention: ", heads, " batch x heads exceed the cuda grid (65535)");
  return dim3(static_cast<unsigned>((t + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(heads));
}

template <typename E>
Heads<E> heads_of(const Tensor& x) {
  const auto& st = x.strides();
  return {reinterpret_cast<E*>(x.raw_data()), st[0], st[1], st[2], static_cast<int>(x.size(1))};
}

// Lets `kernel` take `bytes` of dynamic shared memory: past 48 KiB a kernel must opt in (the
// double-buffered tiles at head dim 128 take 51-70 KiB).
template <typename Kernel>
void allow_shared_bytes(Kernel* kernel, size_t bytes) {
  REMAT_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace

bool mma_attention_supported(const Tensor& q) {
  const int64_t d = q.size(3);
  if (q.dtype() != DType::bf16 || (d != 32 && d != 64 && d != 128)) return false;
  // The kernels count positions in int: T up to 2^30 leaves room for a tile past the end.
  if (q.size(2) > (int64_t{1} << 30)) return false;
  int major = 0;
  REMAT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index));
  return major >= 8;
}

std::vector<Tensor> attention_mma(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                  double scale) {
  const Tensor q = readable_heads(q_in), k = readable_heads(k_in), v = readable_heads(v_in);
  const int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  Tensor o = empty_heads(q);
  Tensor lse = Tensor::empty({q.size(0), q.size(1), t}, DType::f32, q.device());
  if (heads == 0 || t == 0) return {o, lse};
  count_cuda_attention_call(CudaAttention::mma);
  const RowTiles tiles = row_tiles();
  dispatch_mma_head_dim(d, [&]<int D>() {
    dispatch_row_tiles<D>(tiles.forward, [&]<int kM>() {
      constexpr size_t smem = forward_shared_bytes<D, kM>();
      allow_shared_bytes(&mma_forward_kernel<D, kM>, smem);
      REMAT_LAUNCH(grid(heads, t, kBlockRows<kM>), kBlockThreads, smem, mma_forward_kernel<D, kM>)(
          heads_of<const bf16>(q), heads_of<const bf16>(k), heads_of<const bf16>(v), heads_of<bf16>(o),
          lse.data<float>(), t, causal, static_cast<float>(scale));
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return {o, lse};
}

std::vector<Tensor> attention_backward_mma(const Tensor& d_o_in, const Tensor& q_in, const Tensor& k_in,
                                           const Tensor& v_in, const Tensor& o_in, const Tensor& lse, bool causal,
                                           double scale) {
  const Tensor d_o = readable_heads(d_o_in), q = readable_heads(q_in), k = readable_heads(k_in),
               v = readable_heads(v_in), o = readable_heads(o_in);
  const int64_t heads = q.size(0) * q.size(1), t = q.size(2), d = q.size(3);
  // The heads of one fused projection get their gradients side by side in one buffer (no copy in
  // split's backward), others each its own [B, T, H, D]; the kernels write every element.
  const std::vector<Tensor> grads = packed_attention_heads(q, k, v)
                                        ? packed_attention_grads(q, /*zeroed=*/false)
                                        : std::vector<Tensor>{empty_heads(q), empty_heads(q), empty_heads(q)};
  const Tensor &dq = grads[0], &dk = grads[1], &dv = grads[2];
  if (heads == 0 || t == 0) return grads;
  REMAT_CHECK(lse.dtype() == DType::f32, "attention (mma): expected the forward's f32 log-sum-exp, got ",
              dtype_name(lse.dtype()));
  count_cuda_attention_call(CudaAttention::mma);
  Tensor row_dot = empty_workspace({heads * t}, DType::f32, q.device());
  const RowTiles tiles = row_tiles();
  dispatch_mma_head_dim(d, [&]<int D>() {
    REMAT_LAUNCH(static_cast<unsigned>((heads * t + kBlockThreads - 1) / kBlockThreads), kBlockThreads, 0,
                 mma_row_dot_kernel<D>)(heads_of<const bf16>(d_o), heads_of<const bf16>(o), row_dot.data<float>(), t,
                                        heads * t);
    dispatch_row_tiles<D>(tiles.dq, [&]<int kM>() {
      constexpr size_t smem = dq_shared_bytes<D, kM>();
      allow_shared_bytes(&mma_dq_kernel<D, kM>, smem);
      REMAT_LAUNCH(grid(heads, t, kBlockRows<kM>), kBlockThreads, smem, mma_dq_kernel<D, kM>)(
          heads_of<const bf16>(q), heads_of<const bf16>(k), heads_of<const bf16>(v), heads_of<const bf16>(d_o),
          lse.data<float>(), row_dot.data<float>(), heads_of<bf16>(dq), t, causal, static_cast<float>(scale));
    });
    REMAT_CUDA_LAUNCH_CHECK();
    dispatch_row_tiles<D>(tiles.dkv, [&]<int kM>() {
      constexpr size_t smem = dkv_shared_bytes<D, kM>();
      allow_shared_bytes(&mma_dkv_kernel<D, kM>, smem);
      REMAT_LAUNCH(grid(heads, t, kBlockRows<kM>), kBlockThreads, smem, mma_dkv_kernel<D, kM>)(
          heads_of<const bf16>(q), heads_of<const bf16>(k), heads_of<const bf16>(v), heads_of<const bf16>(d_o),
          lse.data<float>(), row_dot.data<float>(), heads_of<bf16>(dk), heads_of<bf16>(dv), t, causal,
          static_cast<float>(scale));
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return grads;
}

}  // namespace remat::cuda
