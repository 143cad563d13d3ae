// CUDA kernels run on the CPU under the SIMT emulator (tests/simt_emulator.h) against
// attention computed in double from the same inputs: forward output and log-sum-exp, and the three
// gradients of the backward kernels, causal and not, with tails in every tile. The tensor-core
// kernels (attention_mma_kernels.cuh) in bf16, each head dim built; the flash kernels on CUDA cores
// (attention_flash_kernels.cuh, the reference) in f32 and f64. The row kernels (layer_norm,
// softmax, cross-entropy with ignored and bad targets: norm_softmax_kernels.cuh) against double,
// group_norm against the cpu backend, and the row kernels of attention through GEMMs
// (attention_gemm_kernels.cuh) with the GEMMs on the host.
// The other kernels (elementwise, reductions, embedding, image ops, im2col): tests/test_simt_ops.cpp.
// What a GPU adds beyond this is the hardware's own rounding and the timing (the [cuda] cases
// compare with the CPU there).
#include "simt_emulator.h"  // first: the kernels compile against its built-ins

#include <catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/attention_flash_kernels.cuh"
#include "kernels/cuda/attention_gemm_kernels.cuh"
#include "kernels/cuda/attention_mma_kernels.cuh"
#include "kernels/cuda/norm_softmax_kernels.cuh"

namespace {

namespace mma = remat::cuda::mma_attention;
namespace flash = remat::cuda::flash_attention;
namespace rows = remat::cuda::row_kernels;
namespace gemm_rows = remat::cuda::attention_gemm_kernels;
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
template <typename T>
double at(const std::vector<T>& v, size_t i) {
  return static_cast<double>(v[i]);
}

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

// The tensor-core kernels as attention_mma.cu launches them on the heads of a fused projection:
// q, k and v read where they lie in a [B, T, 3, H, D] buffer, dO and the outputs [B, T, H, D]
// (B 2 where the case's heads split evenly), with kM row tiles a warp. Returns o, lse, dq, dk and
// dv's bits, to compare across kM.
template <int D, int kM = mma::kDefaultRowTiles<D>>
std::vector<uint16_t> check_mma(const Case& c, std::mt19937& rng) {
  const int64_t heads = c.heads, t = c.t, n = heads * t * D, b = heads % 2 == 0 ? 2 : 1, h = heads / b;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<bf16> q = random_bf16(n, rng), k = random_bf16(n, rng), v = random_bf16(n, rng),
                    d_o = random_bf16(n, rng);
  auto get = [](const std::vector<bf16>& x) { return [&x](int64_t i) { return at(x, static_cast<size_t>(i)); }; };
  const Reference ref = reference(c, D, get(q), get(k), get(v), get(d_o));
  // Element i of head-major [heads, T, D] in the packed layouts: `parts` tensors side by side per token.
  auto packed = [&](int64_t i, int64_t parts, int64_t part) {
    const int64_t bh = i / (t * D), row = i / D % t, e = i % D;
    return ((bh / h * t + row) * parts + part) * h * D + bh % h * D + e;
  };
  std::vector<bf16> qkv(3 * n), d_o_packed(n), o(n), dq(n), dk(n), dv(n);
  for (int64_t i = 0; i < n; ++i) {
    qkv[packed(i, 3, 0)] = q[i], qkv[packed(i, 3, 1)] = k[i], qkv[packed(i, 3, 2)] = v[i];
    d_o_packed[packed(i, 1, 0)] = d_o[i];
  }
  const int hi = static_cast<int>(h);
  auto in = [&](int part) { return mma::Heads<const bf16>{qkv.data() + part * h * D, t * 3 * h * D, D, 3 * h * D, hi}; };
  auto out = [&](std::vector<bf16>& x) { return mma::Heads<bf16>{x.data(), t * h * D, D, h * D, hi}; };
  const mma::Heads<const bf16> dO{d_o_packed.data(), t * h * D, D, h * D, hi}, O{o.data(), t * h * D, D, h * D, hi};
  std::vector<float> lse(heads * t), row_dot(heads * t);
  remat_simt::launch(grid(t, heads, mma::kBlockRows<kM>), mma::kBlockThreads, mma::forward_shared_bytes<D, kM>(), [&] {
    mma::mma_forward_kernel<D, kM>(in(0), in(1), in(2), out(o), lse.data(), t, c.causal, scale);
  });
  remat_simt::launch({static_cast<unsigned>((heads * t + mma::kBlockThreads - 1) / mma::kBlockThreads), 1, 1},
                     mma::kBlockThreads, 0, [&] { mma::mma_row_dot_kernel<D>(dO, O, row_dot.data(), t, heads * t); });
  remat_simt::launch(grid(t, heads, mma::kBlockRows<kM>), mma::kBlockThreads, mma::dq_shared_bytes<D, kM>(), [&] {
    mma::mma_dq_kernel<D, kM>(in(0), in(1), in(2), dO, lse.data(), row_dot.data(), out(dq), t, c.causal, scale);
  });
  remat_simt::launch(grid(t, heads, mma::kBlockRows<kM>), mma::kBlockThreads, mma::dkv_shared_bytes<D, kM>(), [&] {
    mma::mma_dkv_kernel<D, kM>(in(0), in(1), in(2), dO, lse.data(), row_dot.data(), out(dk), out(dv), t, c.causal,
                           scale);
  });
  // Back to head-major order for the reference.
  auto unpacked = [&](const std::vector<bf16>& x) {
    std::vector<bf16> y(n);
    for (int64_t i = 0; i < n; ++i) y[i] = x[packed(i, 1, 0)];
    return y;
  };
  INFO("mma: B " << b << ", H " << h << ", T " << t << ", D " << D << ", " << kM << " row tiles a warp"
                 << (c.causal ? ", causal" : ""));
  // bf16 outputs (8 bits of mantissa), probabilities and dS rounded to bf16 as product inputs.
  CHECK(excess(unpacked(o), ref.o, 0.01, 0.02) <= 0);
  CHECK(excess(lse, ref.lse, 1e-4, 1e-4) <= 0);
  CHECK(excess(unpacked(dq), ref.dq, 0.01, 0.03) <= 0);
  CHECK(excess(unpacked(dk), ref.dk, 0.01, 0.03) <= 0);
  CHECK(excess(unpacked(dv), ref.dv, 0.01, 0.03) <= 0);
  std::vector<uint16_t> bits;
  auto append = [&](const void* data, size_t bytes) {
    const auto* at = static_cast<const uint16_t*>(data);
    bits.insert(bits.end(), at, at + bytes / 2);
  };
  append(lse.data(), lse.size() * sizeof(float));
  for (const auto* x : {&o, &dq, &dk, &dv}) append(x->data(), x->size() * sizeof(bf16));
  return bits;
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

template <typename T>
std::vector<T> random_vector(size_t n, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> v(n);
  for (T& x : v) x = static_cast<T>(normal(rng));
  return v;
}

// Attention through GEMMs as attention_gemm.cu runs it, the GEMMs done on the host in the
// accumulation type (f32 here) and the row kernels emulated: the masked softmax with its
// log-sum-exp, then in backward the probabilities rebuilt and dS.
void check_attention_gemm(const Case& c, int64_t d, std::mt19937& rng) {
  const int64_t heads = c.heads, t = c.t, n = heads * t * d, tt = t * t;
  const std::vector<float> q = random_vector<float>(n, rng), k = random_vector<float>(n, rng),
                           v = random_vector<float>(n, rng), d_o = random_vector<float>(n, rng);
  auto get = [](const std::vector<float>& x) { return [&x](int64_t i) { return static_cast<double>(x[i]); }; };
  const Reference ref = reference(c, d, get(q), get(k), get(v), get(d_o));
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // c[h] (t x t) = alpha a[h] b[h]^T, a and b [t, d] per head.
  auto times_transposed = [&](const std::vector<float>& a, const std::vector<float>& b, float alpha) {
    std::vector<float> out(heads * tt);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < t; ++j) {
          float s = 0;
          for (int64_t e = 0; e < d; ++e) s += a[(h * t + i) * d + e] * b[(h * t + j) * d + e];
          out[h * tt + i * t + j] = alpha * s;
        }
    return out;
  };
  // out[h] (t x d) = p[h] b[h], or p[h]^T b[h] when transposed.
  auto times = [&](const std::vector<float>& p, bool transposed, const std::vector<float>& b) {
    std::vector<float> out(n, 0.f);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < t; ++j) {
          const float pij = transposed ? p[h * tt + j * t + i] : p[h * tt + i * t + j];
          for (int64_t e = 0; e < d; ++e) out[(h * t + i) * d + e] += pij * b[(h * t + j) * d + e];
        }
    return out;
  };
  const unsigned rows_total = static_cast<unsigned>(heads * t);
  const int threads = 64;  // (attention_gemm.cu launches 256: fewer here, so that rows of 70 pass a block)
  std::vector<float> s = times_transposed(q, k, scale), p(heads * tt), lse(heads * t);
  remat_simt::launch({rows_total, 1, 1}, threads, 0, [&] {
    gemm_rows::masked_softmax_kernel<float>(s.data(), p.data(), lse.data(), t, c.causal);
  });
  const std::vector<float> o = times(p, false, v);
  std::vector<float> row_dot(heads * t, 0.f);
  for (int64_t r = 0; r < heads * t; ++r)
    for (int64_t e = 0; e < d; ++e) row_dot[r] += d_o[r * d + e] * o[r * d + e];
  const std::vector<float> dp = times_transposed(d_o, v, 1.0f);
  std::vector<float> p2(heads * tt), ds(heads * tt);
  remat_simt::launch({rows_total, 1, 1}, threads, 0, [&] {
    gemm_rows::softmax_grad_kernel<float>(s.data(), dp.data(), lse.data(), row_dot.data(), p2.data(), ds.data(), t,
                                          c.causal, scale);
  });
  INFO("attention through gemms: heads " << heads << ", T " << t << ", D " << d << (c.causal ? ", causal" : ""));
  CHECK(p2 == p);  // backward rebuilds forward's probabilities bit for bit
  const double tol = 2e-4;
  CHECK(excess(o, ref.o, tol, tol) <= 0);
  CHECK(excess(lse, ref.lse, tol, tol) <= 0);
  CHECK(excess(times(ds, false, k), ref.dq, tol, tol) <= 0);
  CHECK(excess(times(ds, true, q), ref.dk, tol, tol) <= 0);
  CHECK(excess(times(p2, true, d_o), ref.dv, tol, tol) <= 0);
}

// layer_norm forward and backward over rows x c as norm_softmax.cu launches it: a warp per row
// (kPerLane values a lane, the parameter gradients in blocks of kNormRowsPerBlock rows), or with
// kPerLane 0 a block per row (the parameter gradients in chunks of row_chunk rows).
template <typename T, int kPerLane>
void check_layer_norm(int64_t n, int64_t c, int64_t row_chunk, std::mt19937& rng, double tol) {
  using A = remat::cuda::Acc<T>;
  std::vector<T> x = random_vector<T>(n * c, rng), w = random_vector<T>(c, rng), b = random_vector<T>(c, rng),
                 dy = random_vector<T>(n * c, rng);
  const double eps = 1e-5;
  std::vector<double> y_ref(n * c), dx_ref(n * c), dw_ref(c, 0.0), db_ref(c, 0.0), mean_ref(n), rstd_ref(n);
  for (int64_t r = 0; r < n; ++r) {
    double mu = 0, var = 0;
    for (int64_t i = 0; i < c; ++i) mu += x[r * c + i];
    mu /= c;
    for (int64_t i = 0; i < c; ++i) var += (x[r * c + i] - mu) * (x[r * c + i] - mu);
    const double rs = 1.0 / std::sqrt(var / c + eps);
    mean_ref[r] = mu, rstd_ref[r] = rs;
    double s1 = 0, s2 = 0;
    for (int64_t i = 0; i < c; ++i) {
      const double xhat = (x[r * c + i] - mu) * rs, d = static_cast<double>(dy[r * c + i]) * w[i];
      y_ref[r * c + i] = xhat * w[i] + b[i];
      s1 += d, s2 += d * xhat;
      dw_ref[i] += static_cast<double>(dy[r * c + i]) * xhat;
      db_ref[i] += dy[r * c + i];
    }
    for (int64_t i = 0; i < c; ++i) {
      const double xhat = (x[r * c + i] - mu) * rs, d = static_cast<double>(dy[r * c + i]) * w[i];
      dx_ref[r * c + i] = rs * (d - s1 / c - xhat * s2 / c);
    }
  }
  std::vector<T> y(n * c), mean(n), rstd(n), dx(n * c), dw(c), db(c);
  if (kPerLane > 0) row_chunk = rows::kNormRowsPerBlock;
  const int64_t chunks = (n + row_chunk - 1) / row_chunk;
  std::vector<A> pw(chunks * c), pb(chunks * c);
  const int threads = remat::cuda::kThreads;
  if constexpr (kPerLane > 0) {
    const unsigned warps = rows::kNormWarps;
    remat_simt::launch({static_cast<unsigned>((n + warps - 1) / warps), 1, 1}, 32 * warps, 0, [&] {
      rows::layer_norm_warp_kernel<T, kPerLane>(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), n,
                                                static_cast<int>(c), static_cast<A>(eps));
    });
    remat_simt::launch({static_cast<unsigned>(chunks), 1, 1}, 32 * warps, 0, [&] {
      rows::layer_norm_backward_warp_kernel<T, kPerLane>(dy.data(), x.data(), w.data(), mean.data(), rstd.data(),
                                                         dx.data(), n, static_cast<int>(c), pw.data(), pb.data());
    });
  } else {
    remat_simt::launch({static_cast<unsigned>(n), 1, 1}, rows::kRowThreads, 0, [&] {
      rows::layer_norm_kernel<T>(x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data(), c,
                                 static_cast<A>(eps));
    });
    remat_simt::launch({static_cast<unsigned>(n), 1, 1}, rows::kRowThreads, 0, [&] {
      rows::layer_norm_dx_kernel<T>(dy.data(), x.data(), w.data(), mean.data(), rstd.data(), dx.data(), c);
    });
    remat_simt::launch({static_cast<unsigned>((c + threads - 1) / threads), static_cast<unsigned>(chunks), 1}, threads,
                       0, [&] {
                         rows::layer_norm_param_partial_kernel<T>(dy.data(), x.data(), mean.data(), rstd.data(), n, c,
                                                                  row_chunk, pw.data(), pb.data());
                       });
  }
  remat_simt::launch({static_cast<unsigned>((c + 31) / 32), 1, 1}, {32, rows::kSumSlices, 1}, 0, [&] {
    rows::sum_chunks_kernel<T>(pw.data(), pb.data(), chunks, c, dw.data(), db.data());
  });
  INFO("layer_norm in " << sizeof(T) * 8 << "-bit floats, " << n << " x " << c << ", "
                        << (kPerLane > 0 ? "a warp per row" : "a block per row") << ", chunks of " << row_chunk);
  CHECK(excess(y, y_ref, tol, tol) <= 0);
  CHECK(excess(mean, mean_ref, tol, tol) <= 0);
  CHECK(excess(rstd, rstd_ref, tol, tol) <= 0);
  CHECK(excess(dx, dx_ref, tol, tol) <= 0);
  CHECK(excess(dw, dw_ref, tol, tol) <= 0);
  CHECK(excess(db, db_ref, tol, tol) <= 0);
}

// group_norm over [n, c, hw] in groups of c / groups channels, as norm_softmax.cu launches it,
// against the cpu backend's group_norm and its backward.
void check_group_norm(int64_t n, int64_t c, int64_t hw, int groups, std::mt19937& rng) {
  remat::Backend& cpu = remat::backend_for(remat::Device::cpu());
  std::normal_distribution<double> normal(0.0, 1.0);
  auto random = [&](const remat::Shape& shape) {
    std::vector<double> v(static_cast<size_t>(remat::numel_of(shape)));
    for (double& e : v) e = normal(rng);
    return remat::Tensor::from_vector(v, shape);
  };
  const remat::Tensor x = random({n, c, hw}), w = random({c}), b = random({c}), dy = random({n, c, hw});
  const double eps = 1e-5;
  const int64_t cg = c / groups, m = cg * hw;
  std::vector<double> y(n * c * hw), mean(n * groups), rstd(n * groups), dx(n * c * hw), dw(c), db(c);
  const int threads = remat::cuda::kThreads;
  remat_simt::launch({static_cast<unsigned>(n * groups), 1, 1}, threads, 0, [&] {
    rows::group_norm_kernel<double>(x.data<double>(), w.data<double>(), b.data<double>(), y.data(), mean.data(),
                                    rstd.data(), m, hw, groups, cg, eps);
  });
  remat_simt::launch({static_cast<unsigned>(n * groups), 1, 1}, threads, 0, [&] {
    rows::group_norm_dx_kernel<double>(dy.data<double>(), x.data<double>(), w.data<double>(), mean.data(), rstd.data(),
                                       dx.data(), m, hw, groups, cg);
  });
  remat_simt::launch({static_cast<unsigned>(c), 1, 1}, threads, 0, [&] {
    rows::group_norm_param_kernel<double>(dy.data<double>(), x.data<double>(), mean.data(), rstd.data(), n, c, hw,
                                          groups, cg, dw.data(), db.data());
  });
  const std::vector<remat::Tensor> fwd = cpu.group_norm(x, w, b, groups, eps);
  const std::vector<remat::Tensor> bwd = cpu.group_norm_backward(dy, x, w, fwd[1], fwd[2], groups);
  INFO("group_norm, " << n << " x " << c << " x " << hw << " in " << groups << " groups");
  const double tol = 1e-12;
  CHECK(excess(y, fwd[0].to_vector<double>(), tol, tol) <= 0);
  CHECK(excess(mean, fwd[1].to_vector<double>(), tol, tol) <= 0);
  CHECK(excess(rstd, fwd[2].to_vector<double>(), tol, tol) <= 0);
  CHECK(excess(dx, bwd[0].to_vector<double>(), tol, tol) <= 0);
  CHECK(excess(dw, bwd[1].to_vector<double>(), tol, tol) <= 0);
  CHECK(excess(db, bwd[2].to_vector<double>(), tol, tol) <= 0);
}

template <typename T>
void check_softmax(int64_t n, int64_t c, std::mt19937& rng, double tol) {
  std::vector<T> x = random_vector<T>(n * c, rng), dy = random_vector<T>(n * c, rng);
  std::vector<double> y_ref(n * c), dx_ref(n * c);
  for (int64_t r = 0; r < n; ++r) {
    double m = -INFINITY, s = 0, dot = 0;
    for (int64_t i = 0; i < c; ++i) m = std::max(m, static_cast<double>(x[r * c + i]));
    for (int64_t i = 0; i < c; ++i) s += std::exp(x[r * c + i] - m);
    for (int64_t i = 0; i < c; ++i) y_ref[r * c + i] = std::exp(x[r * c + i] - m) / s;
    for (int64_t i = 0; i < c; ++i) dot += dy[r * c + i] * y_ref[r * c + i];
    for (int64_t i = 0; i < c; ++i) dx_ref[r * c + i] = y_ref[r * c + i] * (dy[r * c + i] - dot);
  }
  std::vector<T> y(n * c), dx(n * c);
  remat_simt::launch({static_cast<unsigned>(n), 1, 1}, rows::kRowThreads, 0,
                     [&] { rows::softmax_kernel<T>(x.data(), y.data(), c); });
  // Backward from the kernel's own y, as the op runs it.
  for (int64_t i = 0; i < n * c; ++i) y_ref[i] = static_cast<double>(y[i]);
  remat_simt::launch({static_cast<unsigned>(n), 1, 1}, rows::kRowThreads, 0,
                     [&] { rows::softmax_backward_kernel<T>(dy.data(), y.data(), dx.data(), c); });
  INFO("softmax in " << sizeof(T) * 8 << "-bit floats, " << n << " x " << c);
  CHECK(excess(dx, dx_ref, tol, tol) <= 0);
}

// Cross-entropy over n rows of v logits with int64 targets: one row ignored (ignore_index -100),
// one out of range (recorded in the fault record, then counted as ignored). The log-sum-exp and
// the loss are in the accumulation type (f32 for bf16 logits), held to `tol`; the logits' gradient
// in T, held to `grad_tol` (relative, for bf16's 8-bit mantissa).
template <typename T>
void check_cross_entropy(int64_t n, int64_t v, std::mt19937& rng, double tol, double grad_tol) {
  using A = remat::cuda::Acc<T>;
  std::vector<T> logits_t;
  if constexpr (std::is_same_v<T, bf16>) logits_t = random_bf16(n * v, rng);
  else logits_t = random_vector<T>(n * v, rng);
  std::vector<double> logits(logits_t.size());
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = at(logits_t, i);
  std::vector<int64_t> targets(n);
  for (int64_t r = 0; r < n; ++r) targets[r] = (r * 37 + 11) % v;
  // The rows as a chunk of a batch starting at row 1000 (linear_cross_entropy's calls): the fault
  // names the batch's row.
  const int64_t ignore = -100, bad_row = n - 1, first_row = 1000;
  targets[1] = ignore;
  targets[bad_row] = v + 5;
  std::vector<double> lse_ref(n), dl_ref(n * v, 0.0);
  double loss_ref = 0;
  int64_t used = 0;
  for (int64_t r = 0; r < n; ++r) {
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < v; ++j) m = std::max(m, static_cast<double>(logits[r * v + j]));
    for (int64_t j = 0; j < v; ++j) s += std::exp(logits[r * v + j] - m);
    lse_ref[r] = m + std::log(s);
    if (targets[r] >= 0 && targets[r] < v) loss_ref += lse_ref[r] - logits[r * v + targets[r]], ++used;
  }
  loss_ref /= static_cast<double>(used);
  const double dloss = 0.75;
  for (int64_t r = 0; r < n; ++r)
    if (targets[r] >= 0 && targets[r] < v)
      for (int64_t j = 0; j < v; ++j)
        dl_ref[r * v + j] = (std::exp(logits[r * v + j] - lse_ref[r]) - (j == targets[r] ? 1.0 : 0.0)) * dloss / used;
  std::vector<A> lse(n), row_loss(n), loss(1), dloss_v{static_cast<A>(dloss)};
  std::vector<T> dl(n * v);
  long long count = -1;
  remat::IndexFault fault{};
  const int threads = remat::cuda::kThreads;
  remat_simt::launch({static_cast<unsigned>(n), 1, 1}, threads, 0, [&] {
    rows::cross_entropy_rows_kernel<T>(logits_t.data(), targets.data(), true, v, ignore, first_row, lse.data(),
                                       row_loss.data(), &fault);
  });
  remat_simt::launch({1, 1, 1}, threads, 0, [&] {
    rows::cross_entropy_mean_kernel<T>(row_loss.data(), targets.data(), true, n, v, ignore, loss.data());
  });
  remat_simt::launch({1, 1, 1}, threads, 0,
                     [&] { rows::cross_entropy_count_kernel(targets.data(), true, n, v, ignore, &count); });
  remat_simt::launch({static_cast<unsigned>(n), 1, 1}, threads, 0, [&] {
    rows::cross_entropy_backward_kernel<T>(dloss_v.data(), logits_t.data(), targets.data(), true, lse.data(), v, ignore,
                                           first_row, &count, dl.data(), nullptr);
  });
  INFO("cross_entropy in " << sizeof(T) * 8 << "-bit floats, " << n << " x " << v);
  CHECK(count == used);
  CHECK(excess(lse, lse_ref, tol, tol) <= 0);
  CHECK(excess(loss, std::vector<double>{loss_ref}, tol, tol) <= 0);
  CHECK(excess(dl, dl_ref, tol, grad_tol) <= 0);
  // The bad target is recorded: the op, the value, its row, the bound.
  CHECK(fault.claimed == 1u);
  CHECK(fault.op == static_cast<int32_t>(remat::IndexFaultOp::cross_entropy));
  CHECK(fault.value == v + 5);
  CHECK(fault.position == first_row + bad_row);
  CHECK(fault.bound == v);
}

}  // namespace

TEST_CASE("the row kernels, emulated on the cpu: layer_norm, softmax, cross-entropy and group_norm",
          "[simt][norm]") {
  std::mt19937 rng(9);
  // A block per row (past 1024 channels): rows past 2 x 128 threads, three chunks of partials.
  check_layer_norm<double, 0>(5, 300, 2, rng, 1e-10);
  check_layer_norm<float, 0>(3, 40, 256, rng, 1e-4);
  // A warp per row: lanes past the row, a block's rows past the end, more chunks than slices.
  check_layer_norm<double, 24>(70, 300, 0, rng, 1e-10);
  check_layer_norm<float, 8>(300, 40, 0, rng, 1e-4);
  check_layer_norm<double, 32>(9, 1024, 0, rng, 1e-10);
  check_softmax<double>(3, 1000, rng, 1e-10);
  check_softmax<float>(2, 77, rng, 1e-5);
  check_cross_entropy<double>(6, 300, rng, 1e-10, 1e-10);
  check_cross_entropy<float>(4, 1000, rng, 1e-5, 1e-5);
  check_cross_entropy<bf16>(4, 1000, rng, 1e-5, 1e-2);  // bf16 logits as autocast passes them
  check_cross_entropy<bf16>(4, 1001, rng, 1e-5, 1e-2);  // rows off 16 bytes: one logit at a time
  check_cross_entropy<float>(3, 1001, rng, 1e-5, 1e-5);
  check_group_norm(2, 6, 37, 3, rng);    // blocks of 2 x 37 values, channel sums over 2 x 37
  check_group_norm(3, 4, 300, 1, rng);   // one group: 1200 values a block
}

namespace {

// Each lane's fragments from the tensor-core kernels' shared-tile loaders (ldmatrix) against the
// element loads they replaced, which are the PTX fragment layouts written out and which ran on an
// H200 (session 25): A [r0 + g (+8)][c0 + 2c (+8)], B = M^T [n0 + g][k0 + 2c (+8)], B = M
// [k0 + 2c (+8), + 1][n0 + g], the lower index in the low half; the B loaders fetch two fragments
// at once (k0 and k0 + 16, n0 and n0 + 8).
template <int D>
void check_fragment_loaders(std::mt19937& rng) {
  constexpr int kRows = 48, ld = mma::kLd<D>;
  alignas(16) static bf16 tile[kRows * mma::kLd<128>];
  std::vector<bf16> values = random_bf16(kRows * ld, rng);
  std::copy(values.begin(), values.end(), tile);
  auto bits = [&](int row, int col) { return static_cast<uint32_t>(__bfloat16_as_ushort(tile[row * ld + col])); };
  auto pair = [&](int row0, int col0, int row1, int col1) { return bits(row0, col0) | (bits(row1, col1) << 16); };
  struct Lane {
    uint32_t a[4], bt[4], b[4];
  };
  for (int r0 : {0, 16, 32})
    for (int c0 = 0; c0 < D; c0 += 32) {
      INFO("head dim " << D << ", tile at row " << r0 << ", column " << c0);
      std::vector<Lane> got(32);
      remat_simt::launch({1, 1, 1}, 32, 0, [&] {
        Lane& mine = got[threadIdx.x];
        mma::load_a<D>(mine.a, tile, r0, c0);
        mma::load_b_transposed_pair<D>(mine.bt, tile, r0, c0);  // n0 = r0, k0 = c0 and c0 + 16
        mma::load_b_pair<D>(mine.b, tile, r0, c0 / 2);          // k0 = r0, n0 = c0 / 2 and + 8
      });
      int wrong = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, c = 2 * (lane % 4), n0 = c0 / 2;
        const Lane& l = got[lane];
        wrong += l.a[0] != pair(r0 + g, c0 + c, r0 + g, c0 + c + 1);
        wrong += l.a[1] != pair(r0 + g + 8, c0 + c, r0 + g + 8, c0 + c + 1);
        wrong += l.a[2] != pair(r0 + g, c0 + c + 8, r0 + g, c0 + c + 9);
        wrong += l.a[3] != pair(r0 + g + 8, c0 + c + 8, r0 + g + 8, c0 + c + 9);
        for (int h = 0; h < 2; ++h) {
          const int k0 = c0 + 16 * h, n = n0 + 8 * h;
          wrong += l.bt[2 * h] != pair(r0 + g, k0 + c, r0 + g, k0 + c + 1);
          wrong += l.bt[2 * h + 1] != pair(r0 + g, k0 + c + 8, r0 + g, k0 + c + 9);
          wrong += l.b[2 * h] != pair(r0 + c, n + g, r0 + c + 1, n + g);
          wrong += l.b[2 * h + 1] != pair(r0 + c + 8, n + g, r0 + c + 9, n + g);
        }
      }
      CHECK(wrong == 0);
    }
}

}  // namespace

TEST_CASE("the tensor-core kernels' ldmatrix loaders give each lane the mma fragment layout's registers",
          "[attention][simt]") {
  std::mt19937 rng(8);
  check_fragment_loaders<32>(rng);
  check_fragment_loaders<64>(rng);
  check_fragment_loaders<128>(rng);
  // A row address off 16 bytes is refused, as the hardware requires.
  alignas(16) static bf16 tile[32 * mma::kLd<64>];
  CHECK_THROWS_WITH(remat_simt::launch({1, 1, 1}, 32, 0,
                                       [&] {
                                         uint32_t r[2];
                                         mma::ldmatrix<2, false>(r, tile + 1 + 8 * (threadIdx.x & 7));
                                       }),
                    Catch::Matchers::Contains("not 16-byte aligned"));
}

TEST_CASE("cross-entropy's row sums have the same bits whether a row is read in 16-byte packs or a value at a time",
          "[simt]") {
  std::mt19937 rng(9);
  const int64_t v = 1001;
  std::vector<bf16> values = random_bf16(v, rng);
  // The same row at the start of a buffer (aligned) and one value in (misaligned).
  std::vector<bf16> buffer(2 * v + 8);
  std::copy(values.begin(), values.end(), buffer.begin());
  std::copy(values.begin(), values.end(), buffer.begin() + v + 1);
  const bf16* rows_at[2] = {buffer.data(), buffer.data() + v + 1};
  REQUIRE(remat::cuda::aligned_for_pack(rows_at[0]));
  REQUIRE_FALSE(remat::cuda::aligned_for_pack(rows_at[1]));
  float lse[2], row_loss[2];
  const int64_t target = 17;
  for (int k = 0; k < 2; ++k)
    remat_simt::launch({1, 1, 1}, remat::cuda::kThreads, 0, [&] {
      rows::cross_entropy_rows_kernel<bf16>(rows_at[k], &target, true, v, -100, 0, &lse[k], &row_loss[k], nullptr);
    });
  CHECK(std::memcmp(&lse[0], &lse[1], sizeof(float)) == 0);
  CHECK(std::memcmp(&row_loss[0], &row_loss[1], sizeof(float)) == 0);
}

TEST_CASE("the tensor-core attention kernels, emulated on the cpu, compute attention and its gradients",
          "[attention][simt]") {
  std::mt19937 rng(7);
  check_mma<64>({4, 100, true}, rng);   // a query tile's tail, key tiles of 64 and 32; B 2, H 2
  check_mma<64>({1, 1, true}, rng);     // one row
  check_mma<128>({3, 70, false}, rng);  // the widest head, not causal; B 1, H 3
  check_mma<32>({2, 130, true}, rng);   // two blocks of 128 queries (keys), the second 2 rows long
  check_mma<64>({2, 200, true}, rng);   // a warp whose second row tile lies past T, and one all past it
  // Tiles every query of which sees every key take the unmasked path: several per block here.
  check_mma<64>({1, 256, true}, rng);
  check_mma<64>({1, 160, false}, rng);
  // One row tile a warp (REMAT_CUDA_MMA_TILES=1) gives two's bits, causal or not, tails and all.
  for (const Case& c : {Case{3, 150, true}, Case{2, 90, false}}) {
    std::mt19937 one_rng(11), two_rng(11);
    CHECK(check_mma<64, 1>(c, one_rng) == check_mma<64, 2>(c, two_rng));
    std::mt19937 one_rng32(12), two_rng32(12);
    CHECK(check_mma<32, 1>(c, one_rng32) == check_mma<32, 2>(c, two_rng32));
  }
}

TEST_CASE("the flash attention kernels, emulated on the cpu, compute attention and its gradients in f32 and f64",
          "[attention][simt]") {
  std::mt19937 rng(8);
  check_flash<double, 32>({2, 70, true}, 8, rng, 1e-10);   // gpt tiny's head dim
  check_flash<double, 64>({1, 100, false}, 33, rng, 1e-10);
  check_flash<float, 128>({1, 70, true}, 128, rng, 2e-4);
  check_flash<float, 32>({2, 33, false}, 5, rng, 2e-4);
}

TEST_CASE("attention through gemms, emulated on the cpu: the masked softmax and dS kernels", "[attention][simt]") {
  std::mt19937 rng(19);
  check_attention_gemm({2, 37, true}, 8, rng);
  check_attention_gemm({1, 70, false}, 16, rng);  // rows longer than a block of threads
}
