// CPU image ops: conv2d (im2col + remat's GEMM; f32 "same" convolutions on the direct AVX-512 or
// AVX2 kernel of kernels/cpu/conv_same.h), group_norm, nearest upsampling, average pooling,
// adaLN modulation and the sinusoidal timestep embedding. Images are [N, C, H, W].
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>

#include "kernels/cpu/conv_same.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/lane_sums.h"
#include "runtime/workspace.h"

namespace remat {

namespace {

struct ConvShape {
  int64_t n, cin, h, w, cout, kh, kw, ho, wo;
};

ConvShape conv_shape(const Tensor& x, const Tensor& w, int stride, int padding) {
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), w.size(3), 0, 0};
  s.ho = (s.h + 2 * padding - s.kh) / stride + 1;
  s.wo = (s.w + 2 * padding - s.kw) / stride + 1;
  return s;
}

// The output columns [lo, hi) whose input column ox * stride - padding + j lies inside the image
// for kernel column j: the rest read the zero border.
std::pair<int64_t, int64_t> inside_columns(const ConvShape& s, int stride, int padding, int64_t j) {
  auto floor_div = [](int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
  const int64_t lo = std::clamp<int64_t>(-floor_div(j - padding, stride), 0, s.wo);  // ceil((padding - j) / stride)
  const int64_t hi = std::clamp<int64_t>(floor_div(s.w - 1 + padding - j, stride) + 1, lo, s.wo);
  return {lo, hi};
}

// Channel c's rows of one image's columns [c0, c1) (output pixels, in row-major order): row (c, i,
// j) holds, for each of those pixels, the input pixel under kernel tap (i, j), zero outside the
// padded border. Rows are `ld` apart (the columns of several images may lie side by side).
template <typename T>
void im2col_channel(const T* x, const ConvShape& s, int stride, int padding, int64_t c, int64_t c0, int64_t c1, T* cols,
                    int64_t ld) {
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) {
      T* row = cols + ((c * s.kh + i) * s.kw + j) * ld;  // row[o - c0]: output pixel o
      const auto [lo, hi] = inside_columns(s, stride, padding, j);
      if (stride == 1 && s.wo == s.w) {
        // Output rows as wide as the input's ("same" padding): the tap's values are the input plane
        // shifted by (i - padding) rows and (j - padding) columns, one copy for the whole range; the
        // columns the shift wraps onto the neighbouring row are then zeroed, a column at a time (a
        // strided store, where a fill per row became a library call for one value).
        const int64_t top = std::clamp<int64_t>(padding - i, 0, s.ho);
        const int64_t bottom = std::clamp<int64_t>(s.h + padding - i, top, s.ho);
        const int64_t begin = std::clamp(top * s.wo + lo, c0, c1);
        const int64_t end = top == bottom ? begin : std::clamp((bottom - 1) * s.wo + hi, begin, c1);
        std::fill(row, row + (begin - c0), T(0));
        std::fill(row + (end - c0), row + (c1 - c0), T(0));
        if (begin == end) continue;
        const T* plane = x + c * s.h * s.w;
        const int64_t shift = (i - padding) * s.w + (j - padding);  // input index = output index + shift
        std::copy(plane + (begin + shift), plane + (end + shift), row + (begin - c0));
        auto zero_column = [&](int64_t ox) {
          for (int64_t o = begin + (ox - begin % s.wo + s.wo) % s.wo; o < end; o += s.wo) row[o - c0] = T(0);
        };
        for (int64_t ox = 0; ox < lo; ++ox) zero_column(ox);
        for (int64_t ox = hi; ox < s.wo; ++ox) zero_column(ox);
        continue;
      }
      for (int64_t oy = c0 / s.wo; oy * s.wo < c1; ++oy) {
        // Columns ox in [a, b) of this output row lie in the range; out[ox - a] is pixel (oy, ox).
        const int64_t a = std::max(c0 - oy * s.wo, int64_t{0}), b = std::min(c1 - oy * s.wo, s.wo);
        T* out = row + (oy * s.wo + a - c0);
        const int64_t iy = oy * stride - padding + i;
        if (iy < 0 || iy >= s.h) {
          std::fill(out, out + (b - a), T(0));
          continue;
        }
        const int64_t in_lo = std::clamp(lo, a, b), in_hi = std::clamp(hi, in_lo, b);
        std::fill(out, out + (in_lo - a), T(0));
        if (in_lo < in_hi) {
          // The pixel under (oy, ox) for ox in [lo, hi): input column ox * stride - padding + j.
          const T* in = x + (c * s.h + iy) * s.w + (in_lo * stride - padding + j);
          if (stride == 1)
            std::copy(in, in + (in_hi - in_lo), out + (in_lo - a));
          else
            for (int64_t ox = in_lo; ox < in_hi; ++ox) out[ox - a] = in[(ox - in_lo) * stride];
        }
        std::fill(out + (in_hi - a), out + (b - a), T(0));
      }
    }
}

// The adjoint for channel c: adds each column entry back to the pixel it came from, taps in order
// (each pixel's sum in the same order whatever the layout of the loops over pixels).
template <typename T>
void col2im_channel(const T* cols, int64_t ld, const ConvShape& s, int stride, int padding, int64_t c, T* x) {
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) {
      const T* row = cols + ((c * s.kh + i) * s.kw + j) * ld;
      const auto [lo, hi] = inside_columns(s, stride, padding, j);
      if (lo == hi) continue;  // the tap reads only the zero border
      for (int64_t oy = 0; oy < s.ho; ++oy) {
        const int64_t iy = oy * stride - padding + i;
        if (iy < 0 || iy >= s.h) continue;
        T* dst = x + (c * s.h + iy) * s.w + (lo * stride - padding + j);
        const T* src = row + oy * s.wo;
        if (stride == 1)
          for (int64_t ox = lo; ox < hi; ++ox) dst[ox - lo] += src[ox];
        else
          for (int64_t ox = lo; ox < hi; ++ox) dst[(ox - lo) * stride] += src[ox];
      }
    }
}

// Images per GEMM: the columns of that many images side by side, about kChunkElements values (at
// least one image). From the shape alone, so the sums over images (dW, db) take an order the shape
// fixes. One GEMM over several images' columns gives remat's GEMM more columns than one small
// image has, and the column buffers stay at 2 MiB in f32 (or one image's).
constexpr int64_t kChunkElements = int64_t{1} << 19;
int64_t images_per_chunk(const ConvShape& s) {
  const int64_t per_image = std::max<int64_t>(s.cin * s.kh * s.kw * s.ho * s.wo, 1);
  return std::clamp<int64_t>(kChunkElements / per_image, 1, std::max<int64_t>(s.n, 1));
}

// The columns of images [first, first + g) side by side: cols [k, g * p], image i at column i * p.
template <typename T>
void im2col_images(const T* x, const ConvShape& s, int stride, int padding, int64_t first, int64_t g, T* cols) {
  const int64_t p = s.ho * s.wo, ld = g * p;
#pragma omp parallel for collapse(2) if (g * s.cin * s.kh * s.kw * p > cpu::kParallelGrain)
  for (int64_t i = 0; i < g; ++i)
    for (int64_t c = 0; c < s.cin; ++c)
      im2col_channel(x + (first + i) * s.cin * s.h * s.w, s, stride, padding, c, 0, p, cols + i * p, ld);
}

// Whether an f32 convolution of this shape runs on kernels/cpu/conv_same.h: a "same" convolution
// at stride 1 in a build with the kernel, unless the GEMMs run on Eigen's (the reference path the
// user chose: REMAT_CPU_GEMM=eigen).
bool runs_direct(const Tensor& x, const ConvShape& s, int stride, int padding) {
  return x.dtype() == DType::f32 && !cpu::gemm_is_eigen() && cpu::conv_same_fits(s.kh, s.kw, stride, padding);
}

// The direct kernels' thread count: OpenMP's (0) above the grain, else one.
int direct_threads(const ConvShape& s) {
  return s.n * s.cout * s.cin * s.kh * s.kw * s.h * s.w > cpu::kParallelGrain ? 0 : 1;
}

// The direct kernel over all images: the forward (bias added) or, with `adjoint`, the input's
// gradient from the output's.
void conv_direct(const Tensor& in, const ConvShape& s, const Tensor& w, bool adjoint, const Tensor& b, Tensor& out) {
  const int threads = direct_threads(s);
  Tensor packed = empty_workspace({cpu::conv_same_scratch(s.cout, s.cin, s.kh, adjoint)}, DType::f32);
  cpu::conv_same(in.data<float>(), s.n, s.h, s.w, w.data<float>(), s.cout, s.cin, s.kh, adjoint,
                 b.defined() ? b.data<float>() : nullptr, out.data<float>(), packed.data<float>(), threads);
}

}  // namespace

// The forward's tiles: output columns (pixels) of one image, as many as keep the tile's columns (k
// rows) near 1 MiB in f32, so that they are still in L2 when the GEMM packs them (an image's
// columns at once were 3.5 MiB at unet's widest convolution, and the copy that wrote them took as
// long as the GEMM); whole panels of remat's GEMM (32 columns), the image's pixels split evenly.
constexpr int64_t kTileElements = int64_t{1} << 18;
int64_t tile_columns(const ConvShape& s) {
  const int64_t k = std::max<int64_t>(s.cin * s.kh * s.kw, 1), p = std::max<int64_t>(s.ho * s.wo, 1);
  const int64_t pieces = std::max<int64_t>(1, (k * p + kTileElements - 1) / kTileElements);
  return std::min(p, ((p + pieces - 1) / pieces + 31) / 32 * 32);
}

// Tile by tile, each thread on its own tiles: the tile's columns (im2col), y's columns = W cols
// (remat's GEMM on the calling thread: cpu::gemm), then the bias added to them (one rounding, as a
// bias added after the product). Each output element's sum is the GEMM's over k, whatever the
// tiling and the threads: the bits of one GEMM over all the columns. f32 "same" convolutions at
// stride 1 (3x3 and up) run on the direct kernel instead, without columns (conv_same.h).
Tensor CpuBackend::conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int padding) {
  ConvShape s = conv_shape(x, w, stride, padding);
  Tensor y = Tensor::empty({s.n, s.cout, s.ho, s.wo}, x.dtype());
  if (runs_direct(x, s, stride, padding)) {
    conv_direct(x, s, w, false, b, y);
    return y;
  }
  cpu::dispatch_float(x.dtype(), "conv2d", [&]<typename T>() {
    const int64_t k = s.cin * s.kh * s.kw, p = s.ho * s.wo, tile = tile_columns(s);
    const int64_t per_image = (p + tile - 1) / tile, tiles = s.n * per_image;
    const int threads = s.n * s.cout * p * k > cpu::kParallelGrain ? omp_get_max_threads() : 1;
    // Allocated before the parallel loop: an allocation that fails is an ordinary error, never one
    // thrown inside a parallel region (which terminates).
    Tensor cols = empty_workspace({threads, k * tile}, x.dtype());
    const T* bias = b.defined() ? b.data<T>() : nullptr;
    std::exception_ptr failure;  // the GEMM's packing buffers may fail to allocate: rethrown below
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t image = t / per_image, c0 = t % per_image * tile, width = std::min(tile, p - c0);
      T* block = cols.data<T>() + omp_get_thread_num() * k * tile;
      for (int64_t c = 0; c < s.cin; ++c)
        im2col_channel(x.data<T>() + image * s.cin * s.h * s.w, s, stride, padding, c, c0, c0 + width, block, width);
      T* out = y.data<T>() + image * s.cout * p + c0;  // columns [c0, c0 + width) of the image's [Cout, p]
      try {
        cpu::gemm<T>(false, false, s.cout, width, k, T(1), w.data<T>(), k, block, width, T(0), out, p);
      } catch (...) {
#pragma omp critical(remat_conv2d_failure)
        failure = std::current_exception();
        continue;
      }
      if (bias)
        for (int64_t o = 0; o < s.cout; ++o)
          for (int64_t e = 0; e < width; ++e) out[o * p + e] += bias[o];
    }
    if (failure) std::rethrow_exception(failure);
  });
  return y;
}

// Per chunk of images: dy's blocks side by side (dyc [Cout, g * p]), then dW += dyc cols^T,
// dcols = W^T dyc gathered back onto each image's pixels, and db += dyc's row sums (in lanes:
// kernels/cpu/lane_sums.h). dW and db sum over the chunks in order and within a chunk in an order
// its shape fixes (the GEMM's sums over k are never split among threads; gemm.h), so replays and
// reruns repeat the bits. Where the forward runs on the direct kernel, so does dx (the adjoint of a
// "same" convolution is one with the kernel flipped), and the chunks compute dW and db only; where
// the direct weight gradient fits too (3x3 on images of 32 x 32 and up), there are no chunks.
std::vector<Tensor> CpuBackend::conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, int stride,
                                                int padding, bool has_bias) {
  ConvShape s = conv_shape(x, w, stride, padding);
  const bool direct = runs_direct(x, s, stride, padding);  // dx from the direct kernel, not from columns
  Tensor dx = direct ? Tensor::empty(x.shape(), x.dtype()) : Tensor::zeros(x.shape(), x.dtype());
  Tensor dw = Tensor::zeros(w.shape(), x.dtype()), db = has_bias ? Tensor::zeros({s.cout}, x.dtype()) : Tensor();
  if (direct) conv_direct(dy, s, w, true, Tensor(), dx);
  if (direct && cpu::conv_same_weight_grad_fits(s.kh, s.kw, stride, padding, s.h, s.w, s.cout, s.cin)) {
    // dW on the direct kernel too; db per output channel, each image's lane sum in image order.
    Tensor acc = empty_workspace({cpu::conv_same_weight_grad_scratch(s.cout, s.cin)}, DType::f32);
    cpu::conv_same_weight_grad(x.data<float>(), dy.data<float>(), s.n, s.h, s.w, s.cout, s.cin, dw.data<float>(),
                               acc.data<float>(), direct_threads(s));
    if (has_bias) {
      const int64_t p = s.h * s.w;
      const float* pdy = dy.data<float>();
      float* pb = db.data<float>();
#pragma omp parallel for if (s.n * s.cout * p > cpu::kParallelGrain)
      for (int64_t o = 0; o < s.cout; ++o)
        for (int64_t i = 0; i < s.n; ++i) pb[o] += cpu::lane_sum(pdy + (i * s.cout + o) * p, p);  // d(bias) term
    }
    return {dx, dw, db};
  }
  cpu::dispatch_float(x.dtype(), "conv2d_backward", [&]<typename T>() {
    const int64_t k = s.cin * s.kh * s.kw, p = s.ho * s.wo, chunk = images_per_chunk(s);
    Tensor cols = empty_workspace({k, chunk * p}, x.dtype());
    Tensor dcols = direct ? Tensor() : empty_workspace({k, chunk * p}, x.dtype());
    Tensor dyc = chunk > 1 ? empty_workspace({s.cout, chunk * p}, x.dtype()) : Tensor();
    for (int64_t first = 0; first < s.n; first += chunk) {
      const int64_t g = std::min(chunk, s.n - first), ld = g * p;
      const T* pdy = dy.data<T>() + first * s.cout * p;
      const T* pc = pdy;  // a chunk of one image: dy's block is dyc already
      if (chunk > 1) {
        T* gathered = dyc.data<T>();
#pragma omp parallel for collapse(2) if (g * s.cout * p > cpu::kParallelGrain)
        for (int64_t i = 0; i < g; ++i)
          for (int64_t o = 0; o < s.cout; ++o)
            std::copy_n(pdy + (i * s.cout + o) * p, p, gathered + o * ld + i * p);
        pc = gathered;
      }
      im2col_images(x.data<T>(), s, stride, padding, first, g, cols.data<T>());
      cpu::gemm<T>(false, true, s.cout, k, ld, T(1), pc, ld, cols.data<T>(), ld, T(first == 0 ? 0 : 1),
                   dw.data<T>(), k);  // d(weight) term
      if (!direct) {
        cpu::gemm<T>(true, false, k, ld, s.cout, T(1), w.data<T>(), k, pc, ld, T(0), dcols.data<T>(), ld);
        const T* pd = dcols.data<T>();
#pragma omp parallel for collapse(2) if (g * k * p > cpu::kParallelGrain)
        for (int64_t i = 0; i < g; ++i)
          for (int64_t c = 0; c < s.cin; ++c)
            col2im_channel(pd + i * p, ld, s, stride, padding, c, dx.data<T>() + (first + i) * s.cin * s.h * s.w);
      }
      if (has_bias) {
        T* pb = db.data<T>();
#pragma omp parallel for if (s.cout * ld > cpu::kParallelGrain)
        for (int64_t o = 0; o < s.cout; ++o) pb[o] += cpu::lane_sum(pc + o * ld, ld);  // d(bias) term
      }
    }
  });
  return {dx, dw, db};
}

// A group's statistics and gradients sum its channels one after another, each channel's pixels in
// kLanes interleaved partial sums (kernels/cpu/lane_sums.h): a fixed order that vectorises, where
// one running sum over the group was a chain of dependent adds and each element looked up its
// channel's weight through a division.
std::vector<Tensor> CpuBackend::group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, double eps) {
  int64_t n = x.size(0), c = x.size(1);
  // An empty batch (or empty images): nothing to normalise, statistics 0.
  if (x.numel() == 0) return {Tensor::empty(x.shape(), x.dtype()), Tensor::zeros({n, groups}, x.dtype()),
                              Tensor::zeros({n, groups}, x.dtype())};
  int64_t hw = x.numel() / (n * c), cg = c / groups, m = cg * hw;
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Tensor mean = Tensor::empty({n, groups}, x.dtype()), rstd = Tensor::empty({n, groups}, x.dtype());
  cpu::dispatch_float(x.dtype(), "group_norm", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>(), *pb = b.data<T>();
    T *py = y.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t ng = 0; ng < n * groups; ++ng) {
      const T* g = px + ng * m;  // a group's channels are contiguous in [N, C, H, W]
      T acc[cpu::kLanes] = {};
      for (int64_t cc = 0; cc < cg; ++cc) {
        const T* pixels = g + cc * hw;
        cpu::lane_sum_into(acc, hw, [pixels](int64_t i) { return pixels[i]; });
      }
      const T mu = cpu::fold_lanes(acc) / static_cast<T>(m);
      T sq[cpu::kLanes] = {};
      for (int64_t cc = 0; cc < cg; ++cc) {
        const T* pixels = g + cc * hw;
        auto centred = [pixels, mu](int64_t i) { return pixels[i] - mu; };
        cpu::lane_dot_into(sq, hw, centred, centred);
      }
      const T rs = T(1) / std::sqrt(cpu::fold_lanes(sq) / static_cast<T>(m) + static_cast<T>(eps));
      const int64_t c0 = (ng % groups) * cg;
      for (int64_t cc = 0; cc < cg; ++cc) {
        const T *pixels = g + cc * hw, wc = pw[c0 + cc], bc = pb[c0 + cc];
        T* out = py + ng * m + cc * hw;
        for (int64_t i = 0; i < hw; ++i) out[i] = (pixels[i] - mu) * rs * wc + bc;
      }
      pm[ng] = mu;
      pr[ng] = rs;
    }
  });
  return {y, mean, rstd};
}

std::vector<Tensor> CpuBackend::group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                    const Tensor& mean, const Tensor& rstd, int groups) {
  int64_t n = x.size(0), c = x.size(1);
  if (x.numel() == 0) return {Tensor::empty(x.shape(), x.dtype()), Tensor::zeros({c}, x.dtype()), Tensor::zeros({c}, x.dtype())};
  int64_t hw = x.numel() / (n * c), cg = c / groups, m = cg * hw;
  Tensor dx = Tensor::empty(x.shape(), x.dtype()), dw = Tensor::empty({c}, x.dtype()), db = Tensor::empty({c}, x.dtype());
  cpu::dispatch_float(x.dtype(), "group_norm_backward", [&]<typename T>() {
    const T *px = x.data<T>(), *pw = w.data<T>(), *pdy = dy.data<T>(), *pm = mean.data<T>(), *pr = rstd.data<T>();
    T *pdx = dx.data<T>(), *pdw = dw.data<T>(), *pdb = db.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t ng = 0; ng < n * groups; ++ng) {
      const int64_t c0 = (ng % groups) * cg;
      const T mu = pm[ng], rs = pr[ng];
      T sum_d[cpu::kLanes] = {}, sum_dx[cpu::kLanes] = {};
      for (int64_t cc = 0; cc < cg; ++cc) {
        const T *xs = px + ng * m + cc * hw, *gs = pdy + ng * m + cc * hw, wc = pw[c0 + cc];
        auto d = [gs, wc](int64_t i) { return gs[i] * wc; };
        cpu::lane_sum_into(sum_d, hw, d);
        cpu::lane_dot_into(sum_dx, hw, d, [xs, mu, rs](int64_t i) { return (xs[i] - mu) * rs; });
      }
      const T mean_d = cpu::fold_lanes(sum_d) / static_cast<T>(m);
      const T mean_dx = cpu::fold_lanes(sum_dx) / static_cast<T>(m);
      for (int64_t cc = 0; cc < cg; ++cc) {
        const T *xs = px + ng * m + cc * hw, *gs = pdy + ng * m + cc * hw, wc = pw[c0 + cc];
        T* out = pdx + ng * m + cc * hw;
        for (int64_t i = 0; i < hw; ++i) {
          const T xhat = (xs[i] - mu) * rs, d = gs[i] * wc;
          out[i] = rs * (d - mean_d - xhat * mean_dx);  // as layer_norm, over the group
        }
      }
    }
    // Each channel's parameter gradients over the images in order, each image's pixels in lanes.
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t g = ch / cg;
      T sw[cpu::kLanes] = {}, sb[cpu::kLanes] = {};
      for (int64_t b = 0; b < n; ++b) {
        const T *xs = px + (b * c + ch) * hw, *gs = pdy + (b * c + ch) * hw;
        const T mu = pm[b * groups + g], rs = pr[b * groups + g];
        cpu::lane_dot_into(sw, hw, [gs](int64_t i) { return gs[i]; },
                           [xs, mu, rs](int64_t i) { return (xs[i] - mu) * rs; });  // d(weight) term: dy * xhat
        cpu::lane_sum_into(sb, hw, [gs](int64_t i) { return gs[i]; });         // d(bias) term
      }
      pdw[ch] = cpu::fold_lanes(sw);
      pdb[ch] = cpu::fold_lanes(sb);
    }
  });
  return {dx, dw, db};
}

namespace {

// Each of nc planes [h, w] spread into [h f, w f]: every value times `scale` (or copied, where
// scale is null) in its f x f block. A block's first row is written value by value, the other f - 1
// copied from it: no division per element, where the loops had one for each output's source.
template <typename T>
void spread_blocks(const T* src, int64_t nc, int64_t h, int64_t w, int f, const T* scale, T* dst) {
  const int64_t wf = w * f;
#pragma omp parallel for if (nc * h * w * f * f > cpu::kParallelGrain)
  for (int64_t p = 0; p < nc; ++p)
    for (int64_t i = 0; i < h; ++i) {
      const T* in = src + (p * h + i) * w;
      T* first = dst + (p * h + i) * f * wf;
      for (int64_t j = 0; j < w; ++j) {
        const T v = scale ? in[j] * *scale : in[j];
        for (int b = 0; b < f; ++b) first[j * f + b] = v;
      }
      for (int a = 1; a < f; ++a) std::copy(first, first + wf, first + a * wf);
    }
}

// Each of nc planes [h f, w f] summed over its f x f blocks into [h, w], each sum from 0 in the
// order (block row, then column), times `scale` where given: the bits of a sum per output, with
// the additions running along a row, one block column at a time.
template <typename T>
void sum_blocks(const T* src, int64_t nc, int64_t h, int64_t w, int f, const T* scale, T* dst) {
  const int64_t wf = w * f;
#pragma omp parallel for if (nc * h * w * f * f > cpu::kParallelGrain)
  for (int64_t p = 0; p < nc; ++p)
    for (int64_t i = 0; i < h; ++i) {
      T* out = dst + (p * h + i) * w;
      std::fill(out, out + w, T(0));
      for (int a = 0; a < f; ++a) {
        const T* row = src + ((p * h + i) * f + a) * wf;
        for (int b = 0; b < f; ++b)
          for (int64_t j = 0; j < w; ++j) out[j] += row[j * f + b];
      }
      if (scale)
        for (int64_t j = 0; j < w; ++j) out[j] *= *scale;
    }
}

}  // namespace

Tensor CpuBackend::upsample_nearest(const Tensor& x, int f) {
  const int64_t nc = x.size(0) * x.size(1), h = x.size(2), w = x.size(3);
  Tensor y = Tensor::empty({x.size(0), x.size(1), h * f, w * f}, x.dtype());
  cpu::dispatch_float(x.dtype(), "upsample_nearest", [&]<typename T>() {
    spread_blocks<T>(x.data<T>(), nc, h, w, f, nullptr, y.data<T>());
  });
  return y;
}

Tensor CpuBackend::upsample_nearest_backward(const Tensor& dy, int f) {
  const int64_t nc = dy.size(0) * dy.size(1), h = dy.size(2) / f, w = dy.size(3) / f;
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), h, w}, dy.dtype());
  cpu::dispatch_float(dy.dtype(), "upsample_nearest_backward", [&]<typename T>() {
    sum_blocks<T>(dy.data<T>(), nc, h, w, f, nullptr, dx.data<T>());
  });
  return dx;
}

Tensor CpuBackend::avg_pool(const Tensor& x, int f) {
  const int64_t nc = x.size(0) * x.size(1), h = x.size(2) / f, w = x.size(3) / f;
  Tensor y = Tensor::empty({x.size(0), x.size(1), h, w}, x.dtype());
  cpu::dispatch_float(x.dtype(), "avg_pool", [&]<typename T>() {
    const T inv = T(1) / static_cast<T>(f * f);
    sum_blocks<T>(x.data<T>(), nc, h, w, f, &inv, y.data<T>());
  });
  return y;
}

Tensor CpuBackend::avg_pool_backward(const Tensor& dy, int f) {
  const int64_t nc = dy.size(0) * dy.size(1), h = dy.size(2), w = dy.size(3);
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), h * f, w * f}, dy.dtype());
  cpu::dispatch_float(dy.dtype(), "avg_pool_backward", [&]<typename T>() {
    const T inv = T(1) / static_cast<T>(f * f);
    spread_blocks<T>(dy.data<T>(), nc, h, w, f, &inv, dx.data<T>());
  });
  return dx;
}

Tensor CpuBackend::modulate(const Tensor& x, const Tensor& shift, const Tensor& scale) {
  int64_t b = x.size(0), t = x.size(1), c = x.size(2);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  cpu::dispatch_float(x.dtype(), "modulate", [&]<typename T>() {
    const T *px = x.data<T>(), *psh = shift.data<T>(), *psc = scale.data<T>();
    T* py = y.data<T>();
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t r = 0; r < b * t; ++r) {
      int64_t bi = r / t;
      for (int64_t k = 0; k < c; ++k) py[r * c + k] = px[r * c + k] * (T(1) + psc[bi * c + k]) + psh[bi * c + k];
    }
  });
  return y;
}

std::vector<Tensor> CpuBackend::modulate_backward(const Tensor& dy, const Tensor& x, const Tensor& scale) {
  int64_t b = x.size(0), t = x.size(1), c = x.size(2);
  Tensor dx = Tensor::empty(x.shape(), x.dtype()), dshift = Tensor::empty({b, c}, x.dtype()),
         dscale = Tensor::empty({b, c}, x.dtype());
  cpu::dispatch_float(x.dtype(), "modulate_backward", [&]<typename T>() {
    const T *pdy = dy.data<T>(), *px = x.data<T>(), *psc = scale.data<T>();
    T *pdx = dx.data<T>(), *pdsh = dshift.data<T>(), *pdsc = dscale.data<T>();
    // Row by row, every channel's sums advanced together (each still over the tokens in order): a
    // channel at a time read dy and x a column at a time, c values apart, one dependent add after
    // another.
#pragma omp parallel for if (x.numel() > cpu::kParallelGrain)
    for (int64_t bi = 0; bi < b; ++bi) {
      T* __restrict sh = pdsh + bi * c;
      T* __restrict sc = pdsc + bi * c;
      const T* __restrict s = psc + bi * c;
      std::fill(sh, sh + c, T(0));
      std::fill(sc, sc + c, T(0));
      for (int64_t i = 0; i < t; ++i) {
        const T* __restrict g = pdy + (bi * t + i) * c;
        const T* __restrict xr = px + (bi * t + i) * c;
        T* __restrict d = pdx + (bi * t + i) * c;
        for (int64_t k = 0; k < c; ++k) {
          d[k] = g[k] * (T(1) + s[k]);  // d(x) term
          sh[k] += g[k];                // d(shift) term
          sc[k] = cpu::mul_add(g[k], xr[k], sc[k]);  // d(scale) term
        }
      }
    }
  });
  return {dx, dshift, dscale};
}

Tensor CpuBackend::timestep_embedding(const Tensor& t, int dim, double max_period) {
  int64_t b = t.size(0), half = dim / 2;
  Tensor y = Tensor::empty({b, static_cast<int64_t>(dim)}, t.dtype());
  cpu::dispatch_float(t.dtype(), "timestep_embedding", [&]<typename T>() {
    const T* pt = t.data<T>();
    T* py = y.data<T>();
    for (int64_t i = 0; i < b; ++i)
      for (int64_t k = 0; k < half; ++k) {
        T f = static_cast<T>(std::exp(-std::log(max_period) * static_cast<double>(k) / static_cast<double>(half)));
        py[i * dim + k] = std::cos(pt[i] * f);
        py[i * dim + half + k] = std::sin(pt[i] * f);
      }
  });
  return y;
}

Tensor CpuBackend::timestep_embedding_backward(const Tensor& dy, const Tensor& t, int dim, double max_period) {
  int64_t b = t.size(0), half = dim / 2;
  Tensor dt = Tensor::empty({b}, t.dtype());
  cpu::dispatch_float(t.dtype(), "timestep_embedding_backward", [&]<typename T>() {
    const T *pt = t.data<T>(), *pdy = dy.data<T>();
    T* pdt = dt.data<T>();
    for (int64_t i = 0; i < b; ++i) {
      T s = 0;
      for (int64_t k = 0; k < half; ++k) {
        T f = static_cast<T>(std::exp(-std::log(max_period) * static_cast<double>(k) / static_cast<double>(half)));
        s += -pdy[i * dim + k] * std::sin(pt[i] * f) * f + pdy[i * dim + half + k] * std::cos(pt[i] * f) * f;
      }
      pdt[i] = s;
    }
  });
  return dt;
}

}  // namespace remat
