// linear's GEMMs through cuBLASLt where an epilogue saves a pass over memory: the forward with its
// bias added in the epilogue (set_cuda_bias_epilogue), one rounding to y's dtype where the plain
// path writes y and then reads and writes it again in a bias kernel; and the backward's dW with
// the BGRADB epilogue summing dy's columns into db as the GEMM reads them
// (set_cuda_bias_grad_epilogue). Row-major matrices are cuBLASLt's column-major transposes:
// y = x W^T + b is y^T[out, rows] = op(W)[out, in] x^T[in, rows] with op = transpose, the bias
// running down D's rows; dW = dy^T x is dW^T[in, out] = x^T[in, rows] op(dy^T)[rows, out], and
// BGRADB sums B = op(dy^T) over k (the rows) into one value per column of D, db[out].
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

// One cuBLASLt matmul D = op(A) op(B) (column-major, each matrix's leading dimension its rows as
// stored) with an epilogue that reads or writes `bias`.
struct LtCall {
  cublasOperation_t trans_a, trans_b;
  cublasLtEpilogue_t epilogue;
  int64_t m, n, k;  // D is [m, n]
  const void* a;
  const void* b;
  void* d;
  void* bias;
  DType dtype, d_dtype;  // A's and B's, and D's (and the bias's)
};

cudaDataType_t lt_type(DType dtype) { return dtype == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

// Runs the call and returns true, or returns false with nothing queued where cuBLASLt offers no
// algorithm for it. The algorithm is chosen once per problem (shapes, dtypes, epilogue, pointer
// alignments) and kept: every call of a problem (a replay) runs the same kernel.
bool lt_matmul(const LtCall& call, int device) {
  const bool tf32 = call.dtype == DType::f32 && cuda_tf32();
  const cudaDataType_t type = lt_type(call.dtype), d_type = lt_type(call.d_dtype);
  const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const uint32_t align_a = alignment_of(call.a), align_b = alignment_of(call.b), align_d = alignment_of(call.d);
  using Key = std::array<int64_t, 14>;  // what decides the algorithm; calls that agree on it run the same kernel
  const Key key{device, static_cast<int64_t>(call.dtype), static_cast<int64_t>(call.d_dtype), tf32,
                call.trans_a, call.trans_b, call.epilogue, call.m, call.n, call.k, align_a, align_b, align_d,
                alignment_of(call.bias)};

  cublasLtHandle_t handle = lt_handle(device);
  Desc desc;
  REMAT_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc.h, compute, CUDA_R_32F));
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_TRANSA, int32_t{call.trans_a});
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_TRANSB, int32_t{call.trans_b});
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t{call.epilogue});
  // The bias's dtype is D's (cuBLASLt's default); its address also tells the heuristic its alignment.
  set(cublasLtMatmulDescSetAttribute, desc.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(call.bias));
  const bool ta = call.trans_a == CUBLAS_OP_T, tb = call.trans_b == CUBLAS_OP_T;
  Layout a_layout, b_layout, d_layout;
  REMAT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&a_layout.h, type, ta ? call.k : call.m, ta ? call.m : call.k,
                                                  ta ? call.k : call.m));
  REMAT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&b_layout.h, type, tb ? call.n : call.k, tb ? call.k : call.n,
                                                  tb ? call.n : call.k));
  REMAT_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&d_layout.h, d_type, call.m, call.n, call.m));

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
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
      set(cublasLtMatmulPreferenceSetAttribute, pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
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
                    "cublasLt: the heuristic for a [", call.m, ", ", call.k, "] x [", call.k, ", ", call.n,
                    "] product in ", dtype_name(call.dtype), " with epilogue ", int{call.epilogue},
                    " failed: ", cublasLtGetStatusString(status));
      algorithms.emplace(key, algo);
    }
  }
  if (!algo) return false;
  const float alpha = 1, beta = 0;
  REMAT_CUBLASLT_CHECK(cublasLtMatmul(handle, desc.h, &alpha, call.a, a_layout.h, call.b, b_layout.h, &beta, call.d,
                                      d_layout.h, call.d, d_layout.h, &*algo, workspace.data, workspace.bytes,
                                      /*stream=*/0));
  return true;
}

}  // namespace

bool linear_bias_epilogue(const void* x, const void* w, const void* b, void* y, int64_t rows, int64_t in, int64_t out,
                          DType dtype, int device) {
  if (dtype != DType::f32 && dtype != DType::bf16) return false;
  // y^T[out, rows] = (W^T stored [in, out])^T x^T[in, rows]
  return lt_matmul({CUBLAS_OP_T, CUBLAS_OP_N, CUBLASLT_EPILOGUE_BIAS, out, rows, in, w, x, y, const_cast<void*>(b),
                    dtype, dtype},
                   device);
}

bool linear_weight_bias_grads(const void* dy, const void* x, void* dw, void* db, int64_t rows, int64_t in,
                              int64_t out, DType dtype, DType grad_dtype, int device) {
  if ((dtype != DType::f32 && dtype != DType::bf16) || grad_dtype != DType::f32) return false;
  // dW^T[in, out] = x^T[in, rows] (dy^T stored [out, rows])^T, db[out] = the column sums of B
  return lt_matmul({CUBLAS_OP_N, CUBLAS_OP_T, CUBLASLT_EPILOGUE_BGRADB, in, out, rows, x, dy, dw, db, dtype, grad_dtype},
                   device);
}

}  // namespace remat::cuda
