// CUDA elementwise ops: unary functions with their fused backward, broadcasting binary ops,
// strided copies, Philox dropout (the CPU's mask, bit for bit), the AdamW update and casts; their
// kernels are in elementwise_kernels.cuh.
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/elementwise_kernels.cuh"

namespace remat {

namespace cuda {

void set_device_of(const Tensor& t) {
  REMAT_CHECK(t.device().is_cuda(), "cuda kernel called with a tensor on ", t.device().str());
  REMAT_CUDA_CHECK(cudaSetDevice(t.device().index));
}

}  // namespace cuda

using namespace cuda;
using namespace cuda::elementwise_kernels;

Tensor CudaBackend::unary(UnaryFn fn, const Tensor& x, double scalar) {
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t n = x.numel();
  dispatch(x.dtype(), "unary", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, unary_kernel<T>)(
        fn, x.data<T>(), y.data<T>(), n, static_cast<Acc<T>>(scalar));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

namespace {

// dx = dy * f'(x) into `dx`, which may be dy itself: each thread reads its element, then writes it.
void unary_backward_into(UnaryFn fn, const Tensor& dy, const Tensor& x, const Tensor& y, double scalar, Tensor& dx) {
  int64_t n = dy.numel();
  dispatch(dy.dtype(), "unary_backward", [&]<typename T>() {
    REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, unary_backward_kernel<T>)(
        fn, dy.data<T>(), x.defined() ? x.data<T>() : nullptr, y.defined() ? y.data<T>() : nullptr, dx.data<T>(), n,
        static_cast<Acc<T>>(scalar));
  });
  REMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace

Tensor CudaBackend::unary_backward(UnaryFn fn, const Tensor& dy, const Tensor& x, const Tensor& y, double scalar) {
  set_device_of(dy);
  Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  unary_backward_into(fn, dy, x, y, scalar, dx);
  return dx;
}

bool CudaBackend::unary_backward_in_place(UnaryFn fn, Tensor& dy, const Tensor& x, const Tensor& y, double scalar) {
  set_device_of(dy);
  unary_backward_into(fn, dy, x, y, scalar, dy);
  dy.storage()->bump_version();
  return true;
}

Tensor CudaBackend::binary(BinaryFn fn, const Tensor& a, const Tensor& b) {
  set_device_of(a);
  if (a.dtype() != b.dtype()) {  // f32 and bf16 (binary_mixes_dtypes)
    const bool narrow_first = a.dtype() == DType::bf16;
    const Tensor& wide = narrow_first ? b : a;
    const Tensor& narrow = narrow_first ? a : b;
    REMAT_CHECK(wide.dtype() == DType::f32 && narrow.dtype() == DType::bf16 && a.shape() == b.shape() &&
                    a.is_contiguous() && b.is_contiguous(),
                "binary: expected operands of one dtype, or contiguous f32 and bf16 of one shape, got ", a.meta_str(),
                " and ", b.meta_str());
    Tensor out = Tensor::empty(a.shape(), DType::f32, a.device());
    const int64_t n = out.numel();
    if (n > 0)
      REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, binary_widening_kernel<float, bf16>)(
          fn, wide.data<float>(), narrow.data<bf16>(), narrow_first, out.data<float>(), n);
    REMAT_CUDA_LAUNCH_CHECK();
    return out;
  }
  Shape out_shape = broadcast_shapes(a.shape(), b.shape(), "binary");
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  int64_t n = out.numel();
  bool same = a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous();
  Indexer ix = make_indexer(out_shape, a, &b, "binary");
  dispatch(a.dtype(), "binary", [&]<typename T>() {
    if (same) REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, binary_same_kernel<T>)(
        fn, a.data<T>(), b.data<T>(), out.data<T>(), n);
    else REMAT_LAUNCH(blocks_for(n), kThreads, 0, binary_broadcast_kernel<T>)(
        fn, a.data<T>(), b.data<T>(), out.data<T>(), n, ix);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
}

namespace {

// How a strided copy runs: the source's dims with size-1 dims dropped and dims that lie back to
// back in memory merged (the output is dense, so any such run copies as one dim), then, where the
// last dim is dense and its length, every other stride and both addresses are multiples of a
// wider word, in words of up to 16 bytes: the copy into [B, T, H, D] of attention's heads moves
// eight bf16 per index computation instead of one.
struct GatherPlan {
  size_t word;  // bytes per element of the copy
  std::vector<int64_t> sizes, strides;  // in words
};

GatherPlan plan_gather(const Tensor& x, const void* out) {
  GatherPlan plan{dtype_size(x.dtype()), {}, {}};
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.shape()[d] == 1) continue;
    if (!plan.sizes.empty() && plan.strides.back() == x.strides()[d] * x.shape()[d]) {
      plan.sizes.back() *= x.shape()[d];
      plan.strides.back() = x.strides()[d];
    } else {
      plan.sizes.push_back(x.shape()[d]);
      plan.strides.push_back(x.strides()[d]);
    }
  }
  if (plan.sizes.empty() || plan.strides.back() != 1) return plan;
  auto address = [](const void* p) { return reinterpret_cast<uintptr_t>(p); };
  for (size_t word : {size_t{16}, size_t{8}, size_t{4}}) {
    if (word <= plan.word) break;
    const int64_t ratio = static_cast<int64_t>(word / plan.word);
    bool fits = plan.sizes.back() % ratio == 0 && address(x.raw_data()) % word == 0 && address(out) % word == 0;
    for (size_t d = 0; d + 1 < plan.sizes.size(); ++d) fits = fits && plan.strides[d] % ratio == 0;
    if (!fits) continue;
    plan.sizes.back() /= ratio;
    for (size_t d = 0; d + 1 < plan.sizes.size(); ++d) plan.strides[d] /= ratio;
    plan.word = word;
    break;
  }
  return plan;
}

template <typename W>
void launch_gather(const Tensor& x, Tensor& out, const GatherPlan& plan) {
  int64_t n = 1;
  for (int64_t size : plan.sizes) n *= size;
  REMAT_LAUNCH(blocks_for(n), kThreads, 0, gather_kernel<W>)(
      static_cast<const W*>(x.raw_data()), static_cast<W*>(out.raw_data()), n, gather_indexer(plan.sizes, plan.strides));
}

}  // namespace

Tensor CudaBackend::copy_strided(const Tensor& x) {
  set_device_of(x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.numel() == 0) return out;
  const GatherPlan plan = plan_gather(x, out.raw_data());
  if (x.is_contiguous() || plan.sizes.empty() || (plan.sizes.size() == 1 && plan.strides[0] == 1)) {
    REMAT_CUDA_CHECK(cudaMemcpyAsync(out.raw_data(), x.raw_data(), x.nbytes(), cudaMemcpyDeviceToDevice));
    return out;
  }
  switch (plan.word) {
    case 1: launch_gather<uint8_t>(x, out, plan); break;
    case 2: launch_gather<uint16_t>(x, out, plan); break;
    case 4: launch_gather<uint32_t>(x, out, plan); break;
    case 8: launch_gather<uint64_t>(x, out, plan); break;
    case 16: launch_gather<Word16>(x, out, plan); break;
    default: REMAT_FAIL("copy_strided: unexpected element size ", plan.word);
  }
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
}

void CudaBackend::copy_into_slice(Tensor& dst, const Tensor& src, int64_t axis, int64_t start) {
  set_device_of(dst);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= dst.shape()[d];
  for (int64_t d = axis + 1; d < dst.dim(); ++d) inner *= dst.shape()[d];
  size_t elem = dtype_size(dst.dtype());
  size_t src_block = static_cast<size_t>(src.shape()[axis] * inner) * elem;
  size_t dst_block = static_cast<size_t>(dst.shape()[axis] * inner) * elem;
  if (src_block == 0 || outer == 0) return;
  // One 2-D copy: `outer` rows of src_block bytes, each landing at its row's slice offset.
  REMAT_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(dst.raw_data()) + start * inner * elem, dst_block,
                                     src.raw_data(), src_block, src_block, outer, cudaMemcpyDeviceToDevice));
}

Tensor CudaBackend::dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset, DType out) {
  // bf16 from f32 in one kernel (dropout_add's backward); another narrowing takes a cast first.
  const bool from_f32 = out == DType::bf16 && x.dtype() == DType::f32;
  if (out != x.dtype() && !from_f32) return dropout(cast(x, out), p, seed, offset, out);
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), out, x.device());
  int64_t n = x.numel();
  dispatch(out, "dropout", [&]<typename T>() {
    Acc<T> keep_scale = Acc<T>(1) / (Acc<T>(1) - static_cast<Acc<T>>(p));  // as the CPU computes it
    if constexpr (std::is_same_v<T, bf16>) {
      if (from_f32) {
        REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, dropout_kernel<bf16, float>)(
            x.data<float>(), y.data<bf16>(), n, static_cast<float>(p), keep_scale, seed, offset);
        return;
      }
    }
    REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, dropout_kernel<T>)(
        x.data<T>(), y.data<T>(), n, static_cast<float>(p), keep_scale, seed, offset);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::dropout_add(const Tensor& x, const Tensor& residual, double p, uint64_t seed, uint64_t offset) {
  const bool widening = x.dtype() == DType::bf16 && residual.dtype() == DType::f32;
  REMAT_CHECK((x.dtype() == residual.dtype() || widening) && x.shape() == residual.shape() && x.is_contiguous() &&
                  residual.is_contiguous(),
              "dropout_add: expected contiguous x and residual of one shape, of one dtype or bf16 and f32, got ",
              x.meta_str(), " and ", residual.meta_str());
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), residual.dtype(), x.device());
  const int64_t n = x.numel();
  if (n == 0) return y;
  auto launch = [&]<typename X, typename R>() {
    Acc<X> keep_scale = Acc<X>(1) / (Acc<X>(1) - static_cast<Acc<X>>(p));  // dropout's
    REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, dropout_add_kernel<X, R>)(
        x.data<X>(), residual.data<R>(), y.data<R>(), n, static_cast<float>(p), keep_scale, seed, offset);
  };
  if (widening) launch.template operator()<bf16, float>();
  else dispatch(x.dtype(), "dropout_add", [&]<typename T>() { launch.template operator()<T, T>(); });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

void CudaBackend::adamw_update(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWStep& s) {
  set_device_of(param);
  int64_t n = param.numel();
  dispatch(param.dtype(), "adamw_update", [&]<typename T>() {
    using A = Acc<T>;
    A bias1 = A(1) - static_cast<A>(std::pow(s.beta1, static_cast<double>(s.step)));
    A bias2 = A(1) - static_cast<A>(std::pow(s.beta2, static_cast<double>(s.step)));
    REMAT_LAUNCH(blocks_for(n), kThreads, 0, adamw_kernel<T>)(
        param.data<T>(), grad.data<T>(), m.data<T>(), v.data<T>(), n, static_cast<A>(s.beta1), static_cast<A>(s.beta2),
        bias1, bias2, static_cast<A>(s.lr), static_cast<A>(s.eps), static_cast<A>(s.lr * s.weight_decay));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  param.storage()->bump_version();
}

void CudaBackend::adamw_update_all(const std::vector<AdamWTensors>& items) {
  // Checked before anything is queued, so that a bad item updates nothing.
  for (const AdamWTensors& t : items) {
    const Tensor* copy = t.compute_copy;
    REMAT_CHECK(copy == nullptr || (t.param->dtype() == DType::f32 && copy->dtype() == DType::bf16 &&
                                    copy->numel() == t.param->numel() && copy->is_contiguous() &&
                                    copy->device() == t.param->device()),
                "adamw_update_all: expected an f32 parameter's contiguous bf16 copy of its shape, got ",
                t.param->meta_str(), " and ", copy->meta_str());
  }
  // Tensors that can share a launch: same dtype and the same betas, eps and step.
  auto same_launch = [](const AdamWTensors& a, const AdamWTensors& b) {
    return a.param->dtype() == b.param->dtype() && a.param->device() == b.param->device() &&
           a.step.beta1 == b.step.beta1 && a.step.beta2 == b.step.beta2 && a.step.eps == b.step.eps &&
           a.step.step == b.step.step;
  };
  std::vector<bool> done(items.size(), false);
  for (size_t first = 0; first < items.size(); ++first) {
    if (done[first]) continue;
    const AdamWTensors& lead = items[first];
    set_device_of(*lead.param);
    dispatch(lead.param->dtype(), "adamw_update_all", [&]<typename T>() {
      using A = Acc<T>;
      const AdamWStep& s = lead.step;
      A bias1 = A(1) - static_cast<A>(std::pow(s.beta1, static_cast<double>(s.step)));
      A bias2 = A(1) - static_cast<A>(std::pow(s.beta2, static_cast<double>(s.step)));
      AdamWChunk<T> chunk{};
      auto launch = [&] {
        if (chunk.count > 0 && chunk.start[chunk.count] > 0) {
          REMAT_LAUNCH(blocks_for(chunk.start[chunk.count]), kThreads, 0, adamw_chunk_kernel<T>)(
              chunk, static_cast<A>(s.beta1), static_cast<A>(s.beta2), bias1, bias2, static_cast<A>(s.eps));
          REMAT_CUDA_LAUNCH_CHECK();
        }
        chunk = AdamWChunk<T>{};
      };
      for (size_t i = first; i < items.size(); ++i) {
        const AdamWTensors& t = items[i];
        if (done[i] || !same_launch(t, lead)) continue;
        done[i] = true;
        int64_t n = t.param->numel();
        if (n == 0) continue;
        int k = chunk.count;
        chunk.p[k] = t.param->data<T>();
        chunk.g[k] = t.grad->data<T>();
        chunk.m[k] = t.m->data<T>();
        chunk.v[k] = t.v->data<T>();
        if (t.compute_copy != nullptr) chunk.copy[k] = t.compute_copy->data<bf16>();
        chunk.lr[k] = static_cast<A>(t.step.lr);
        chunk.decay[k] = static_cast<A>(t.step.lr * t.step.weight_decay);
        chunk.start[k + 1] = chunk.start[k] + n;
        chunk.count = k + 1;
        if (chunk.count == kAdamWChunk) launch();
      }
      launch();
    });
  }
  for (const AdamWTensors& t : items) t.param->storage()->bump_version();
}

Tensor CudaBackend::cast(const Tensor& x, DType dtype) {
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), dtype, x.device());
  int64_t n = x.numel();
  dispatch(x.dtype(), "cast", [&]<typename From>() {
    dispatch(dtype, "cast", [&]<typename To>() {
      REMAT_LAUNCH(blocks_for_packs(n), kThreads, 0, cast_kernel<From, To>)(x.data<From>(), y.data<To>(), n);
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

}  // namespace remat
