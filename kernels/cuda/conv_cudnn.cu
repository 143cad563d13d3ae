// conv2d forward and backward on cuDNN. Algorithms come from cuDNN's heuristics filtered to the
// deterministic ones (the choice depends only on shapes, so a replay runs the same kernels); f32
// runs with FMA math only (no TF32) so results compare with the CPU. Bias and its gradient are
// own kernels.
#include <cudnn.h>

#include <array>
#include <mutex>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"

#define REMAT_CUDNN_CHECK(expr) REMAT_STATUS_CHECK(expr, CUDNN_STATUS_SUCCESS, cudnnGetErrorString)

namespace remat {

namespace {

using namespace cuda;

cudnnHandle_t cudnn_for(int device) {
  static std::mutex mutex;
  static std::array<cudnnHandle_t, 64> handles{};
  std::lock_guard lock(mutex);
  REMAT_CHECK(device >= 0 && device < 64, "cudnn: device index ", device, " out of range");
  if (!handles[device]) REMAT_CUDNN_CHECK(cudnnCreate(&handles[device]));
  return handles[device];
}

cudnnDataType_t cudnn_type(DType t) {
  switch (t) {
    case DType::f32: return CUDNN_DATA_FLOAT;
    case DType::f64: return CUDNN_DATA_DOUBLE;
    case DType::bf16: return CUDNN_DATA_BFLOAT16;
    default: REMAT_FAIL("conv2d: the cuda backend convolves f32, f64 or bf16, got ", dtype_name(t));
  }
}

// The descriptors of one convolution, created and destroyed together.
struct ConvDescriptors {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;

  ConvDescriptors(const Tensor& xt, const Tensor& wt, int stride, int padding) {
    cudnnDataType_t dt = cudnn_type(xt.dtype());
    auto i32 = [](int64_t v) { return static_cast<int>(v); };
    REMAT_CUDNN_CHECK(cudnnCreateTensorDescriptor(&x));
    REMAT_CUDNN_CHECK(cudnnCreateTensorDescriptor(&y));
    REMAT_CUDNN_CHECK(cudnnCreateFilterDescriptor(&w));
    REMAT_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv));
    REMAT_CUDNN_CHECK(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, dt, i32(xt.size(0)), i32(xt.size(1)),
                                                 i32(xt.size(2)), i32(xt.size(3))));
    REMAT_CUDNN_CHECK(cudnnSetFilter4dDescriptor(w, dt, CUDNN_TENSOR_NCHW, i32(wt.size(0)), i32(wt.size(1)),
                                                 i32(wt.size(2)), i32(wt.size(3))));
    cudnnDataType_t compute = xt.dtype() == DType::f64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    REMAT_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(conv, padding, padding, stride, stride, 1, 1,
                                                      CUDNN_CROSS_CORRELATION, compute));
    REMAT_CUDNN_CHECK(cudnnSetConvolutionMathType(conv, xt.dtype() == DType::bf16 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH));
    int n, c, h, wd;
    REMAT_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(conv, x, w, &n, &c, &h, &wd));
    REMAT_CUDNN_CHECK(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, dt, n, c, h, wd));
  }
  ~ConvDescriptors() {
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (y) cudnnDestroyTensorDescriptor(y);
    if (x) cudnnDestroyTensorDescriptor(x);
  }
  ConvDescriptors(const ConvDescriptors&) = delete;
  ConvDescriptors& operator=(const ConvDescriptors&) = delete;
};

// The first algorithm of cuDNN's ranked list that is deterministic and usable.
template <typename Perf, typename Query>
auto pick_deterministic(Query query, const char* what) {
  constexpr int kMax = 16;
  std::array<Perf, kMax> perf{};
  int found = 0;
  REMAT_CUDNN_CHECK(query(kMax, &found, perf.data()));
  for (int i = 0; i < found; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC) return perf[i].algo;
  REMAT_FAIL("conv2d: cuDNN offers no deterministic ", what, " algorithm for this shape");
}

Tensor workspace_bytes(size_t bytes, Device device) {
  MemoryCategoryScope scope(MemoryCategory::workspace);
  return Tensor::empty({static_cast<int64_t>(bytes)}, DType::u8, device);
}

// alpha = 1, beta = 0 in the scaling type cuDNN expects for the data type.
struct Scaling {
  float f1 = 1, f0 = 0;
  double d1 = 1, d0 = 0;
  bool is64;
  explicit Scaling(DType t) : is64(t == DType::f64) {}
  const void* one() const { return is64 ? static_cast<const void*>(&d1) : &f1; }
  const void* zero() const { return is64 ? static_cast<const void*>(&d0) : &f0; }
};

template <typename T>
__global__ void add_channel_bias_kernel(T* y, const T* b, int64_t total, int64_t c, int64_t hw) {
  REMAT_GRID_STRIDE(i, total) y[i] = cast_to<T>(load(y, i) + load(b, (i / hw) % c));
}

// One block per output channel: db[o] = sum over images and positions of dy.
template <typename T>
__global__ void channel_sum_kernel(const T* dy, T* db, int64_t n, int64_t c, int64_t hw) {
  REMAT_REDUCE_SCRATCH(Acc<T>, scratch);
  Acc<T> s = 0;
  for (int64_t j = threadIdx.x; j < n * hw; j += blockDim.x) s += load(dy, ((j / hw) * c + blockIdx.x) * hw + j % hw);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) db[blockIdx.x] = cast_to<T>(s);
}

}  // namespace

Tensor CudaBackend::conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) {
  set_device_of(x);
  cudnnHandle_t h = cudnn_for(x.device().index);
  ConvDescriptors d(x, w, stride, padding);
  int64_t ho = (x.size(2) + 2 * padding - w.size(2)) / stride + 1, wo = (x.size(3) + 2 * padding - w.size(3)) / stride + 1;
  Tensor y = Tensor::empty({x.size(0), w.size(0), ho, wo}, x.dtype(), x.device());
  auto algo = pick_deterministic<cudnnConvolutionFwdAlgoPerf_t>(
      [&](int max, int* found, cudnnConvolutionFwdAlgoPerf_t* perf) {
        return cudnnGetConvolutionForwardAlgorithm_v7(h, d.x, d.w, d.conv, d.y, max, found, perf);
      },
      "forward");
  size_t bytes = 0;
  REMAT_CUDNN_CHECK(cudnnGetConvolutionForwardWorkspaceSize(h, d.x, d.w, d.conv, d.y, algo, &bytes));
  Tensor ws = workspace_bytes(bytes, x.device());
  Scaling s(x.dtype());
  REMAT_CUDNN_CHECK(cudnnConvolutionForward(h, s.one(), d.x, x.raw_data(), d.w, w.raw_data(), d.conv, algo,
                                            bytes ? ws.raw_data() : nullptr, bytes, s.zero(), d.y, y.raw_data()));
  if (b.defined()) {
    int64_t total = y.numel();
    dispatch(x.dtype(), "conv2d", [&]<typename T>() {
      add_channel_bias_kernel<T><<<blocks_for(total), kThreads>>>(y.data<T>(), b.data<T>(), total, w.size(0), ho * wo);
    });
    REMAT_CUDA_LAUNCH_CHECK();
  }
  return y;
}

std::vector<Tensor> CudaBackend::conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                                 int padding, bool has_bias) {
  set_device_of(x);
  cudnnHandle_t h = cudnn_for(x.device().index);
  ConvDescriptors d(x, w, stride, padding);
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device()), dw = Tensor::empty(w.shape(), x.dtype(), x.device());
  Scaling s(x.dtype());
  auto data_algo = pick_deterministic<cudnnConvolutionBwdDataAlgoPerf_t>(
      [&](int max, int* found, cudnnConvolutionBwdDataAlgoPerf_t* perf) {
        return cudnnGetConvolutionBackwardDataAlgorithm_v7(h, d.w, d.y, d.conv, d.x, max, found, perf);
      },
      "backward-data");
  size_t bytes = 0;
  REMAT_CUDNN_CHECK(cudnnGetConvolutionBackwardDataWorkspaceSize(h, d.w, d.y, d.conv, d.x, data_algo, &bytes));
  {
    Tensor ws = workspace_bytes(bytes, x.device());
    REMAT_CUDNN_CHECK(cudnnConvolutionBackwardData(h, s.one(), d.w, w.raw_data(), d.y, dy.raw_data(), d.conv, data_algo,
                                                   bytes ? ws.raw_data() : nullptr, bytes, s.zero(), d.x, dx.raw_data()));
  }
  auto filter_algo = pick_deterministic<cudnnConvolutionBwdFilterAlgoPerf_t>(
      [&](int max, int* found, cudnnConvolutionBwdFilterAlgoPerf_t* perf) {
        return cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, d.x, d.y, d.conv, d.w, max, found, perf);
      },
      "backward-filter");
  REMAT_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterWorkspaceSize(h, d.x, d.y, d.conv, d.w, filter_algo, &bytes));
  {
    Tensor ws = workspace_bytes(bytes, x.device());
    REMAT_CUDNN_CHECK(cudnnConvolutionBackwardFilter(h, s.one(), d.x, x.raw_data(), d.y, dy.raw_data(), d.conv,
                                                     filter_algo, bytes ? ws.raw_data() : nullptr, bytes, s.zero(),
                                                     d.w, dw.raw_data()));
  }
  Tensor db;
  if (has_bias) {
    int64_t n = dy.size(0), c = dy.size(1), hw = dy.size(2) * dy.size(3);
    db = Tensor::empty({c}, x.dtype(), x.device());
    dispatch(x.dtype(), "conv2d_backward", [&]<typename T>() {
      channel_sum_kernel<T><<<static_cast<unsigned>(c), kThreads>>>(dy.data<T>(), db.data<T>(), n, c, hw);
    });
    REMAT_CUDA_LAUNCH_CHECK();
  }
  return {dx, dw, db};
}

}  // namespace remat
