// CUDA elementwise kernels: unary functions with their fused backward, broadcasting binary ops,
// strided copies, Philox dropout (the CPU's mask, bit for bit) and the AdamW update.
#include "kernels/common/elementwise_math.h"
#include "runtime/philox.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

namespace remat {

namespace cuda {

void set_device_of(const Tensor& t) {
  REMAT_CHECK(t.device().is_cuda(), "cuda kernel called with a tensor on ", t.device().str());
  REMAT_CUDA_CHECK(cudaSetDevice(t.device().index));
}

}  // namespace cuda

namespace {

using namespace cuda;

template <typename A>
__device__ A unary_value(UnaryFn fn, A v, A s) {
  switch (fn) {
    case UnaryFn::add_scalar: return v + s;
    case UnaryFn::mul_scalar: return v * s;
    case UnaryFn::pow_scalar: return pow(v, s);
    case UnaryFn::neg: return -v;
    case UnaryFn::exp: return exp(v);
    case UnaryFn::log: return log(v);
    case UnaryFn::tanh: return tanh(v);
    case UnaryFn::sqrt: return sqrt(v);
    case UnaryFn::rsqrt: return A(1) / sqrt(v);
    case UnaryFn::relu: return v > A(0) ? v : A(0);
    case UnaryFn::gelu: return math::gelu(v);
    case UnaryFn::silu: return math::silu(v);
    case UnaryFn::sigmoid: return math::sigmoid(v);
  }
  return A(0);
}

// dy * f'(x), from x or from y = f(x) as the CPU backend does.
template <typename A>
__device__ A unary_grad(UnaryFn fn, A g, A x, A y, A s) {
  switch (fn) {
    case UnaryFn::add_scalar: return g;
    case UnaryFn::mul_scalar: return g * s;
    case UnaryFn::pow_scalar: return g * s * pow(x, s - A(1));
    case UnaryFn::neg: return -g;
    case UnaryFn::exp: return g * y;
    case UnaryFn::log: return g / x;
    case UnaryFn::tanh: return g * (A(1) - y * y);
    case UnaryFn::sqrt: return g * A(0.5) / y;
    case UnaryFn::rsqrt: return g * A(-0.5) * y * y * y;
    case UnaryFn::relu: return x > A(0) ? g : A(0);
    case UnaryFn::gelu: return g * math::gelu_grad(x);
    case UnaryFn::silu: return g * math::silu_grad(x);
    case UnaryFn::sigmoid: return g * y * (A(1) - y);
  }
  return A(0);
}

template <typename T>
__global__ void unary_kernel(UnaryFn fn, const T* x, T* y, int64_t n, Acc<T> s) {
  REMAT_GRID_STRIDE(i, n) y[i] = cast_to<T>(unary_value(fn, load(x, i), s));
}

template <typename T>
__global__ void unary_backward_kernel(UnaryFn fn, const T* dy, const T* x, const T* y, T* dx, int64_t n, Acc<T> s) {
  REMAT_GRID_STRIDE(i, n) {
    Acc<T> xv = x ? load(x, i) : Acc<T>(0), yv = y ? load(y, i) : Acc<T>(0);
    dx[i] = cast_to<T>(unary_grad(fn, load(dy, i), xv, yv, s));
  }
}

template <typename A>
__device__ A binary_value(BinaryFn fn, A a, A b) {
  switch (fn) {
    case BinaryFn::add: return a + b;
    case BinaryFn::sub: return a - b;
    case BinaryFn::mul: return a * b;
    case BinaryFn::div: return a / b;
  }
  return A(0);
}

constexpr int kMaxRank = 8;

// Output shape and the element strides of up to two inputs seen in that shape (0 where broadcast).
struct Indexer {
  int rank;
  int64_t sizes[kMaxRank];
  int64_t strides[2][kMaxRank];

  __device__ void offsets(int64_t linear, int64_t& a, int64_t& b) const {
    a = 0, b = 0;
    for (int d = rank - 1; d >= 0; --d) {
      int64_t idx = linear % sizes[d];
      linear /= sizes[d];
      a += idx * strides[0][d];
      b += idx * strides[1][d];
    }
  }
};

Indexer make_indexer(const Shape& out, const Tensor& a, const Tensor* b, const char* op) {
  REMAT_CHECK(out.size() <= static_cast<size_t>(kMaxRank), op, ": the cuda backend handles up to ", kMaxRank,
              " dims, got ", shape_str(out));
  Indexer ix{};
  ix.rank = static_cast<int>(out.size());
  const Tensor* ins[2] = {&a, b};
  for (int k = 0; k < 2; ++k) {
    if (!ins[k]) continue;
    const Tensor& t = *ins[k];
    size_t lead = out.size() - t.shape().size();
    for (size_t i = 0; i < t.shape().size(); ++i) ix.strides[k][lead + i] = t.shape()[i] == 1 ? 0 : t.strides()[i];
  }
  for (size_t d = 0; d < out.size(); ++d) ix.sizes[d] = out[d];
  return ix;
}

template <typename T>
__global__ void binary_same_kernel(BinaryFn fn, const T* a, const T* b, T* y, int64_t n) {
  REMAT_GRID_STRIDE(i, n) y[i] = cast_to<T>(binary_value(fn, load(a, i), load(b, i)));
}

template <typename T>
__global__ void binary_broadcast_kernel(BinaryFn fn, const T* a, const T* b, T* y, int64_t n, Indexer ix) {
  REMAT_GRID_STRIDE(i, n) {
    int64_t oa, ob;
    ix.offsets(i, oa, ob);
    y[i] = cast_to<T>(binary_value(fn, load(a, oa), load(b, ob)));
  }
}

// Copies by element width so that any dtype moves unchanged.
template <typename W>
__global__ void gather_kernel(const W* src, W* dst, int64_t n, Indexer ix) {
  REMAT_GRID_STRIDE(i, n) {
    int64_t os, unused;
    ix.offsets(i, os, unused);
    dst[i] = src[os];
  }
}

template <typename T>
__global__ void dropout_kernel(const T* x, T* y, int64_t n, float threshold, Acc<T> keep_scale, uint64_t seed,
                               uint64_t offset) {
  REMAT_GRID_STRIDE(i, n) {
    float u = philox::uniform_from_bits(philox::bits_at(seed, offset, static_cast<uint64_t>(i)));
    y[i] = u >= threshold ? cast_to<T>(load(x, i) * keep_scale) : cast_to<T>(Acc<T>(0));
  }
}

// One element of the AdamW update, shared by the per-tensor and the multi-tensor kernel so that
// both give the same bits.
template <typename T>
__device__ __forceinline__ void adamw_element(T* p, const T* g, T* m, T* v, int64_t i, Acc<T> b1, Acc<T> b2,
                                              Acc<T> bias1, Acc<T> bias2, Acc<T> lr, Acc<T> eps, Acc<T> decay) {
  using A = Acc<T>;
  A gi = load(g, i), pi = load(p, i);
  A mi = b1 * load(m, i) + (A(1) - b1) * gi;
  A vi = b2 * load(v, i) + (A(1) - b2) * gi * gi;
  m[i] = cast_to<T>(mi);
  v[i] = cast_to<T>(vi);
  A m_hat = mi / bias1, v_hat = vi / bias2;
  p[i] = cast_to<T>(pi - decay * pi - lr * m_hat / (sqrt(v_hat) + eps));
}

template <typename T>
__global__ void adamw_kernel(T* p, const T* g, T* m, T* v, int64_t n, Acc<T> b1, Acc<T> b2, Acc<T> bias1,
                             Acc<T> bias2, Acc<T> lr, Acc<T> eps, Acc<T> decay) {
  REMAT_GRID_STRIDE(i, n) adamw_element(p, g, m, v, i, b1, b2, bias1, bias2, lr, eps, decay);
}

// Up to kAdamWChunk tensors of one update, passed by value (under the classic 4 KB of kernel
// parameters): their pointers, their rates and where each starts in the chunk's elements.
constexpr int kAdamWChunk = 40;

template <typename T>
struct AdamWChunk {
  T* p[kAdamWChunk];
  const T* g[kAdamWChunk];
  T* m[kAdamWChunk];
  T* v[kAdamWChunk];
  Acc<T> lr[kAdamWChunk], decay[kAdamWChunk];
  int64_t start[kAdamWChunk + 1];  // start[count]: all the chunk's elements
  int count;
};

template <typename T>
__global__ void adamw_chunk_kernel(AdamWChunk<T> c, Acc<T> b1, Acc<T> b2, Acc<T> bias1, Acc<T> bias2, Acc<T> eps) {
  REMAT_GRID_STRIDE(e, c.start[c.count]) {
    int lo = 0, hi = c.count - 1;  // the tensor holding element e: the last one starting at or before it
    while (lo < hi) {
      int mid = (lo + hi + 1) / 2;
      if (c.start[mid] <= e) lo = mid;
      else hi = mid - 1;
    }
    adamw_element(c.p[lo], c.g[lo], c.m[lo], c.v[lo], e - c.start[lo], b1, b2, bias1, bias2, c.lr[lo], eps,
                  c.decay[lo]);
  }
}

template <typename From, typename To>
__global__ void cast_kernel(const From* x, To* y, int64_t n) {
  REMAT_GRID_STRIDE(i, n) y[i] = cast_to<To>(static_cast<Acc<To>>(load(x, i)));
}

}  // namespace

Tensor CudaBackend::unary(UnaryFn fn, const Tensor& x, double scalar) {
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t n = x.numel();
  dispatch(x.dtype(), "unary", [&]<typename T>() {
    unary_kernel<T><<<blocks_for(n), kThreads>>>(fn, x.data<T>(), y.data<T>(), n, static_cast<Acc<T>>(scalar));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

Tensor CudaBackend::unary_backward(UnaryFn fn, const Tensor& dy, const Tensor& x, const Tensor& y, double scalar) {
  set_device_of(dy);
  Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  int64_t n = dy.numel();
  dispatch(dy.dtype(), "unary_backward", [&]<typename T>() {
    unary_backward_kernel<T><<<blocks_for(n), kThreads>>>(fn, dy.data<T>(), x.defined() ? x.data<T>() : nullptr,
                                                          y.defined() ? y.data<T>() : nullptr, dx.data<T>(), n,
                                                          static_cast<Acc<T>>(scalar));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return dx;
}

Tensor CudaBackend::binary(BinaryFn fn, const Tensor& a, const Tensor& b) {
  set_device_of(a);
  Shape out_shape = broadcast_shapes(a.shape(), b.shape(), "binary");
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  int64_t n = out.numel();
  bool same = a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous();
  Indexer ix = make_indexer(out_shape, a, &b, "binary");
  dispatch(a.dtype(), "binary", [&]<typename T>() {
    if (same) binary_same_kernel<T><<<blocks_for(n), kThreads>>>(fn, a.data<T>(), b.data<T>(), out.data<T>(), n);
    else binary_broadcast_kernel<T><<<blocks_for(n), kThreads>>>(fn, a.data<T>(), b.data<T>(), out.data<T>(), n, ix);
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return out;
}

Tensor CudaBackend::copy_strided(const Tensor& x) {
  set_device_of(x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t n = x.numel();
  if (n == 0) return out;
  if (x.is_contiguous()) {
    REMAT_CUDA_CHECK(cudaMemcpyAsync(out.raw_data(), x.raw_data(), x.nbytes(), cudaMemcpyDeviceToDevice));
    return out;
  }
  Indexer ix = make_indexer(x.shape(), x, nullptr, "copy_strided");
  switch (dtype_size(x.dtype())) {
    case 1: gather_kernel<<<blocks_for(n), kThreads>>>(static_cast<const uint8_t*>(x.raw_data()), static_cast<uint8_t*>(out.raw_data()), n, ix); break;
    case 2: gather_kernel<<<blocks_for(n), kThreads>>>(static_cast<const uint16_t*>(x.raw_data()), static_cast<uint16_t*>(out.raw_data()), n, ix); break;
    case 4: gather_kernel<<<blocks_for(n), kThreads>>>(static_cast<const uint32_t*>(x.raw_data()), static_cast<uint32_t*>(out.raw_data()), n, ix); break;
    case 8: gather_kernel<<<blocks_for(n), kThreads>>>(static_cast<const uint64_t*>(x.raw_data()), static_cast<uint64_t*>(out.raw_data()), n, ix); break;
    default: REMAT_FAIL("copy_strided: unexpected element size ", dtype_size(x.dtype()));
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

Tensor CudaBackend::dropout(const Tensor& x, double p, uint64_t seed, uint64_t offset) {
  set_device_of(x);
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  int64_t n = x.numel();
  dispatch(x.dtype(), "dropout", [&]<typename T>() {
    Acc<T> keep_scale = Acc<T>(1) / (Acc<T>(1) - static_cast<Acc<T>>(p));  // as the CPU computes it
    dropout_kernel<T><<<blocks_for(n), kThreads>>>(x.data<T>(), y.data<T>(), n, static_cast<float>(p), keep_scale,
                                                   seed, offset);
  });
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
    adamw_kernel<T><<<blocks_for(n), kThreads>>>(param.data<T>(), grad.data<T>(), m.data<T>(), v.data<T>(), n,
                                                 static_cast<A>(s.beta1), static_cast<A>(s.beta2), bias1, bias2,
                                                 static_cast<A>(s.lr), static_cast<A>(s.eps),
                                                 static_cast<A>(s.lr * s.weight_decay));
  });
  REMAT_CUDA_LAUNCH_CHECK();
  param.storage()->bump_version();
}

void CudaBackend::adamw_update_all(const std::vector<AdamWTensors>& items) {
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
          adamw_chunk_kernel<T><<<blocks_for(chunk.start[chunk.count]), kThreads>>>(
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
      cast_kernel<From, To><<<blocks_for(n), kThreads>>>(x.data<From>(), y.data<To>(), n);
    });
  });
  REMAT_CUDA_LAUNCH_CHECK();
  return y;
}

}  // namespace remat
