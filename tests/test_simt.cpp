// The tensor-core attention kernels (kernels/cuda/attention_mma_kernels.cuh) run on the CPU under
// the SIMT emulator (tests/simt_emulator.h) against attention computed in double from the same
// bf16 inputs: forward output and log-sum-exp, and the three gradients of the two backward
// kernels, causal and not, each head dim built, with tails in every tile. What a GPU adds beyond
// this is the tensor core's own rounding and the timing (the [cuda] case compares them there).
#include "simt_emulator.h"  // first: the kernels compile against its built-ins

#include <catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/cuda/attention_mma_kernels.cuh"

namespace {

using namespace remat::cuda::mma_attention;

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

template <int D>
void check(const Case& c, std::mt19937& rng) {
  const int64_t heads = c.heads, t = c.t, n = heads * t * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<bf16> q = random_bf16(n, rng), k = random_bf16(n, rng), v = random_bf16(n, rng),
                    d_o = random_bf16(n, rng);
  // The reference, in double from the bf16 values.
  std::vector<double> o_ref(n), lse_ref(heads * t), dq_ref(n, 0.0), dk_ref(n, 0.0), dv_ref(n, 0.0);
  for (int64_t h = 0; h < heads; ++h) {
    const size_t base = static_cast<size_t>(h * t * D);
    for (int64_t i = 0; i < t; ++i) {
      const int64_t keys = c.causal ? i + 1 : t;
      std::vector<double> p(keys), dp(keys);
      double m = -INFINITY;
      for (int64_t j = 0; j < keys; ++j) {
        double s = 0;
        for (int e = 0; e < D; ++e) s += at(q, base + i * D + e) * at(k, base + j * D + e);
        p[j] = s * scale;
        m = std::max(m, p[j]);
      }
      double l = 0;
      for (double& x : p) l += (x = std::exp(x - m));
      for (double& x : p) x /= l;
      lse_ref[h * t + i] = m + std::log(l);
      double row_dot = 0;
      for (int e = 0; e < D; ++e) {
        double acc = 0;
        for (int64_t j = 0; j < keys; ++j) acc += p[j] * at(v, base + j * D + e);
        o_ref[base + i * D + e] = acc;
        row_dot += acc * at(d_o, base + i * D + e);
      }
      for (int64_t j = 0; j < keys; ++j) {
        double s = 0;
        for (int e = 0; e < D; ++e) s += at(d_o, base + i * D + e) * at(v, base + j * D + e);
        const double ds = p[j] * (s - row_dot) * scale;
        for (int e = 0; e < D; ++e) {
          dq_ref[base + i * D + e] += ds * at(k, base + j * D + e);
          dk_ref[base + j * D + e] += ds * at(q, base + i * D + e);
          dv_ref[base + j * D + e] += p[j] * at(d_o, base + i * D + e);
        }
      }
    }
  }
  // The kernels, as attention_mma.cu launches them.
  std::vector<bf16> o(n), dq(n), dk(n), dv(n);
  std::vector<float> lse(heads * t), row_dot(heads * t);
  const remat_simt::Dim3 query_grid{static_cast<unsigned>((t + kQueryTile - 1) / kQueryTile),
                                    static_cast<unsigned>(heads), 1};
  const remat_simt::Dim3 key_grid{static_cast<unsigned>((t + kKeyBlock - 1) / kKeyBlock),
                                  static_cast<unsigned>(heads), 1};
  remat_simt::launch(query_grid, kBlockThreads, 0, [&] {
    mma_forward_kernel<D>(q.data(), k.data(), v.data(), o.data(), lse.data(), t, c.causal, scale);
  });
  for (int64_t r = 0; r < heads * t; ++r) {  // attention_row_dots: dO . O in f32, O as stored (bf16)
    float s = 0;
    for (int e = 0; e < D; ++e) s += __bfloat162float(d_o[r * D + e]) * __bfloat162float(o[r * D + e]);
    row_dot[r] = s;
  }
  remat_simt::launch(query_grid, kBlockThreads, 0, [&] {
    mma_dq_kernel<D>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), row_dot.data(), dq.data(), t, c.causal,
                     scale);
  });
  remat_simt::launch(key_grid, kBlockThreads, dkv_shared_bytes<D>(), [&] {
    mma_dkv_kernel<D>(q.data(), k.data(), v.data(), d_o.data(), lse.data(), row_dot.data(), dk.data(), dv.data(), t,
                      c.causal, scale);
  });
  INFO("heads " << heads << ", T " << t << ", D " << D << (c.causal ? ", causal" : ""));
  // bf16 outputs (8 bits of mantissa), probabilities and dS rounded to bf16 as product inputs.
  CHECK(excess(o, o_ref, 0.01, 0.02) <= 0);
  CHECK(excess(lse, lse_ref, 1e-4, 1e-4) <= 0);
  CHECK(excess(dq, dq_ref, 0.01, 0.03) <= 0);
  CHECK(excess(dk, dk_ref, 0.01, 0.03) <= 0);
  CHECK(excess(dv, dv_ref, 0.01, 0.03) <= 0);
}

}  // namespace

TEST_CASE("the tensor-core attention kernels, emulated on the cpu, compute attention and its gradients",
          "[attention][simt]") {
  std::mt19937 rng(7);
  check<64>({2, 100, true}, rng);   // a query tile's tail, key tiles of 64 and 32
  check<64>({1, 1, true}, rng);     // one row
  check<128>({1, 70, false}, rng);  // the widest head, not causal
  check<32>({2, 130, true}, rng);   // three query tiles, five key blocks' worth of tails
}
