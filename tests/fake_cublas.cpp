// The cuBLAS and cuBLASLt calls of the emulated CUDA part (tests/simt_launch.h), over the simulated
// runtime: a strided batched GEMM, and cuBLASLt's matmul with its bias and bias-gradient (BGRADB)
// epilogues, queued on the current device's compute stream, computed in the compute type in k order
// (so not cuBLAS's bits: parity with the CPU is within rounding, as on a GPU).
#include <cublasLt.h>
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

// C = alpha op(A) op(B) + beta C (+ bias[i] down C's rows when `bias` is given, of C's type),
// column-major, each product summed in Acc in k order: op(A)'s rows and op(B)'s columns are first
// gathered into contiguous arrays of Acc. With `bias_grad`, also bias_grad[j] = the sum of op(B)'s
// column j over k (in Acc, k order, of C's type): cuBLASLt's BGRADB.
template <typename Acc>
void gemm(cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k, double alpha, const void* A,
          cudaDataType Atype, int lda, long long strideA, const void* B, cudaDataType Btype, int ldb,
          long long strideB, double beta, void* C, cudaDataType Ctype, int ldc, long long strideC, int batch,
          bool tf32, const void* bias = nullptr, void* bias_grad = nullptr) {
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
    if (bias_grad != nullptr)
      for (int j = 0; j < n; ++j) {
        Acc sum = 0;
        for (int l = 0; l < k; ++l) sum += cols[size_t(j) * k + l];
        store(bias_grad, Ctype, j, static_cast<double>(sum));
      }
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        const Acc* r = &rows[size_t(i) * k];
        const Acc* c = &cols[size_t(j) * k];
        Acc acc = 0;
        for (int l = 0; l < k; ++l) acc += r[l] * c[l];
        if (bias != nullptr) acc += static_cast<Acc>(load(bias, Ctype, i));  // to the accumulator, before rounding
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

// ---- cuBLASLt: the descriptors remat sets, one algorithm offered per problem ----
// The state behind each semi-opaque descriptor: a fake's own struct in the header's storage.
namespace fake_lt {
struct Desc {
  cublasComputeType_t compute;
  int32_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
};
struct Layout {
  cudaDataType type;
  uint64_t rows, cols;
  int64_t ld;
};
struct Preference {
  uint64_t workspace = 0;
  uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D: cuBLASLt's defaults
};
// What the "algorithm" carries: the alignments it was chosen for, which the matmul then requires.
constexpr uint32_t kAlgoMagic = 0x1a160;  // marks an algorithm the heuristic below made
struct Algo {
  uint32_t magic;
  uint32_t align[5];  // A, B, C, D, bias
  uint64_t workspace;
};
static_assert(sizeof(Algo) <= sizeof(cublasLtMatmulAlgo_t));

// A descriptor's storage holds the address of its state.
template <typename State, typename Opaque>
Opaque* make(const State& init) {
  auto* o = new Opaque{};
  auto* st = new State(init);
  std::memcpy(o->data, &st, sizeof st);
  return o;
}
template <typename State, typename Opaque>
State& state(Opaque* o) {
  State* st;
  std::memcpy(&st, o->data, sizeof st);
  return *st;
}
template <typename State, typename Opaque>
void destroy(Opaque* o) {
  delete &state<State>(o);
  delete o;
}

uint32_t alignment(const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

template <typename T>
cublasStatus_t read(T& out, const void* buf, size_t size) {
  if (size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;  // cuBLASLt checks each attribute's size
  std::memcpy(&out, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

// The problem as cuBLASLt validates it: D = op(A) op(B) with C of D's shape and type, leading
// dimensions that hold their rows, the bias and bias-gradient epilogues only with a bias pointer. 0
// when inconsistent, else k.
int64_t check(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl) {
  uint64_t am = d.transa == CUBLAS_OP_N ? a.rows : a.cols, ak = d.transa == CUBLAS_OP_N ? a.cols : a.rows;
  uint64_t bk = d.transb == CUBLAS_OP_N ? b.rows : b.cols, bn = d.transb == CUBLAS_OP_N ? b.cols : b.rows;
  bool ok = am == dl.rows && bn == dl.cols && ak == bk && c.rows == dl.rows && c.cols == dl.cols && c.type == dl.type &&
            a.ld >= static_cast<int64_t>(a.rows) && b.ld >= static_cast<int64_t>(b.rows) &&
            dl.ld >= static_cast<int64_t>(dl.rows) && a.type == b.type && simulated(a.type) && simulated(dl.type) &&
            (d.epilogue == CUBLASLT_EPILOGUE_DEFAULT ||
             ((d.epilogue == CUBLASLT_EPILOGUE_BIAS || d.epilogue == CUBLASLT_EPILOGUE_BGRADB) && d.bias != nullptr));
  return ok ? static_cast<int64_t>(ak) : 0;
}
}  // namespace fake_lt

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = reinterpret_cast<cublasLtHandle_t>(new int(0));  // remat keeps its handles for the process
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasLtGetStatusString(cublasStatus_t status) { return cublasGetStatusString(status); }

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute, cudaDataType_t scale) {
  if (scale != (compute == CUBLAS_COMPUTE_64F ? CUDA_R_64F : CUDA_R_32F)) return CUBLAS_STATUS_INVALID_VALUE;
  *desc = fake_lt::make<fake_lt::Desc, cublasLtMatmulDescOpaque_t>(fake_lt::Desc{compute});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  fake_lt::destroy<fake_lt::Desc>(desc);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t size) {
  fake_lt::Desc& d = fake_lt::state<fake_lt::Desc>(desc);
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return fake_lt::read(d.transa, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return fake_lt::read(d.transb, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return fake_lt::read(d.epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return fake_lt::read(d.bias, buf, size);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;  // not simulated: a test of remat must not set it
  }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  *layout = fake_lt::make<fake_lt::Layout, cublasLtMatrixLayoutOpaque_t>(fake_lt::Layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  fake_lt::destroy<fake_lt::Layout>(layout);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = fake_lt::make<fake_lt::Preference, cublasLtMatmulPreferenceOpaque_t>(fake_lt::Preference{});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  fake_lt::destroy<fake_lt::Preference>(pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    size_t size) {
  fake_lt::Preference& p = fake_lt::state<fake_lt::Preference>(pref);
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return fake_lt::read(p.workspace, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return fake_lt::read(p.align[0], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return fake_lt::read(p.align[1], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return fake_lt::read(p.align[2], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return fake_lt::read(p.align[3], buf, size);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

// One algorithm for any consistent problem, made for the preference's alignments (and the bias
// pointer's, which cuBLASLt reads from the descriptor); none for f64 with an epilogue, as a
// library may well offer none.
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t* results, int* count) {
  using namespace fake_lt;
  const Desc& dd = state<Desc>(desc);
  const Preference& p = state<Preference>(pref);
  *count = 0;
  if (requested < 1 || check(dd, state<Layout>(a), state<Layout>(b), state<Layout>(c), state<Layout>(d)) == 0)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (dd.compute == CUBLAS_COMPUTE_64F && dd.epilogue != CUBLASLT_EPILOGUE_DEFAULT) return CUBLAS_STATUS_NOT_SUPPORTED;
  results[0] = {};
  // It uses what workspace it may, up to 1 MiB, as a split-k algorithm would.
  const Algo algo{kAlgoMagic, {p.align[0], p.align[1], p.align[2], p.align[3], dd.bias ? alignment(dd.bias) : 256u},
                  std::min<uint64_t>(p.workspace, 1u << 20)};
  std::memcpy(&results[0].algo, &algo, sizeof algo);
  results[0].workspaceSize = algo.workspace;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1;
  *count = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b, const void* beta,
                              const void* C, cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  using namespace fake_lt;
  const Desc dd = state<Desc>(desc);
  const Layout al = state<Layout>(a), bl = state<Layout>(b), cl = state<Layout>(c), dl = state<Layout>(d);
  int64_t k = check(dd, al, bl, cl, dl);
  Algo chosen{};
  if (algo != nullptr) std::memcpy(&chosen, algo, sizeof chosen);
  // What the real library would refuse or get wrong: no algorithm from its heuristic, pointers
  // less aligned than the algorithm was chosen for, too little workspace, C in place of D but not
  // the same, another stream than remat's compute stream.
  if (k == 0 || algo == nullptr || chosen.magic != kAlgoMagic || alignment(A) < chosen.align[0] ||
      alignment(B) < chosen.align[1] || alignment(C) < chosen.align[2] || alignment(D) < chosen.align[3] ||
      (dd.bias != nullptr && alignment(dd.bias) < chosen.align[4]) || (workspace == nullptr && workspace_bytes > 0) ||
      workspace_bytes < chosen.workspace || C != D || stream != nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  const bool wide = dd.compute == CUBLAS_COMPUTE_64F, tf32 = dd.compute == CUBLAS_COMPUTE_32F_FAST_TF32;
  double a_scale = wide ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  double b_scale = wide ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  auto ta = static_cast<cublasOperation_t>(dd.transa), tb = static_cast<cublasOperation_t>(dd.transb);
  int m = static_cast<int>(dl.rows), n = static_cast<int>(dl.cols), kk = static_cast<int>(k);
  int lda = static_cast<int>(al.ld), ldb = static_cast<int>(bl.ld), ldd = static_cast<int>(dl.ld);
  const void* bias = dd.epilogue == CUBLASLT_EPILOGUE_BIAS ? dd.bias : nullptr;
  void* bias_grad = dd.epilogue == CUBLASLT_EPILOGUE_BGRADB ? const_cast<void*>(dd.bias) : nullptr;
  const unsigned one[3] = {1, 1, 1};
  static const char lt_kernel = 0;  // the launch's key: this fake's cuBLASLt "kernel"
  cudaDataType at = al.type, dt = dl.type;
  fake_cuda::launch(&lt_kernel, one, one, 0, [=] {
    if (wide)
      gemm<double>(ta, tb, m, n, kk, a_scale, A, at, lda, 0, B, at, ldb, 0, b_scale, D, dt, ldd, 0, 1, false, bias,
                   bias_grad);
    else
      gemm<float>(ta, tb, m, n, kk, a_scale, A, at, lda, 0, B, at, ldb, 0, b_scale, D, dt, ldd, 0, 1, tf32, bias,
                  bias_grad);
  });
  return cudaGetLastError() == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"
