// conv2d forward and backward on cuDNN. Algorithms come from cuDNN's heuristics filtered to the
// deterministic ones (the choice depends only on shapes, so a replay runs the same kernels); f32
// runs with FMA math only (no TF32) so results compare with the CPU. Where cuDNN has no such
// algorithm or does not support the case (f64 on some versions), the caller falls back to the
// im2col path (conv_gemm.cu), saying so once.
#include <array>
#include <cstdio>
#include <mutex>
#include <set>
#include <string>

#include "kernels/cuda/conv.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/cudnn_handle.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

using namespace cuda;

// Why cuDNN declined a convolution; thrown inside this file only, and turned into a fallback.
struct Declined {
  std::string why;
};

// cuDNN 9 groups its statuses by thousands: 2xxx bad parameter, 3xxx not supported. Both mean
// "not this way" for a valid convolution (the op has checked the shapes); anything else is an error.
void check_supported(cudnnStatus_t status, const char* call) {
  if (status == CUDNN_STATUS_SUCCESS) return;
  int group = static_cast<int>(status) / 1000;
  if (group == 2 || group == 3) throw Declined{std::string(call) + ": " + cudnnGetErrorString(status)};
  REMAT_CUDNN_CHECK(status);
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

  ConvDescriptors() {
    REMAT_CUDNN_CHECK(cudnnCreateTensorDescriptor(&x));
    REMAT_CUDNN_CHECK(cudnnCreateTensorDescriptor(&y));
    REMAT_CUDNN_CHECK(cudnnCreateFilterDescriptor(&w));
    REMAT_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv));
  }
  // Separate from construction, so that a decline still destroys the descriptors.
  void configure(const Tensor& xt, const Tensor& wt, int stride, int padding) {
    cudnnDataType_t dt = cudnn_type(xt.dtype());
    auto i32 = [](int64_t v) { return static_cast<int>(v); };
    check_supported(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, dt, i32(xt.size(0)), i32(xt.size(1)),
                                               i32(xt.size(2)), i32(xt.size(3))),
                    "input descriptor");
    check_supported(cudnnSetFilter4dDescriptor(w, dt, CUDNN_TENSOR_NCHW, i32(wt.size(0)), i32(wt.size(1)),
                                               i32(wt.size(2)), i32(wt.size(3))),
                    "filter descriptor");
    cudnnDataType_t compute = xt.dtype() == DType::f64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    check_supported(cudnnSetConvolution2dDescriptor(conv, padding, padding, stride, stride, 1, 1,
                                                    CUDNN_CROSS_CORRELATION, compute),
                    "convolution descriptor");
    check_supported(cudnnSetConvolutionMathType(conv, xt.dtype() == DType::bf16 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH),
                    "math type");
    int n, c, h, wd;
    check_supported(cudnnGetConvolution2dForwardOutputDim(conv, x, w, &n, &c, &h, &wd), "output size");
    check_supported(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, dt, n, c, h, wd), "output descriptor");
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
  check_supported(query(kMax, &found, perf.data()), what);
  for (int i = 0; i < found; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC) return perf[i].algo;
  throw Declined{std::string("no deterministic ") + what + " algorithm"};
}

Tensor workspace_bytes(size_t bytes, Device device) {
  return empty_workspace({static_cast<int64_t>(bytes)}, DType::u8, device);
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

// One line on stderr the first time cuDNN declines a kind of convolution, so that a run says
// which path its convolutions took.
void note_fallback(const char* pass, const Tensor& x, const Tensor& w, const std::string& why) {
  static std::mutex mutex;
  static std::set<std::string> said;
  std::string key = std::string(pass) + " " + dtype_name(x.dtype()) + ": " + why;
  std::lock_guard lock(mutex);
  if (said.insert(key).second)
    std::fprintf(stderr, "remat: cuDNN declined conv2d %s (x %s, w %s): %s; using im2col + cuBLAS\n", pass,
                 x.meta_str().c_str(), shape_str(w.shape()).c_str(), why.c_str());
}

}  // namespace

namespace cuda {

std::optional<Tensor> conv2d_cudnn(const Tensor& x, const Tensor& w, int stride, int padding) {
  try {
    cudnnHandle_t h = cudnn_handle(x.device().index);
    ConvDescriptors d;
    d.configure(x, w, stride, padding);
    int64_t ho = (x.size(2) + 2 * padding - w.size(2)) / stride + 1, wo = (x.size(3) + 2 * padding - w.size(3)) / stride + 1;
    auto algo = pick_deterministic<cudnnConvolutionFwdAlgoPerf_t>(
        [&](int max, int* found, cudnnConvolutionFwdAlgoPerf_t* perf) {
          return cudnnGetConvolutionForwardAlgorithm_v7(h, d.x, d.w, d.conv, d.y, max, found, perf);
        },
        "forward");
    size_t bytes = 0;
    check_supported(cudnnGetConvolutionForwardWorkspaceSize(h, d.x, d.w, d.conv, d.y, algo, &bytes), "forward workspace");
    Tensor y = Tensor::empty({x.size(0), w.size(0), ho, wo}, x.dtype(), x.device());
    Tensor ws = workspace_bytes(bytes, x.device());
    Scaling s(x.dtype());
    check_supported(cudnnConvolutionForward(h, s.one(), d.x, x.raw_data(), d.w, w.raw_data(), d.conv, algo,
                                            bytes ? ws.raw_data() : nullptr, bytes, s.zero(), d.y, y.raw_data()),
                    "forward");
    return y;
  } catch (const Declined& declined) {
    note_fallback("forward", x, w, declined.why);
    return std::nullopt;
  }
}

std::optional<std::pair<Tensor, Tensor>> conv2d_backward_cudnn(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                               int stride, int padding) {
  try {
    cudnnHandle_t h = cudnn_handle(x.device().index);
    ConvDescriptors d;
    d.configure(x, w, stride, padding);
    Scaling s(x.dtype());
    // Both algorithms first: a decline must come before anything is computed.
    auto data_algo = pick_deterministic<cudnnConvolutionBwdDataAlgoPerf_t>(
        [&](int max, int* found, cudnnConvolutionBwdDataAlgoPerf_t* perf) {
          return cudnnGetConvolutionBackwardDataAlgorithm_v7(h, d.w, d.y, d.conv, d.x, max, found, perf);
        },
        "backward-data");
    auto filter_algo = pick_deterministic<cudnnConvolutionBwdFilterAlgoPerf_t>(
        [&](int max, int* found, cudnnConvolutionBwdFilterAlgoPerf_t* perf) {
          return cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, d.x, d.y, d.conv, d.w, max, found, perf);
        },
        "backward-filter");
    size_t data_bytes = 0, filter_bytes = 0;
    check_supported(cudnnGetConvolutionBackwardDataWorkspaceSize(h, d.w, d.y, d.conv, d.x, data_algo, &data_bytes),
                    "backward-data workspace");
    check_supported(cudnnGetConvolutionBackwardFilterWorkspaceSize(h, d.x, d.y, d.conv, d.w, filter_algo, &filter_bytes),
                    "backward-filter workspace");
    Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device()), dw = Tensor::empty(w.shape(), x.dtype(), x.device());
    {
      Tensor ws = workspace_bytes(data_bytes, x.device());
      check_supported(cudnnConvolutionBackwardData(h, s.one(), d.w, w.raw_data(), d.y, dy.raw_data(), d.conv, data_algo,
                                                   data_bytes ? ws.raw_data() : nullptr, data_bytes, s.zero(), d.x,
                                                   dx.raw_data()),
                      "backward-data");
    }
    {
      Tensor ws = workspace_bytes(filter_bytes, x.device());
      check_supported(cudnnConvolutionBackwardFilter(h, s.one(), d.x, x.raw_data(), d.y, dy.raw_data(), d.conv,
                                                     filter_algo, filter_bytes ? ws.raw_data() : nullptr, filter_bytes,
                                                     s.zero(), d.w, dw.raw_data()),
                      "backward-filter");
    }
    return std::make_pair(dx, dw);
  } catch (const Declined& declined) {
    note_fallback("backward", x, w, declined.why);
    return std::nullopt;
  }
}

}  // namespace cuda

}  // namespace remat
