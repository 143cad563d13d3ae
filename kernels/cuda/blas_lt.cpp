// linear with its bias in cuBLASLt's epilogue (set_cuda_bias_epilogue): one GEMM call adds the bias
// to the f32 accumulator before the one rounding to y's dtype, where the plain path writes y and
// then reads and writes it again in a bias kernel. Row-major y = x W^T + b is the column-major
// y^T[out, rows] = op(W)[out, in] x^T[in, rows] with op = transpose, and the bias runs down D's rows.
#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>

#include "kernels/cuda/gemm.h"
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda_devices.h"

#define REMAT_CUBLASLT_CHECK(expr) REMAT_STATUS_CHECK(expr, CUBLAS_STATUS_SUCCESS, cublasLtGetStatusString)

namespace remat::cuda {

namespace {

cublasLtHandle_t lt_handle(int device) {
  static std::mutex mutex;
  static std::array<cublasLtHandle_t, 64> handles{};
  std::lock_guard lock(mutex);
  REMAT_CHECK(device >= 0 && device < 64, "cublasLt: device index ", device, " out of range");
  if (!handles[device]) REMAT_CUBLASLT_CHECK(cublasLtCreate(&handles[device]));  // lives for the process
  return handles[device];
}

// A cuBLASLt descriptor destroyed with its scope.
template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
struct Owned {
  Handle h = nullptr;
  Owned() = default;
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (h) Destroy(h);
  }
};
using Desc = Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

template <typename Handle, typename Attribute, typename Value>
void set(cublasStatus_t (*setter)(Handle, Attribute, const void*, size_t), Handle h, Attribute a, const Value& v) {
  REMAT_CUBLASLT_CHECK(setter(h, a, &v, sizeof v));
}

// The largest power of two up to 256 that divides the address: the heuristic assumes 256 unless
// told less, and an algorithm chosen for aligned pointers may not run on others.
uint32_t alignment_of(const void* p) {
  auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

// What decides the algorithm; calls that agree on it run the same kernel.
using Key = std::array<int64_t, 10>;

}  // namespace

bool linear_bias_epilogue(const void* x, const void* w, const void* b, void* y, int64_t rows, int64_t in, int64_t out,
                          DType dtype, int device) {
  if (dtype != DType::f32 && dtype != DType::bf16) return false;
  const bool tf32 = dtype == DType::f32 && cuda_tf32();
  const cudaDataType_t type = dtype == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const uint32_t align_w = alignment_of(w), align_x = alignment_of(x), align_y = alignment_of(y);
  const Key key{device, static_cast<int64_t>(dtype), tf32, rows, in, out, align_w, align_x, align_y, alignment_of(b)};

  cublasLtHandle_t handle = lt_handle(device);
  Desc desc;
  REMAT_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.h, compute, CUDA_R_32F));
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_TRANSA, int32_t{CUBLAS_OP_T});
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_TRANSB, int32_t{CUBLAS_OP_N});
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t{CUBLASLT_EPILOGUE_BIAS});
  // The bias's dtype is y's (cuBLASLt's default); its address also tells the heuristic its alignment.
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, b);
  Layout a_layout, b_layout, d_layout;  // column-major: W^T's storage is [in, out], x^T's [in, rows]
  REMAT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&a_layout.h, type, in, out, in));
  REMAT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&b_layout.h, type, in, rows, in));
  REMAT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d_layout.h, type, out, rows, out));

  static std::mutex mutex;
  static std::map<Key, std::optional<cublasLtMatmulAlgo_t>> algorithms;  // nullopt: none offered
  std::optional<cublasLtMatmulAlgo_t> algo;
  const GemmWorkspace workspace = gemm_workspace(device);
  {
    std::lock_guard lock(mutex);
    auto found = algorithms.find(key);
    if (found != algorithms.end()) {
      algo = found->second;
    } else {
      Preference pref;
      REMAT_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace.bytes);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_y);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_y);
      cublasLtMatmulHeuristicResult_t result{};
      int count = 0;
      cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, desc.h, a_layout.h, b_layout.h, d_layout.h,
                                                             d_layout.h, pref.h, 1, &result, &count);
      // No algorithm is an answer (the caller takes the plain path), not an error.
      if (status == CUBLAS_STATUS_SUCCESS && count > 0 && result.state == CUBLAS_STATUS_SUCCESS &&
          result.workspaceSize <= workspace.bytes)
        algo = result.algo;
      else
        REMAT_CHECK(status == CUBLAS_STATUS_SUCCESS || status == CUBLAS_STATUS_NOT_SUPPORTED,
                    "cublasLt: the heuristic for linear [", rows, ", ", in, "] -> ", out, " in ", dtype_name(dtype),
                    " failed: ", cublasLtGetStatusString(status));
      algorithms.emplace(key, algo);
    }
  }
  if (!algo) return false;
  const float alpha = 1, beta = 0;
  REMAT_CUBLASLT_CHECK(cublasLtMatmul(handle, desc.h, &alpha, w, a_layout.h, x, b_layout.h, &beta, y, d_layout.h, y,
                                      d_layout.h, &*algo, workspace.data, workspace.bytes, /*stream=*/0));
  return true;
}

}  // namespace remat::cuda
