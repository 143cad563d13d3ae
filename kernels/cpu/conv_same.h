// f32 "same" convolutions at stride 1 on the CPU's vectors (AVX-512, or AVX2 with FMA), computed
// straight from the input planes: a register tile of output channels x two vectors of pixels
// (AVX-512: 14 x 32, AVX2: 6 x 16) sums broadcast weights times the input plane shifted under each
// kernel tap (a masked load: the lanes a tap puts outside the image read zero); on AVX-512 the 3x3
// weight gradient sums dy times the shifted planes over the pixels in 16 lanes.
// No im2col columns are written and packed (at unet's shapes a fifth to a quarter of the forward),
// and the input gradient is the same kernel over dy (the adjoint of a "same" convolution is one,
// with the kernel flipped), where it was a GEMM over only Cout terms and a scatter of k^2 column
// rows per channel.
// Every output element is one sum over its inputs in a fixed order, whatever the tile it lies in
// (edge tiles are masked) and the threads: a replay repeats the bits (the same on AVX-512 and
// AVX2: each output's terms are summed one FMA at a time in the same order).
#pragma once

#include <cstdint>

namespace remat::cpu {

// The instruction set this build's kernel uses: "avx512", "avx2", or "" where it has none.
const char* conv_same_isa();
// Whether it takes a convolution with this kernel, stride and padding: built, stride 1, and an
// output as large as the input (an odd square kernel from 3x3 to 7x7, padding (k - 1) / 2).
bool conv_same_fits(int64_t kh, int64_t kw, int stride, int padding);

// Floats of scratch one call needs (the weights packed into panels).
int64_t conv_same_scratch(int64_t cout, int64_t cin, int64_t k, bool adjoint);

// With weight [cout, cin, k, k]:
// - forward (adjoint false): out [n, cout, h, w] = the convolution of in [n, cin, h, w], plus bias
//   (cout values, or null) added to each sum (one rounding, as a bias added after the product);
// - adjoint (true): out [n, cin, h, w] = the gradient of that convolution's input for the output
//   gradient in [n, cout, h, w] (bias ignored): a convolution of it by the flipped kernel.
// Splits the images' pixel tiles among at most `threads` OpenMP threads. Throws when the build
// lacks the kernel or the shape does not fit.
void conv_same(const float* in, int64_t n, int64_t h, int64_t w, const float* weight, int64_t cout, int64_t cin,
               int64_t k, bool adjoint, const float* bias, float* out, float* scratch, int threads);

// Whether conv_same_weight_grad takes such a convolution: an AVX-512 build, one that fits, with a
// 3x3 kernel (a tile holds 3 output channels x the 9 taps; wider kernels keep the columns), on
// images of at least 32 x 32 whose dy and x planes fit 2 MiB (where it measured faster than the
// columns' GEMM). AVX2's 16 registers cannot hold such a tile: its builds keep the columns.
bool conv_same_weight_grad_fits(int64_t kh, int64_t kw, int stride, int padding, int64_t h, int64_t w, int64_t cout,
                                int64_t cin);

// Floats of scratch conv_same_weight_grad needs.
int64_t conv_same_weight_grad_scratch(int64_t cout, int64_t cin);

// dw [cout, cin, 3, 3] = the weight gradient of that convolution for input x [n, cin, h, w] and
// output gradient dy [n, cout, h, w], without im2col columns: each weight's sum of dy times the
// shifted plane runs over the pixels in 16 lanes (images in order, pixels in order within each
// lane), then adds the lanes in a fixed tree. Splits (output channels, input channel) pairs among
// at most `threads` OpenMP threads: the same bits whatever their number. Any 3x3 "same" shape gives
// the right values (conv_same_weight_grad_fits says where it is the faster path). Throws when the
// build lacks the kernel (not AVX-512).
void conv_same_weight_grad(const float* x, const float* dy, int64_t n, int64_t h, int64_t w, int64_t cout,
                           int64_t cin, float* dw, float* scratch, int threads);

}  // namespace remat::cpu
