// "Same" convolutions at stride 1 straight from the input planes (conv_same.h says what and why):
// weights packed into panels of a tile's output channels, masked shifted loads of the planes; the
// forward and adjoint written once over the lanes of kernels/cpu/simd_lanes.h, the weight gradient
// on AVX-512 alone.
#include "kernels/cpu/conv_same.h"

#include <omp.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "kernels/cpu/simd_lanes.h"
#include "runtime/error.h"

namespace remat::cpu {

namespace {

constexpr int64_t kMaxTaps = 49;  // kernels up to 7x7 (each tile's masks live on the stack)
constexpr int64_t kGradRows = 3, kGradTaps = 9, kGradLanes = 16;  // a weight-gradient tile: 27 accumulators

}  // namespace

// 1x1 kernels stay with packed columns (kernels/cpu/image_ops.cpp): with one tap per input plane,
// each term reads a new plane, and planes 4 KiB apart (32 x 32 images) share a handful of L1 sets;
// at unet's 96 -> 32 channels on 32 x 32 images the kernel took 1.4x the columns' time.
bool conv_same_fits(int64_t kh, int64_t kw, int stride, int padding) {
  return *conv_same_isa() != '\0' && stride == 1 && kh == kw && kh >= 3 && kh % 2 == 1 && kh * kh <= kMaxTaps &&
         padding == (kh - 1) / 2;
}

// Measured at unet small's shapes on an AMD EPYC (docs/results/cpu.md, session 40): on 32 x 32
// images the kernel ran dW at 160-165 GFLOP/s against the columns' 140-145 (and 4x as fast for 3 or
// 32 -> 3 channels, where the GEMM has 3 rows); on 16 x 16 with 128 input channels the GEMM over
// the columns reached 186. Each tile's loads (3 of dy, 9 shifted of x per 27 FMAs) are its limit,
// where the GEMM streams packed panels: the kernel takes images of at least 32 x 32 whose planes
// fit L2 together, so that a pass of one image stays there.
bool conv_same_weight_grad_fits(int64_t kh, int64_t kw, int stride, int padding, int64_t h, int64_t w, int64_t cout,
                                int64_t cin) {
  return std::string_view(conv_same_isa()) == "avx512" && conv_same_fits(kh, kw, stride, padding) && kh == 3 &&
         h * w >= 1024 && (cout + cin) * h * w * 4 <= (int64_t{1} << 21);
}

int64_t conv_same_weight_grad_scratch(int64_t cout, int64_t cin) {
  const int64_t tiles = (cout + kGradRows - 1) / kGradRows * cin;
  return tiles * kGradRows * kGradTaps * kGradLanes;  // each tile's accumulators between passes
}

#ifdef REMAT_CPU_LANES

namespace {

// Output channels a tile: 2 MR accumulators, 2 vectors of the plane and a broadcast weight within
// the registers (AVX-512: 28 + 3 of 32, as remat's SGEMM; AVX2: 12 + 3 of 16).
template <class S>
constexpr int64_t kMR = S::kLanes == 16 ? 14 : 6;
template <class S>
constexpr int64_t kPixels = 2 * S::kLanes;  // pixels a tile: two vectors

template <class S>
int64_t panels(int64_t rows) {
  return (rows + kMR<S> - 1) / kMR<S>;
}

// The weights as panels of kMR output channels: for each term (input channel, tap) of their sums,
// in the order they are summed, the panel's kMR weights in a row (zeros past the last channel).
// Forward: output o, term (c, i, j) is w[o][c][i][j]. Adjoint: output c, term (o, i, j) is
// w[o][c][k-1-i][k-1-j] (dx[c] at a pixel sums dy[o] at the pixel shifted by (i, j) - padding
// against the weight that carried x there).
template <class S>
void pack_weights(const float* weight, int64_t cout, int64_t cin, int64_t k, bool adjoint, float* packed) {
  constexpr int64_t kMR = cpu::kMR<S>;
  const int64_t outs = adjoint ? cin : cout, ins = adjoint ? cout : cin, taps = k * k;
  const int64_t terms = ins * taps;
#pragma omp parallel for if (outs * terms > (int64_t{1} << 16))
  for (int64_t panel = 0; panel < panels<S>(outs); ++panel) {
    float* dst = packed + panel * terms * kMR;
    for (int64_t in = 0; in < ins; ++in)
      for (int64_t t = 0; t < taps; ++t, dst += kMR)
        for (int64_t r = 0; r < kMR; ++r) {
          const int64_t out = panel * kMR + r;
          if (out >= outs) {
            dst[r] = 0.0f;
            continue;
          }
          dst[r] = adjoint ? weight[((in * cin + out) * taps) + (taps - 1 - t)] : weight[(out * cin + in) * taps + t];
        }
  }
}

// The pixels [p0, p0 + kPixels) of one image's planes, for each tap: where the shifted plane is read
// (shift) and which lanes lie inside the image (two masks, the tile's two vectors).
template <class S>
struct TileTaps {
  int64_t shift[kMaxTaps];
  typename S::M inside[2 * kMaxTaps];
  typename S::M store[2];
};

template <class S>
TileTaps<S> tile_taps(int64_t p0, int64_t h, int64_t w, int64_t k) {
  constexpr int64_t kPixels = cpu::kPixels<S>, kLanes = S::kLanes;
  TileTaps<S> tt{};
  const int64_t pad = (k - 1) / 2;
  // Each lane's pixel, walked from p0's (one division a tile). Lanes past the image get rows from h
  // on: never stored, and what a tap reads for them lies inside the image's planes.
  int64_t row[kPixels], col[kPixels];
  for (int64_t lane = 0, y = p0 / w, x = p0 % w; lane < kPixels; ++lane) {
    row[lane] = y;
    col[lane] = x;
    if (++x == w) x = 0, ++y;
  }
  auto mask = [&](int64_t half, auto inside) {
    unsigned bits = 0;
    for (int64_t lane = 0; lane < kLanes; ++lane)
      if (inside(row[half * kLanes + lane], col[half * kLanes + lane])) bits |= 1u << lane;
    return S::from_bits(bits);
  };
  for (int64_t half = 0; half < 2; ++half) tt.store[half] = mask(half, [&](int64_t y, int64_t) { return y < h; });
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = i * k + j, dy = i - pad, dx = j - pad;
      tt.shift[t] = dy * w + dx;
      for (int64_t half = 0; half < 2; ++half)
        tt.inside[2 * t + half] = mask(half, [&](int64_t y, int64_t x) {
          return y + dy >= 0 && y + dy < h && x + dx >= 0 && x + dx < w;
        });
    }
  return tt;
}

// The first `rows` (<= MR) output channels of a panel at the tile's pixels: each a sum over the
// input channels and taps in order, of the weight times the shifted plane (zero outside the image),
// plus the bias where given. `planes` points at the tile's first pixel in input channel 0.
// Every element goes through the same operations whatever MR and rows: the same bits.
template <class S, int MR>
void tile_kernel(const float* planes, int64_t plane_size, int64_t ins, int64_t taps, const TileTaps<S>& tt,
                 const float* __restrict packed, float* out, int64_t out_plane, int64_t rows, const float* bias) {
  using V = typename S::V;
  V acc0[MR], acc1[MR];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = S::zero();
  for (int64_t c = 0; c < ins; ++c, planes += plane_size)
    for (int64_t t = 0; t < taps; ++t, packed += kMR<S>) {
      // Lanes outside the image are masked off: not read (no fault before or past the planes), zero.
      const float* src = planes + tt.shift[t];
      const V b0 = S::load(tt.inside[2 * t], src);
      const V b1 = S::load(tt.inside[2 * t + 1], src + S::kLanes);
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
        const V a = S::set1(packed[i]);
        acc0[i] = S::fmadd(a, b0, acc0[i]);
        acc1[i] = S::fmadd(a, b1, acc1[i]);
      }
    }
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
    V r0 = acc0[i], r1 = acc1[i];
    if (bias) {
      const V b = S::set1(bias[i]);
      r0 = S::add(r0, b);
      r1 = S::add(r1, b);
    }
    S::store(out + i * out_plane, tt.store[0], r0);
    S::store(out + i * out_plane + S::kLanes, tt.store[1], r1);
  }
}

// The kernel for a panel with `rows` output channels left: the full tile, or the narrowest of 2, 4
// and (AVX-512) 8 rows that holds them.
template <class S>
void tile_rows(const float* planes, int64_t plane_size, int64_t ins, int64_t taps, const TileTaps<S>& tt,
               const float* packed, float* out, int64_t out_plane, int64_t rows, const float* bias) {
  if (rows <= 2) return tile_kernel<S, 2>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
  if (rows <= 4) return tile_kernel<S, 4>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
  if constexpr (kMR<S> > 8)
    if (rows <= 8) return tile_kernel<S, 8>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
  return tile_kernel<S, kMR<S>>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
}

template <class S>
void conv_tiles(const float* in, int64_t n, int64_t h, int64_t w, const float* weight, int64_t cout, int64_t cin,
                int64_t k, bool adjoint, const float* bias, float* out, float* scratch, int threads) {
  constexpr int64_t kMR = cpu::kMR<S>, kPixels = cpu::kPixels<S>;
  const int64_t outs = adjoint ? cin : cout, ins = adjoint ? cout : cin, taps = k * k, hw = h * w;
  if (n == 0 || hw == 0 || outs == 0) return;
  pack_weights<S>(weight, cout, cin, k, adjoint, scratch);
  const int64_t tiles = (hw + kPixels - 1) / kPixels, items = n * tiles, terms = ins * taps;
  if (threads <= 0) threads = omp_get_max_threads();
  if (omp_in_parallel()) threads = 1;
  // Each thread takes whole tiles of pixels, every output channel of them: the same sums however
  // many threads there are.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t image = item / tiles, p0 = item % tiles * kPixels;
    const TileTaps<S> tt = tile_taps<S>(p0, h, w, k);
    const float* planes = in + image * ins * hw + p0;
    float* dst = out + image * outs * hw + p0;
    for (int64_t panel = 0; panel < panels<S>(outs); ++panel)
      tile_rows<S>(planes, hw, ins, taps, tt, scratch + panel * terms * kMR, dst + panel * kMR * hw, hw,
                   std::min(kMR, outs - panel * kMR), bias && !adjoint ? bias + panel * kMR : nullptr);
  }
}

}  // namespace

const char* conv_same_isa() { return BuildLanes::kName; }

int64_t conv_same_scratch(int64_t cout, int64_t cin, int64_t k, bool adjoint) {
  const int64_t outs = adjoint ? cin : cout, ins = adjoint ? cout : cin;
  return panels<BuildLanes>(outs) * kMR<BuildLanes> * ins * k * k;
}

void conv_same(const float* in, int64_t n, int64_t h, int64_t w, const float* weight, int64_t cout, int64_t cin,
               int64_t k, bool adjoint, const float* bias, float* out, float* scratch, int threads) {
  REMAT_CHECK(k >= 1 && k % 2 == 1 && k * k <= kMaxTaps, "conv_same: expected an odd kernel of at most ", kMaxTaps,
              " taps, got ", k, "x", k);
  conv_tiles<BuildLanes>(in, n, h, w, weight, cout, cin, k, adjoint, bias, out, scratch, threads);
}

#else  // no vector kernels in this build

const char* conv_same_isa() { return ""; }

int64_t conv_same_scratch(int64_t, int64_t, int64_t, bool) { return 0; }

void conv_same(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, bool, const float*,
               float*, float*, int) {
  REMAT_FAIL("conv_same: this build of remat has no vector convolution kernel (AVX-512 or AVX2 with -Dnative)");
}

#endif

#ifdef __AVX512F__

namespace {

// Images a pass of the weight gradient reads: as many as keep their dy and x planes within 2 MiB
// (in L2 while every tile of the pass reads them), at least one.
int64_t grad_images_per_pass(int64_t n, int64_t hw, int64_t cout, int64_t cin) {
  const int64_t per_image = std::max<int64_t>((cout + cin) * hw * 4, 1);
  return std::clamp<int64_t>((int64_t{1} << 21) / per_image, 1, std::max<int64_t>(n, 1));
}

// Where each tap reads and which lanes count, for every vector of 16 pixels of an image: `valid`
// the pixels inside the image, `inside` those whose shifted pixel is inside too (the rest read
// zero; lanes past the image are never read, so a non-finite x there cannot reach a sum). From
// the forward's tiles' masks, two vectors a tile.
struct GradMasks {
  int64_t shift[kGradTaps];
  std::vector<__mmask16> valid, inside;  // [vectors], [vectors][taps]
};

GradMasks grad_masks(int64_t h, int64_t w) {
  constexpr int64_t kPixels = cpu::kPixels<Avx512Lanes>;
  GradMasks gm;
  const int64_t hw = h * w, vectors = (hw + kGradLanes - 1) / kGradLanes;
  gm.valid.assign(vectors, 0);
  gm.inside.assign(vectors * kGradTaps, 0);
  for (int64_t p0 = 0; p0 < hw; p0 += kPixels) {
    const TileTaps<Avx512Lanes> tt = tile_taps<Avx512Lanes>(p0, h, w, 3);
    std::copy(tt.shift, tt.shift + kGradTaps, gm.shift);
    for (int64_t half = 0, v = p0 / kGradLanes; half < 2 && v < vectors; ++half, ++v) {
      gm.valid[v] = tt.store[half];
      for (int64_t t = 0; t < kGradTaps; ++t) gm.inside[v * kGradTaps + t] = tt.inside[2 * t + half] & tt.store[half];
    }
  }
  return gm;
}

// Adds to a tile's accumulators (R output channels from o0 x the 9 taps of input channel c, 16
// lanes each, kept in `acc` between passes; zeros first where `start`) dy's planes times x's plane
// shifted under each tap, over images [first, first + g), pixels in order.
template <int R>
void grad_tile(const float* x, const float* dy, int64_t first, int64_t g, int64_t hw, int64_t cout, int64_t cin,
               int64_t o0, int64_t c, const GradMasks& gm, float* acc, bool start) {
  __m512 sum[R][kGradTaps];
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 9
    for (int t = 0; t < kGradTaps; ++t)
      sum[r][t] = start ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (r * kGradTaps + t) * kGradLanes);
  const int64_t vectors = static_cast<int64_t>(gm.valid.size());
  for (int64_t image = first; image < first + g; ++image) {
    const float* xp = x + (image * cin + c) * hw;
    const float* dp = dy + (image * cout + o0) * hw;
    for (int64_t v = 0; v < vectors; ++v) {
      __m512 d[R];
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) d[r] = _mm512_maskz_loadu_ps(gm.valid[v], dp + r * hw + v * kGradLanes);
      const __mmask16* inside = gm.inside.data() + v * kGradTaps;
#pragma GCC unroll 9
      for (int t = 0; t < kGradTaps; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(inside[t], xp + v * kGradLanes + gm.shift[t]);
#pragma GCC unroll 3
        for (int r = 0; r < R; ++r) sum[r][t] = _mm512_fmadd_ps(d[r], xv, sum[r][t]);
      }
    }
  }
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 9
    for (int t = 0; t < kGradTaps; ++t) _mm512_storeu_ps(acc + (r * kGradTaps + t) * kGradLanes, sum[r][t]);
}

// The 16 lanes' sum in a fixed tree (halves, then quarters, ...).
float lane_tree_sum(const float* lanes) {
  float a[kGradLanes];
  std::copy(lanes, lanes + kGradLanes, a);
  for (int64_t width = kGradLanes / 2; width >= 1; width /= 2)
    for (int64_t i = 0; i < width; ++i) a[i] += a[i + width];
  return a[0];
}

}  // namespace

void conv_same_weight_grad(const float* x, const float* dy, int64_t n, int64_t h, int64_t w, int64_t cout,
                           int64_t cin, float* dw, float* scratch, int threads) {
  const int64_t hw = h * w, blocks = (cout + kGradRows - 1) / kGradRows, tiles = blocks * cin;
  if (tiles == 0) return;
  if (n == 0 || hw == 0) {
    std::fill(dw, dw + cout * cin * kGradTaps, 0.0f);
    return;
  }
  const GradMasks gm = grad_masks(h, w);  // allocated here, before any parallel region
  const int64_t per_pass = grad_images_per_pass(n, hw, cout, cin);
  if (threads <= 0) threads = omp_get_max_threads();
  if (omp_in_parallel()) threads = 1;
  // Pass by pass over the images, every tile in each pass: a tile's lanes see the images in order.
  for (int64_t first = 0; first < n; first += per_pass) {
    const int64_t g = std::min(per_pass, n - first);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t o0 = tile / cin * kGradRows, c = tile % cin, rows = std::min(kGradRows, cout - o0);
      float* acc = scratch + tile * kGradRows * kGradTaps * kGradLanes;
      if (rows == 3) grad_tile<3>(x, dy, first, g, hw, cout, cin, o0, c, gm, acc, first == 0);
      else if (rows == 2) grad_tile<2>(x, dy, first, g, hw, cout, cin, o0, c, gm, acc, first == 0);
      else grad_tile<1>(x, dy, first, g, hw, cout, cin, o0, c, gm, acc, first == 0);
    }
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t o0 = tile / cin * kGradRows, c = tile % cin, rows = std::min(kGradRows, cout - o0);
    const float* acc = scratch + tile * kGradRows * kGradTaps * kGradLanes;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < kGradTaps; ++t)
        dw[((o0 + r) * cin + c) * kGradTaps + t] = lane_tree_sum(acc + (r * kGradTaps + t) * kGradLanes);
  }
}

#else  // no AVX-512 in this build

void conv_same_weight_grad(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*,
                           int) {
  REMAT_FAIL("conv_same_weight_grad: this build of remat was not compiled for AVX-512 (meson option -Dnative on an "
             "AVX-512 CPU)");
}

#endif

}  // namespace remat::cpu
