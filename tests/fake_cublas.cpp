// The cuBLAS calls of the emulated CUDA part (tests/simt_launch.h), over the simulated runtime:
// a strided batched GEMM queued on the current device's compute stream, computed in the compute
// type in k order (so not cuBLAS's bits: parity with the CPU is within rounding, as on a GPU).
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "fake_cuda_runtime.h"

struct cublasContext {
  int device = 0;
};

namespace {

double load(const void* base, cudaDataType type, long long i) {
  switch (type) {
    case CUDA_R_32F: return static_cast<const float*>(base)[i];
    case CUDA_R_64F: return static_cast<const double*>(base)[i];
    case CUDA_R_16BF: return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]));
    default: return 0;
  }
}

void store(void* base, cudaDataType type, long long i, double v) {
  switch (type) {
    case CUDA_R_32F: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case CUDA_R_64F: static_cast<double*>(base)[i] = v; break;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16(static_cast<float>(v)); break;
    default: break;
  }
}

// An f32 input as the TF32 tensor cores read it: 10 mantissa bits, rounded to nearest.
float to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

bool simulated(cudaDataType t) { return t == CUDA_R_32F || t == CUDA_R_64F || t == CUDA_R_16BF; }

// C = alpha op(A) op(B) + beta C, column-major, each product summed in Acc in k order: op(A)'s rows
// and op(B)'s columns are first gathered into contiguous arrays of Acc.
template <typename Acc>
void gemm(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, double alpha, const void* A,
          cudaDataType Atype, int lda, long long strideA, const void* B, cudaDataType Btype, int ldb,
          long long strideB, double beta, void* C, cudaDataType Ctype, int ldc, long long strideC, int batch,
          bool tf32) {
  std::vector<Acc> rows(static_cast<size_t>(m) * k), cols(static_cast<size_t>(n) * k);
  auto input = [&](const void* base, cudaDataType type, long long at) {
    Acc v = static_cast<Acc>(load(base, type, at));
    if constexpr (std::is_same_v<Acc, float>) v = tf32 ? to_tf32(v) : v;
    return v;
  };
  for (int p = 0; p < batch; ++p) {
    for (int i = 0; i < m; ++i)
      for (int l = 0; l < k; ++l)
        rows[size_t(i) * k + l] =
            input(A, Atype, p * strideA + (transa == CUBLAS_OP_N ? i + l * (long long)lda : l + i * (long long)lda));
    for (int j = 0; j < n; ++j)
      for (int l = 0; l < k; ++l)
        cols[size_t(j) * k + l] =
            input(B, Btype, p * strideB + (transb == CUBLAS_OP_N ? l + j * (long long)ldb : j + l * (long long)ldb));
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        const Acc* r = &rows[size_t(i) * k];
        const Acc* c = &cols[size_t(j) * k];
        Acc acc = 0;
        for (int l = 0; l < k; ++l) acc += r[l] * c[l];
        double v = alpha * static_cast<double>(acc);
        long long at = p * strideC + i + j * (long long)ldc;
        if (beta != 0) v += beta * load(C, Ctype, at);
        store(C, Ctype, at, v);
      }
  }
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  int device = 0;
  cudaGetDevice(&device);
  *handle = new cublasContext{device};  // handles live for the process, as remat's do
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }

cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }

const char* cublasGetStatusString(cublasStatus_t status) {
  return status == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "a cuBLAS error (fake_cublas)";
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long strideC, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t) {
  int device = 0;
  cudaGetDevice(&device);
  bool wide = compute == CUBLAS_COMPUTE_64F, tf32 = compute == CUBLAS_COMPUTE_32F_FAST_TF32;
  // What cuBLAS would refuse: a handle of another device, dimensions out of range, leading
  // dimensions shorter than the rows they hold (column-major).
  if (handle->device != device || m < 0 || n < 0 || k < 0 || batch < 0 || !simulated(Atype) || !simulated(Btype) ||
      !simulated(Ctype) || ldc < std::max(1, m) || lda < std::max(1, transa == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, transb == CUBLAS_OP_N ? k : n))
    return CUBLAS_STATUS_INVALID_VALUE;
  double a_scale = wide ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  double b_scale = wide ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  const unsigned one[3] = {1, 1, 1};
  static const char gemm_kernel = 0;  // the launch's key: this fake's one "kernel"
  fake_cuda::launch(&gemm_kernel, one, one, 0, [=] {
    if (wide) gemm<double>(transa, transb, m, n, k, a_scale, A, Atype, lda, strideA, B, Btype, ldb, strideB, b_scale,
                           C, Ctype, ldc, strideC, batch, false);
    else gemm<float>(transa, transb, m, n, k, a_scale, A, Atype, lda, strideA, B, Btype, ldb, strideB, b_scale, C,
                     Ctype, ldc, strideC, batch, tf32);
  });
  return cudaGetLastError() == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"
