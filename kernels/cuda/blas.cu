// CUDA GEMM through cuBLAS: batched matmul with transposed operands, a GEMM into (or added to) a
// given tensor, linear (GEMM + bias, or cuBLASLt's bias epilogue when set_cuda_bias_epilogue asks
// for it: blas_lt.cpp), and linear's dW and db (one cuBLASLt call when set_cuda_bias_grad_epilogue
// asks for it).
// Row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T, which is the
// same memory. One handle per device with a fixed workspace: with a single stream this makes
// cuBLAS pick the same kernels every call, so replays reproduce bits.
#include <cublas_v2.h>

#include <array>
#include <mutex>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_common.cuh"
#include "kernels/cuda/elementwise_kernels.cuh"
#include "kernels/cuda/gemm.h"
#include "runtime/cuda_devices.h"

#define REMAT_CUBLAS_CHECK(expr) REMAT_STATUS_CHECK(expr, CUBLAS_STATUS_SUCCESS, cublasGetStatusString)

namespace remat {

namespace {

using namespace cuda;
using cuda::elementwise_kernels::add_bias_kernel;

constexpr size_t kCublasWorkspace = 32u << 20;  // cuBLAS's recommendation for Hopper

struct DeviceGemm {
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;
};

DeviceGemm& gemm_of(int device) {
  static std::mutex mutex;
  static std::array<DeviceGemm, 64> devices{};
  std::lock_guard lock(mutex);
  REMAT_CHECK(device >= 0 && device < 64, "cublas: device index ", device, " out of range");
  DeviceGemm& d = devices[device];
  if (!d.handle) {
    REMAT_CUBLAS_CHECK(cublasCreate(&d.handle));
    // The workspace lives as long as the process and is counted under `workspace`.
    d.workspace = allocator_for(Device::cuda(device)).allocate(kCublasWorkspace, MemoryCategory::workspace);
    REMAT_CUBLAS_CHECK(cublasSetWorkspace(d.handle, d.workspace, kCublasWorkspace));
    // No TF32 unless asked for (set_cuda_tf32, per GEMM below): f32 GEMMs stay f32 so that
    // results compare with the CPU.
    REMAT_CUBLAS_CHECK(cublasSetMathMode(d.handle, CUBLAS_DEFAULT_MATH));
  }
  return d;
}

cublasHandle_t handle_for(int device) { return gemm_of(device).handle; }

int checked_int(int64_t v, const char* what) {
  REMAT_CHECK(v >= 0 && v <= INT32_MAX, "cublas: ", what, " = ", v, " exceeds the 32-bit range of cuBLAS");
  return static_cast<int>(v);
}

}  // namespace

namespace cuda {

GemmWorkspace gemm_workspace(int device) { return {gemm_of(device).workspace, kCublasWorkspace}; }

void run_gemm(const Gemm& g, DType dtype, int device) { run_gemm_into(g, dtype, dtype, 1.0, device); }

void run_gemm_into(const Gemm& g, DType dtype, DType c_dtype, double alpha_value, int device, double beta_value) {
  REMAT_CHECK(c_dtype == dtype || (dtype == DType::bf16 && c_dtype == DType::f32), "matmul: the cuda backend writes ",
              dtype_name(dtype), " products as ", dtype_name(dtype), dtype == DType::bf16 ? " or f32" : "", ", not ",
              dtype_name(c_dtype));
  cublasHandle_t h = handle_for(device);
  cudaDataType_t type;
  cublasComputeType_t compute;
  float alpha32 = static_cast<float>(alpha_value), beta32 = static_cast<float>(beta_value);
  double alpha64 = alpha_value, beta64 = beta_value;
  const void *alpha = &alpha32, *beta = &beta32;
  switch (dtype) {
    case DType::f32:
      type = CUDA_R_32F, compute = cuda_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      break;
    case DType::f64: type = CUDA_R_64F, compute = CUBLAS_COMPUTE_64F, alpha = &alpha64, beta = &beta64; break;
    case DType::bf16: type = CUDA_R_16BF, compute = CUBLAS_COMPUTE_32F; break;
    default: REMAT_FAIL("matmul: the cuda backend multiplies f32, f64 or bf16, got ", dtype_name(dtype));
  }
  const cudaDataType_t c_type = c_dtype == dtype ? type : CUDA_R_32F;
  cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  REMAT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, op_b, op_a, checked_int(g.n, "n"), checked_int(g.m, "m"), checked_int(g.k, "k"), alpha, g.b, type,
      checked_int(g.ldb, "ldb"), g.stride_b, g.a, type, checked_int(g.lda, "lda"), g.stride_a, beta, g.c, c_type,
      checked_int(g.n, "ldc"), g.stride_c, checked_int(g.batch, "batch"), compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda

Tensor CudaBackend::matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  set_device_of(a);
  int64_t ra = a.size(-2), ca = a.size(-1), rb = b.size(-2), cb = b.size(-1);
  int64_t m = trans_a ? ca : ra, n = trans_b ? rb : cb, k = trans_a ? ra : ca;
  Shape out_shape(a.shape().begin(), a.shape().end() - 2);
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  int64_t batch = ra * ca == 0 ? 0 : a.numel() / (ra * ca);
  if (out.numel() == 0) return out;
  if (k == 0) {
    REMAT_CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, out.nbytes()));
    return out;
  }
  bool shared_b = b.dim() == 2;
  if (shared_b && !trans_a) {
    // [batch * m, k] @ op(b): one GEMM with the batch folded into the rows (linear's dx, a tied
    // head), rather than `batch` GEMMs of m rows each.
    run_gemm({false, trans_b, batch * m, n, k, a.raw_data(), ca, 0, b.raw_data(), cb, 0, out.raw_data(), 0, 1},
             a.dtype(), a.device().index);
    return out;
  }
  run_gemm({trans_a, trans_b, m, n, k, a.raw_data(), ca, ra * ca, b.raw_data(), cb, shared_b ? 0 : rb * cb,
            out.raw_data(), m * n, batch},
           a.dtype(), a.device().index);
  return out;
}

void CudaBackend::matmul_into(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
                              bool accumulate) {
  set_device_of(a);
  REMAT_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && b.dtype() == a.dtype() && c.device() == a.device(),
              "matmul_into: expected 2-D a, b and c on one device, a and b of one dtype, got ", a.meta_str(), ", ",
              b.meta_str(), " and ", c.meta_str());
  int64_t ra = a.size(0), ca = a.size(1), cb = b.size(1);
  int64_t m = trans_a ? ca : ra, n = trans_b ? b.size(0) : cb, k = trans_a ? ra : ca;
  REMAT_CHECK(c.size(0) == m && c.size(1) == n, "matmul_into: expected c [", m, ", ", n, "], got ", c.meta_str());
  if (c.numel() == 0) return;
  if (k == 0) {
    if (!accumulate) REMAT_CUDA_CHECK(cudaMemsetAsync(c.raw_data(), 0, c.nbytes()));
    return;
  }
  run_gemm_into({trans_a, trans_b, m, n, k, a.raw_data(), ca, 0, b.raw_data(), cb, 0, c.raw_data(), 0, 1}, a.dtype(),
                c.dtype(), 1.0, a.device().index, accumulate ? 1.0 : 0.0);
  c.storage()->bump_version();
}

Tensor CudaBackend::linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  set_device_of(x);
  int64_t in = x.size(-1), rows = in == 0 ? 0 : x.numel() / in, out_features = w.size(0);
  Shape out_shape = x.shape();
  out_shape.back() = out_features;
  Tensor y = Tensor::empty(out_shape, x.dtype(), x.device());
  if (y.numel() == 0) return y;
  if (in > 0 && b.defined() && cuda_bias_epilogue() &&
      linear_bias_epilogue(x.raw_data(), w.raw_data(), b.raw_data(), y.raw_data(), rows, in, out_features, x.dtype(),
                           x.device().index)) {
    count_cuda_bias_epilogue_call();
    return y;
  }
  if (in == 0) {
    REMAT_CUDA_CHECK(cudaMemsetAsync(y.raw_data(), 0, y.nbytes()));
  } else {
    // y[R, O] = x[R, I] W[O, I]^T
    run_gemm({false, true, rows, out_features, in, x.raw_data(), in, 0, w.raw_data(), in, 0, y.raw_data(), 0, 1},
             x.dtype(), x.device().index);
  }
  if (b.defined()) {
    int64_t n = rows * out_features;
    dispatch(x.dtype(), "linear", [&]<typename T>() {
      REMAT_LAUNCH(blocks_for(n), kThreads, 0, add_bias_kernel<T>)(y.data<T>(), b.data<T>(), rows, out_features);
    });
    REMAT_CUDA_LAUNCH_CHECK();
  }
  return y;
}

std::pair<Tensor, Tensor> CudaBackend::linear_weight_bias_grads(const Tensor& dy, const Tensor& x) {
  const int64_t rows = dy.size(0), in = x.size(1), out = dy.size(1);
  if (rows > 0 && in > 0 && out > 0 && cuda_bias_grad_epilogue()) {
    set_device_of(x);
    Tensor dw = Tensor::empty({out, in}, DType::f32, x.device()), db = Tensor::empty({out}, DType::f32, x.device());
    if (cuda::linear_weight_bias_grads(dy.raw_data(), x.raw_data(), dw.raw_data(), db.raw_data(), rows, in, out,
                                       x.dtype(), DType::f32, x.device().index)) {
      count_cuda_bias_grad_epilogue_call();
      return {dw, db};
    }
  }
  return Backend::linear_weight_bias_grads(dy, x);
}

}  // namespace remat
