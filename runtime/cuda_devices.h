// CUDA devices as a program sees them: whether remat has its CUDA part, how many GPUs there are,
// waiting for them, and giving cached memory back. Safe to call on any machine.
#pragma once

#include <cstdint>
#include <string>

namespace remat {

bool cuda_built();         // true when remat was compiled with the CUDA backend
int cuda_device_count();   // 0 without a GPU, without CUDA's libraries or without CUDA; never throws
// Why cuda_device_count() is 0 for want of remat's CUDA part ("" when the part is there): it was
// not built, or its module did not load (the loader's message).
std::string cuda_unavailable_reason();
std::string cuda_device_name(int index);
void cuda_synchronize(int index);  // waits for all work queued on the device
// Returns the caching allocator's wholly free segments to the driver: empty_cache(Device::cuda(index)).
void cuda_empty_cache(int index);
// How many times remat has made the host wait for a GPU since the process started: copies to the
// host (item(), to_vector, .to(cpu)), copies from the host of more than 1 MiB (smaller ones are
// staged in page-locked memory and queued), cuda_synchronize, event timings. A training step that
// queues its work without waiting adds none (remat-bench prints the count per step). 0 without CUDA.
long long cuda_host_syncs();

// TF32 for f32 GEMMs on CUDA: cuBLAS's tensor-core kernels that round each product's inputs to
// 10-bit mantissas and add in f32 (matmul, linear, conv2d's im2col path; cuDNN convolutions stay
// f32). Off by default, so that f32 results compare with the CPU; deterministic either way (the
// same kernels every call). A process-wide setting, read at each GEMM.
void set_cuda_tf32(bool enabled);
bool cuda_tf32();

// linear's bias on CUDA, in cuBLASLt's epilogue: y = x W^T + b in one GEMM call, the bias added to
// the accumulator before its one rounding to y's dtype, no second pass over y (bf16 and f32; f64
// and shapes cuBLASLt has no algorithm for keep the GEMM then the bias kernel). On by default since
// its [cuda] case passed on an H200 (docs/results/gpu.md: 41.5 against 43.6 ms a gpt2 step in
// bf16); deterministic either way. The default comes from the environment,
// REMAT_CUDA_BIAS_EPILOGUE=1|0 (1 when unset); a process-wide setting, read at each call.
void set_cuda_bias_epilogue(bool enabled);
bool cuda_bias_epilogue();  // throws on a bad REMAT_CUDA_BIAS_EPILOGUE, naming what it accepts
// linear calls whose bias went through the epilogue since the process began (what tests read).
void count_cuda_bias_epilogue_call();
int64_t cuda_bias_epilogue_calls();

// linear's weight and bias gradients on CUDA in one cuBLASLt call: dW = dy^T x with the BGRADB
// epilogue summing dy's columns into db as the GEMM reads them, where otherwise a column
// reduction reads dy again (two launches a linear). For f32 gradients (f32 linears, and bf16 ones
// under autocast with f32 weights); shapes cuBLASLt has no algorithm for keep the GEMM and the
// reduction. Deterministic either way (the algorithm is chosen once per shape), but db's bits
// differ from the reduction's. Off by default until a GPU has timed it against the reduction
// (tools/gpu_session.sh does); REMAT_CUDA_BIAS_GRAD_EPILOGUE=1|0 (0 when unset), a process-wide
// setting read at each call.
void set_cuda_bias_grad_epilogue(bool enabled);
bool cuda_bias_grad_epilogue();  // throws on a bad REMAT_CUDA_BIAS_GRAD_EPILOGUE, naming what it accepts
// linear backward calls whose gradients came from that one call since the process began.
void count_cuda_bias_grad_epilogue_call();
int64_t cuda_bias_grad_epilogue_calls();

// How attention runs on CUDA: `flash`, remat's own kernel (CUDA cores, one query row per thread,
// nothing T x T in memory; the reference), `gemm`, batched cuBLAS GEMMs on the tensor cores with
// [T, T] temporaries for a chunk of heads at a time (at most 64 MiB each), `mma`, remat's own
// flash kernels on the tensor cores (bf16, head dims 32, 64 and 128, compute capability 8.0 on;
// other inputs take the flash kernel), `cudnn`, cuDNN's fused attention with its deterministic
// backward (bf16, head dims up to 128 in multiples of 8, compute capability 8.0 on, in a build
// with cuDNN's frontend; where it does not apply or cuDNN declines a shape, the call takes what
// `auto` would), or `auto` (the default): `mma` where it applies, else `gemm` in f32 and bf16 and
// `flash` in f64 (the exact reference; its parity tests keep it), per call, from the inputs alone,
// so a replay takes the path its forward took. On an H200 a gpt2 step in bf16 took 41.5 ms on
// `mma`, 50.9 on `gemm`, 250.5 on `flash` (docs/results/gpu.md); `cudnn` has not run on a GPU yet.
// The default comes from the environment, REMAT_CUDA_ATTENTION=auto|flash|gemm|mma|cudnn (auto
// when unset); a process-wide setting, read at each call.
enum class CudaAttention { flash, gemm, mma, cudnn, automatic };
void set_cuda_attention(CudaAttention path);
CudaAttention cuda_attention();  // throws on a bad REMAT_CUDA_ATTENTION, naming what it accepts
// "auto", "flash", "gemm", "mma" or "cudnn"; anything else a clear error.
CudaAttention parse_cuda_attention(const std::string& name);
const char* cuda_attention_name(CudaAttention path);
// Attention calls (forward and backward) each path (never `automatic`) has run since the process
// began: what the tests read to know that the path they chose is the one that ran.
void count_cuda_attention_call(CudaAttention path);
int64_t cuda_attention_calls(CudaAttention path);

}  // namespace remat
