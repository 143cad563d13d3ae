// "Same" convolutions at stride 1 on AVX-512 straight from the input planes (conv_avx512.h says
// what and why): weights packed into 14-row panels, masked shifted loads of the planes.
#include "kernels/cpu/conv_avx512.h"

#include <omp.h>

#include <algorithm>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "runtime/error.h"

namespace remat::cpu {

namespace {

constexpr int64_t kMR = 14;       // output channels a tile (28 accumulators, as remat's SGEMM)
constexpr int64_t kPixels = 32;   // pixels a tile: two vectors
constexpr int64_t kMaxTaps = 49;  // kernels up to 7x7 (each tile's masks live on the stack)
int64_t panels(int64_t rows) { return (rows + kMR - 1) / kMR; }

}  // namespace

// 1x1 kernels stay with packed columns (kernels/cpu/image_ops.cpp): with one tap per input plane,
// each term reads a new plane, and planes 4 KiB apart (32 x 32 images) share a handful of L1 sets;
// at unet's 96 -> 32 channels on 32 x 32 images the kernel took 1.4x the columns' time.
bool conv_same_avx512_fits(int64_t kh, int64_t kw, int stride, int padding) {
  return conv_same_avx512_built() && stride == 1 && kh == kw && kh >= 3 && kh % 2 == 1 && kh * kh <= kMaxTaps &&
         padding == (kh - 1) / 2;
}

int64_t conv_same_avx512_scratch(int64_t cout, int64_t cin, int64_t k, bool adjoint) {
  const int64_t outs = adjoint ? cin : cout, ins = adjoint ? cout : cin;
  return panels(outs) * kMR * ins * k * k;
}

#ifdef __AVX512F__

namespace {

// The weights as panels of kMR output channels: for each term (input channel, tap) of their sums,
// in the order they are summed, the panel's kMR weights in a row (zeros past the last channel).
// Forward: output o, term (c, i, j) is w[o][c][i][j]. Adjoint: output c, term (o, i, j) is
// w[o][c][k-1-i][k-1-j] (dx[c] at a pixel sums dy[o] at the pixel shifted by (i, j) - padding
// against the weight that carried x there).
void pack_weights(const float* weight, int64_t cout, int64_t cin, int64_t k, bool adjoint, float* packed) {
  const int64_t outs = adjoint ? cin : cout, ins = adjoint ? cout : cin, taps = k * k;
  const int64_t terms = ins * taps;
#pragma omp parallel for if (outs * terms > (int64_t{1} << 16))
  for (int64_t panel = 0; panel < panels(outs); ++panel) {
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

// The pixels [p0, p0 + 32) of one image's planes, for each tap: where the shifted plane is read
// (shift) and which lanes lie inside the image (two masks, the tile's two vectors).
struct TileTaps {
  int64_t shift[kMaxTaps];
  __mmask16 inside[2 * kMaxTaps];
  __mmask16 store[2];
};

TileTaps tile_taps(int64_t p0, int64_t h, int64_t w, int64_t k) {
  TileTaps tt{};
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
    for (int64_t lane = 0; lane < 16; ++lane)
      if (inside(row[half * 16 + lane], col[half * 16 + lane])) bits |= 1u << lane;
    return static_cast<__mmask16>(bits);
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
template <int MR>
void tile_kernel(const float* planes, int64_t plane_size, int64_t ins, int64_t taps, const TileTaps& tt,
                 const float* __restrict packed, float* out, int64_t out_plane, int64_t rows, const float* bias) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < ins; ++c, planes += plane_size)
    for (int64_t t = 0; t < taps; ++t, packed += kMR) {
      // Lanes outside the image are masked off: not read (no fault before or past the planes), zero.
      const float* src = planes + tt.shift[t];
      const __m512 b0 = _mm512_maskz_loadu_ps(tt.inside[2 * t], src);
      const __m512 b1 = _mm512_maskz_loadu_ps(tt.inside[2 * t + 1], src + 16);
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_set1_ps(packed[i]);
        acc0[i] = _mm512_fmadd_ps(a, b0, acc0[i]);
        acc1[i] = _mm512_fmadd_ps(a, b1, acc1[i]);
      }
    }
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    if (i >= rows) break;
    __m512 r0 = acc0[i], r1 = acc1[i];
    if (bias) {
      const __m512 b = _mm512_set1_ps(bias[i]);
      r0 = _mm512_add_ps(r0, b);
      r1 = _mm512_add_ps(r1, b);
    }
    _mm512_mask_storeu_ps(out + i * out_plane, tt.store[0], r0);
    _mm512_mask_storeu_ps(out + i * out_plane + 16, tt.store[1], r1);
  }
}

// The kernel for a panel with `rows` output channels left: the full tile, or the narrowest of 2, 4
// and 8 rows that holds them.
void tile_rows(const float* planes, int64_t plane_size, int64_t ins, int64_t taps, const TileTaps& tt,
               const float* packed, float* out, int64_t out_plane, int64_t rows, const float* bias) {
  if (rows <= 2) return tile_kernel<2>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
  if (rows <= 4) return tile_kernel<4>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
  if (rows <= 8) return tile_kernel<8>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
  return tile_kernel<kMR>(planes, plane_size, ins, taps, tt, packed, out, out_plane, rows, bias);
}

}  // namespace

bool conv_same_avx512_built() { return true; }

void conv_same_avx512(const float* in, int64_t n, int64_t h, int64_t w, const float* weight, int64_t cout,
                      int64_t cin, int64_t k, bool adjoint, const float* bias, float* out, float* scratch, int threads) {
  REMAT_CHECK(k >= 1 && k % 2 == 1 && k * k <= kMaxTaps, "conv_same_avx512: expected an odd kernel of at most ",
              kMaxTaps, " taps, got ", k, "x", k);
  const int64_t outs = adjoint ? cin : cout, ins = adjoint ? cout : cin, taps = k * k, hw = h * w;
  if (n == 0 || hw == 0 || outs == 0) return;
  pack_weights(weight, cout, cin, k, adjoint, scratch);
  const int64_t tiles = (hw + kPixels - 1) / kPixels, items = n * tiles, terms = ins * taps;
  if (threads <= 0) threads = omp_get_max_threads();
  if (omp_in_parallel()) threads = 1;
  // Each thread takes whole tiles of pixels, every output channel of them: the same sums however
  // many threads there are.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t image = item / tiles, p0 = item % tiles * kPixels;
    const TileTaps tt = tile_taps(p0, h, w, k);
    const float* planes = in + image * ins * hw + p0;
    float* dst = out + image * outs * hw + p0;
    for (int64_t panel = 0; panel < panels(outs); ++panel)
      tile_rows(planes, hw, ins, taps, tt, scratch + panel * terms * kMR, dst + panel * kMR * hw, hw,
                std::min(kMR, outs - panel * kMR), bias && !adjoint ? bias + panel * kMR : nullptr);
  }
}

#else  // no AVX-512 in this build

bool conv_same_avx512_built() { return false; }

void conv_same_avx512(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, bool,
                      const float*, float*, float*, int) {
  REMAT_FAIL("conv_same_avx512: this build of remat was not compiled for AVX-512 (meson option -Dnative on an "
             "AVX-512 CPU)");
}

#endif

}  // namespace remat::cpu
