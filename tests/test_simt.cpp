// CUDA attention kernels run on the CPU under the SIMT emulator (tests/simt_emulator.h) against
// attention computed in double from the same inputs: forward output and log-sum-exp, and the three
// gradients of the backward kernels, causal and not, with tails in every tile. The tensor-core
// kernels (attention_mma_kernels.cuh) in bf16, each head dim built; the flash kernels on CUDA cores
// (attention_flash_kernels.cuh, the reference) in f32 and f64. What a GPU adds beyond this is the
// hardware's own rounding and the timing (the [cuda] cases compare the paths there).
#include "simt_emulator.h"  // first: the kernels compile against its built-ins

#include <catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cuda/attention_flash_kernels.cuh"
#include "kernels/cuda/attention_mma_kernels.cuh"

namespace {

namespace mma = remat::cuda::mma_attention;
namespace flash = remat::cuda::flash_attention;
using mma::bf16;

struct Case {
  int64_t heads, t;
  bool causal;
};

std::vector<bf16> random_bf16(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<bf16> v(n);
  for (bf16& x : v) x = __float2bfloat16(normal(rng));
  return v;
}

double at(const std::vector<bf16>& v, size_t i) { return static_cast<double>(__bfloat162float(v[i])); }

// The worst excess of |got - want| over atol * max|want| + rtol * |want| (0: within tolerance).
template <typename Got>
double excess(const std::vector<Got>& got, const std::vector<double>& want, double atol, double rtol) {
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    double g;
    if constexpr (std::is_same_v<Got, bf16>) g = static_cast<double>(__bfloat162float(got[i]));
    else g = static_cast<double>(got[i]);
    worst = std::max(worst, std::abs(g - want[i]) - (atol * scale + rtol * std::abs(want[i])));
  }
  return worst;
}

// Attention and its gradients in double, [heads, T, D] each (d_o the output's gradient).
struct Reference {
  std::vector<double> o, lse, dq, dk, dv;
};

template <typename Get>
Reference reference(const Case& c, int64_t d, Get q, Get k, Get v, Get d_o) {
  const int64_t heads = c.heads, t = c.t, n = heads * t * d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Reference r{std::vector<double>(n), std::vector<double>(heads * t), std::vector<double>(n, 0.0),
              std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t base = h * t * d;
    for (int64_t i = 0; i < t; ++i) {
      const int64_t keys = c.causal ? i + 1 : t;
      std::vector<double> p(keys);
      double m = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) {
        double s = 0;
        for (int64_t e = 0; e < d; ++e) s += q(base + i * d + e) * k(base + j * d + e);
        p[j] = s * scale;
        m = std::max(m, p[j]);
      }
      double l = 0;
      for (double& x : p) l += (x = std::exp(x - m));
      for (double& x : p) x /= l;
      r.lse[h * t + i] = m + std::log(l);
      double row_dot = 0;
      for (int64_t e = 0; e < d; ++e) {
        double acc = 0;
        for (int64_t j = 0; j < keys; ++j) acc += p[j] * v(base + j * d + e);
        r.o[base + i * d + e] = acc;
        row_dot += acc * d_o(base + i * d + e);
      }
      for (int64_t j = 0; j < keys; ++j) {
        double s = 0;
        for (int64_t e = 0; e < d; ++e) s += d_o(base + i * d + e) * v(base + j * d + e);
        const double ds = p[j] * (s - row_dot) * scale;
        for (int64_t e = 0; e < d; ++e) {
          r.dq[base + i * d + e] += ds * k(base + j * d + e);
          r.dk[base + j * d + e] += ds * q(base + i * d + e);
          r.dv[base + j * d + e] += p[j] * d_o(base + i * d + e);
        }
      }
    }
  }
  return r;
}

remat_simt::Dim3 grid(int64_t t, int64_t heads, int rows_per_block) {
  return {static_cast<unsigned>((t + rows_per_block - 1) / rows_per_block), static_cast<unsigned>(heads), 1};
}

template <int D>
void check_mma(const Case& c, std::mt19937& rng) {
  const int64_t heads = c.heads, t = c.t, n = heads * t * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<bf16> q = random_bf16(n, rng), k = random_bf16(n, rng), v = random_bf16(n, rng),
                    d_o = random_bf16(n, rng);
  auto get = [](const std::vector<bf16>& x) { return [&x](int64_t i) { return at(x, static_cast<size_t>(i)); }; };
  const Reference ref = reference(c, D, get(q), get(k), get(v), get(d_o));
  // The kernels, as attention_mma.cu launches them.
  std::vector<bf16> o(n), dq(n), dk(n), dv(n);
  std::vector<float> lse(heads * t), row_dot(heads * t);
  remat_simt::launch(grid(t, heads, mma::kQueryTile), mma::kBlockThreads, 0, [&] {
    mma::mma_forward_kernel<D>(q.data(), k.data(), v.data(), o.data(), lse.data(), t, c.causal, scale);
  });
  for (int64_t r = 0; r < heads * t; ++r) {  // attention_row_dots: dO . O in f32, O as stored (bf16)
    float s = 0;
    for (int e = 0; e < D; ++e) s += __bfloat162float(d_o[r * D + e]) * __bfloat162float(o[r * D + e]);
    row_dot[r] = s;
  }
  remat_simt::launch(grid(t, heads, mma::kQueryTile), mma::kBlockThreads, 0, [&] {
    mma::mma_dq_kernel<D>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), row_dot.data(), dq.data(), t,
                          c.causal, scale);
  });
  remat_simt::launch(grid(t, heads, mma::kKeyBlock), mma::kBlockThreads, mma::dkv_shared_bytes<D>(), [&] {
    mma::mma_dkv_kernel<D>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), row_dot.data(), dk.data(),
                           dv.data(), t, c.causal, scale);
  });
  INFO("mma: heads " << heads << ", T " << t << ", D " << D << (c.causal ? ", causal" : ""));
  // bf16 outputs (8 bits of mantissa), probabilities and dS rounded to bf16 as product inputs.
  CHECK(excess(o, ref.o, 0.01, 0.02) <= 0);
  CHECK(excess(lse, ref.lse, 1e-4, 1e-4) <= 0);
  CHECK(excess(dq, ref.dq, 0.01, 0.03) <= 0);
  CHECK(excess(dk, ref.dk, 0.01, 0.03) <= 0);
  CHECK(excess(dv, ref.dv, 0.01, 0.03) <= 0);
}

// The flash kernels in T (float or double) with the register width DMAX >= d, as attention.cu
// launches them.
template <typename T, int DMAX>
void check_flash(const Case& c, int d, std::mt19937& rng, double tol) {
  const int64_t heads = c.heads, t = c.t, n = heads * t * d;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> q(n), k(n), v(n), d_o(n);
  for (auto* x : {&q, &k, &v, &d_o})
    for (T& e : *x) e = static_cast<T>(normal(rng));
  auto get = [](const std::vector<T>& x) { return [&x](int64_t i) { return static_cast<double>(x[i]); }; };
  const Reference ref = reference(c, d, get(q), get(k), get(v), get(d_o));
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d)));
  constexpr int kTile = flash::kTile<T>;
  std::vector<T> o(n), dq(n), dk(n), dv(n), lse(heads * t), row_dot(heads * t);
  remat_simt::launch(grid(t, heads, flash::kRows), flash::kRows, 2 * kTile * d * sizeof(T), [&] {
    flash::attention_forward_kernel<T, DMAX>(q.data(), k.data(), v.data(), o.data(), lse.data(), t, d, c.causal,
                                             scale);
  });
  remat_simt::launch({2, 1, 1}, 64, 0, [&] {
    flash::attention_row_dot_kernel<T>(d_o.data(), o.data(), row_dot.data(), heads * t, d);
  });
  remat_simt::launch(grid(t, heads, flash::kRows), flash::kRows, 2 * kTile * d * sizeof(T), [&] {
    flash::attention_dq_kernel<T, DMAX>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), row_dot.data(),
                                        dq.data(), t, d, c.causal, scale);
  });
  remat_simt::launch(grid(t, heads, flash::kRows), flash::kRows, (2 * kTile * d + 2 * kTile) * sizeof(T), [&] {
    flash::attention_dkv_kernel<T, DMAX>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), row_dot.data(),
                                         dk.data(), dv.data(), t, d, c.causal, scale);
  });
  INFO("flash in " << sizeof(T) * 8 << "-bit floats: heads " << heads << ", T " << t << ", D " << d
                   << (c.causal ? ", causal" : ""));
  CHECK(excess(o, ref.o, tol, tol) <= 0);
  CHECK(excess(lse, ref.lse, tol, tol) <= 0);
  CHECK(excess(dq, ref.dq, tol, tol) <= 0);
  CHECK(excess(dk, ref.dk, tol, tol) <= 0);
  CHECK(excess(dv, ref.dv, tol, tol) <= 0);
}

}  // namespace

TEST_CASE("the tensor-core attention kernels, emulated on the cpu, compute attention and its gradients",
          "[attention][simt]") {
  std::mt19937 rng(7);
  check_mma<64>({2, 100, true}, rng);   // a query tile's tail, key tiles of 64 and 32
  check_mma<64>({1, 1, true}, rng);     // one row
  check_mma<128>({1, 70, false}, rng);  // the widest head, not causal
  check_mma<32>({2, 130, true}, rng);   // three query tiles, five key blocks' worth of tails
}

TEST_CASE("the flash attention kernels, emulated on the cpu, compute attention and its gradients in f32 and f64",
          "[attention][simt]") {
  std::mt19937 rng(8);
  check_flash<double, 32>({2, 70, true}, 8, rng, 1e-10);   // gpt tiny's head dim
  check_flash<double, 64>({1, 100, false}, 33, rng, 1e-10);
  check_flash<float, 128>({1, 70, true}, 128, rng, 2e-4);
  check_flash<float, 32>({2, 33, false}, 5, rng, 2e-4);
}
