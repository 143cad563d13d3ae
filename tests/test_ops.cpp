// Forward values of every op family against hand-computed or independently computed references,
// and the input validation messages.
#include <algorithm>
#include <catch.hpp>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <omp.h>

#include "autograd/graph.h"
#include "runtime/philox.h"
#include "kernels/backend.h"
#include "kernels/cpu/attention_heads.h"
#include "kernels/cpu/conv_same.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/lane_sums.h"
#include "kernels/cpu/sgemm_avx512.h"
#include "kernels/cpu/vector_math.h"
#include "remat.h"

using namespace remat;
using Catch::Matchers::Contains;

namespace {

std::vector<double> values(const Tensor& t) { return t.to_vector<double>(); }

void check_close(const Tensor& got, const std::vector<double>& want, double tol = 1e-12) {
  auto g = values(got);
  REQUIRE(g.size() == want.size());
  for (size_t i = 0; i < g.size(); ++i) CHECK(g[i] == Approx(want[i]).margin(tol));
}

Tensor f64(std::vector<double> v, Shape s) { return Tensor::from_vector(v, s); }

}  // namespace

TEST_CASE("elementwise ops compute the textbook values", "[op]") {
  Tensor a = f64({1, -2, 3, 0.5}, {2, 2});
  Tensor b = f64({10, 20}, {2});
  check_close(add(a, b), {11, 18, 13, 20.5});
  check_close(sub(a, b), {-9, -22, -7, -19.5});
  check_close(mul(a, b), {10, -40, 30, 10});
  check_close(div(a, b), {0.1, -0.1, 0.3, 0.025});
  check_close(a * 2.0 + 1.0, {3, -3, 7, 2});
  check_close(pow_scalar(f64({2, 3}, {2}), 3), {8, 27});
  check_close(relu(a), {1, 0, 3, 0.5});
  check_close(sigmoid(f64({0}, {1})), {0.5});
  check_close(rsqrt(f64({4}, {1})), {0.5});
  double x = 0.7;
  double gelu_ref = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
  check_close(gelu(f64({x}, {1})), {gelu_ref});
  check_close(silu(f64({x}, {1})), {x / (1 + std::exp(-x))});
}

TEST_CASE("pow_scalar squares as x * x and keeps x^1 as x, forward and backward, to the bit", "[op]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  manual_seed(14);
  std::vector<float> v = Tensor::randn({1000}).to_vector<float>();
  v.insert(v.end(), {0.0f, -0.0f, inf, -inf, nan, 3e19f, -3e-23f});
  const int64_t n = static_cast<int64_t>(v.size());
  std::vector<float> g = Tensor::randn({n}).to_vector<float>();
  for (float e : {2.0f, 1.0f}) {
    INFO("exponent " << e);
    Tensor x = Tensor::from_vector(v, {n}).set_requires_grad(true);
    Tensor y = pow_scalar(x, e);
    backward(y, Tensor::from_vector(g, {n}));
    std::vector<float> got = y.to_vector<float>(), dx = x.grad().to_vector<float>();
    for (int64_t i = 0; i < n; ++i) {
      const float want = e == 2.0f ? v[i] * v[i] : v[i], want_dx = e == 2.0f ? g[i] * 2.0f * v[i] : g[i] * 1.0f;
      INFO("x " << v[i]);
      CHECK((std::memcmp(&got[i], &want, 4) == 0 || (std::isnan(got[i]) && std::isnan(want))));
      CHECK((std::memcmp(&dx[i], &want_dx, 4) == 0 || (std::isnan(dx[i]) && std::isnan(want_dx))));
    }
  }
  // Other exponents keep libm's pow.
  CHECK(pow_scalar(Tensor::from_vector(std::vector<float>{2.0f}, {1}), 0.5).to_vector<float>()[0] ==
        std::pow(2.0f, 0.5f));
}

TEST_CASE("f32 transcendentals are within a few ulp of f64 and do not depend on position", "[op]") {
  // The f32 CPU kernels use Eigen's packet math; compare with the f64 kernels (libm) on a sweep.
  std::vector<double> sweep;
  for (int i = 0; i < 2003; ++i) sweep.push_back(-12.0 + 24.0 * i / 2002.0);  // odd length: a padded tail
  Tensor x64 = Tensor::from_vector(sweep, {2003}), x32 = x64.to(DType::f32);
  struct Fn {
    const char* name;
    std::function<Tensor(const Tensor&)> f;
    double tol;  // relative, with an absolute floor of tol
  };
  Backend& cpu = backend_for(Device::cpu());
  std::vector<Fn> fns = {
      {"exp", [](const Tensor& t) { return exp(mul_scalar(t, 0.5)); }, 2e-6},
      {"tanh", [](const Tensor& t) { return tanh(t); }, 2e-6},
      {"gelu", [](const Tensor& t) { return gelu(t); }, 2e-6},
      {"silu", [](const Tensor& t) { return silu(t); }, 2e-6},
      {"sigmoid", [](const Tensor& t) { return sigmoid(t); }, 2e-6},
      {"gelu backward", [&](const Tensor& t) { return cpu.unary_backward(UnaryFn::gelu, Tensor::full(t.shape(), 0.75, t.dtype()), t, Tensor(), 0); }, 4e-6},
      {"silu backward", [&](const Tensor& t) { return cpu.unary_backward(UnaryFn::silu, Tensor::full(t.shape(), 0.75, t.dtype()), t, Tensor(), 0); }, 4e-6},
  };
  for (const Fn& fn : fns) {
    INFO(fn.name);
    std::vector<double> want = fn.f(x64).to_vector<double>(), got = fn.f(x32).to_vector<double>();
    for (size_t i = 0; i < want.size(); ++i) {
      INFO("x = " << sweep[i]);
      CHECK(got[i] == Approx(want[i]).epsilon(fn.tol).margin(fn.tol));
    }
    // The same values at other positions (body vs padded tail, other alignment) give the same bits.
    Tensor shifted = slice(x32, 0, 5, 2003).as_contiguous();
    std::vector<float> a = fn.f(x32).to_vector<float>(), b = fn.f(shifted).to_vector<float>();
    for (size_t i = 0; i < b.size(); ++i) CHECK(a[i + 5] == b[i]);
  }
  // The ends: exp(-inf) is exactly 0 (masks rely on it), overflow is inf, NaN stays NaN.
  float inf = std::numeric_limits<float>::infinity();
  Tensor ends = Tensor::from_vector<float>({-inf, -200.0f, -90.0f, 100.0f, inf, std::nanf("")}, {6});
  std::vector<float> e = exp(ends).to_vector<float>();
  CHECK(e[0] == 0.0f);
  CHECK(e[1] == 0.0f);
  CHECK(e[2] < 1e-38f);
  CHECK(e[3] == inf);
  CHECK(e[4] == inf);
  CHECK(std::isnan(e[5]));
  std::vector<float> s = sigmoid(ends).to_vector<float>();
  CHECK(s[0] == 0.0f);
  CHECK(s[4] == 1.0f);
  std::vector<float> th = tanh(ends).to_vector<float>();
  CHECK(th[0] == -1.0f);
  CHECK(th[4] == 1.0f);
}

TEST_CASE("reductions over axes with and without keepdim", "[op]") {
  Tensor x = f64({1, 2, 3, 4, 5, 6}, {2, 3});
  check_close(sum(x), {21});
  check_close(sum(x, {0}), {5, 7, 9});
  CHECK(sum(x, {1}, true).shape() == Shape{2, 1});
  check_close(mean(x, {1}), {2, 5});
  check_close(max(x, {0}), {4, 5, 6});
  check_close(max(f64({3, 7, 7, 1}, {4})), {7});
  CHECK_THROWS_WITH(sum(x, {2}), Contains("sum: expected an axis in [-2, 2), got 2"));
  CHECK_THROWS_WITH(sum(x, {1, -1}), Contains("listed twice"));
}

// A run's sum in kernels/cpu/lane_sums.h's order: element i into lane i mod 16, the lanes pairwise.
float lane_sum_reference(const float* x, int64_t n) {
  float lanes[16] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i % 16] += x[i];
  for (int w = 8; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  return lanes[0];
}

// sum(x)'s order over a run of contiguous inputs (the reduced axes are the last ones): pieces of
// 8192 from the run's start, each in lanes, the pieces one after another (kernels/cpu/reduce.cpp).
float run_sum_reference(const float* x, int64_t n) {
  constexpr int64_t kPiece = 8192;
  float total = lane_sum_reference(x, std::min(n, kPiece));
  for (int64_t begin = kPiece; begin < n; begin += kPiece)
    total += lane_sum_reference(x + begin, std::min(kPiece, n - begin));
  return total;
}

TEST_CASE("sum adds each output's inputs in a fixed order, to the bit, on every axis set", "[op]") {
  // Reduced axes followed by kept ones add x[.., r, ..] for r = 0, 1, ... starting from zero (the
  // row-at-a-time path for adjacent axes and the general one agree), which a naive f32 loop
  // reproduces exactly; the last axes (a run of contiguous inputs per output) sum in lanes.
  Shape shape{3, 37, 5, 70};
  manual_seed(11);
  Tensor x = Tensor::randn(shape, DType::f32);
  std::vector<float> v = x.to_vector<float>();
  Strides strides = contiguous_strides(shape);
  for (std::vector<int64_t> axes : std::vector<std::vector<int64_t>>{
           {0}, {1}, {2}, {3}, {0, 1}, {1, 2}, {2, 3}, {0, 1, 2}, {1, 2, 3}, {0, 2}, {1, 3}, {0, 1, 2, 3}}) {
    Tensor s = sum(x, axes, true);
    std::vector<bool> reduced(4, false);
    for (int64_t a : axes) reduced[a] = true;
    Shape out_shape = shape;
    for (int64_t a : axes) out_shape[a] = 1;
    REQUIRE(s.shape() == out_shape);
    std::vector<float> expected(numel_of(out_shape), 0.0f);
    if (reduced[3] && axes.size() == static_cast<size_t>(4 - axes.front())) {  // the last axes
      int64_t run = numel_of(shape) / numel_of(out_shape);
      for (size_t o = 0; o < expected.size(); ++o) expected[o] = run_sum_reference(v.data() + o * run, run);
    } else {
      Strides out_strides = contiguous_strides(out_shape);
      // Row-major over the input: for each output, its inputs arrive in increasing reduced index.
      for (int64_t i0 = 0; i0 < shape[0]; ++i0)
        for (int64_t i1 = 0; i1 < shape[1]; ++i1)
          for (int64_t i2 = 0; i2 < shape[2]; ++i2)
            for (int64_t i3 = 0; i3 < shape[3]; ++i3) {
              int64_t idx[4] = {i0, i1, i2, i3}, in = 0, out = 0;
              for (int d = 0; d < 4; ++d) {
                in += idx[d] * strides[d];
                out += (reduced[d] ? 0 : idx[d]) * out_strides[d];
              }
              expected[out] += v[in];
            }
    }
    INFO("axes " << shape_str(Shape(axes.begin(), axes.end())));
    CHECK(s.to_vector<float>() == expected);
  }
}

TEST_CASE("sum over the last axes: pieces in lanes, the same bits on one thread and on two", "[op]") {
  // Runs shorter than a piece, one piece and a tail, many pieces (the whole tensor: a loss's mean).
  manual_seed(12);
  for (Shape shape : std::vector<Shape>{{5, 3}, {3, 8200}, {2, 70001}, {1, 1}, {4, 0}}) {
    Tensor x = Tensor::randn(shape, DType::f32);
    std::vector<float> v = x.to_vector<float>();
    const int64_t rows = shape[0], run = shape[1];
    std::vector<float> rows_expected(rows);
    for (int64_t r = 0; r < rows; ++r) rows_expected[r] = run_sum_reference(v.data() + r * run, run);
    INFO("shape " << shape_str(shape));
    CHECK(sum(x, {1}).to_vector<float>() == rows_expected);
    const float all = run_sum_reference(v.data(), static_cast<int64_t>(v.size()));
    CHECK(static_cast<float>(sum(x).item()) == all);
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    std::vector<float> one_thread = sum(x, {1}).to_vector<float>();
    const double all_one = sum(x).item();
    omp_set_num_threads(threads);
    CHECK(one_thread == rows_expected);
    CHECK(static_cast<float>(all_one) == all);
  }
  // f64 takes the same path: its mean of a million ones is exact.
  CHECK(mean(Tensor::ones({1000, 1000}, DType::f64)).item() == 1.0);
}

TEST_CASE("shape ops produce views where cheap and the right values", "[op]") {
  Tensor x = Tensor::arange(6, DType::f64);
  Tensor m = reshape(x, {2, 3});
  CHECK(m.storage() == x.storage());
  Tensor t = transpose(m, 0, 1);
  CHECK(t.shape() == Shape{3, 2});
  check_close(contiguous(t), {0, 3, 1, 4, 2, 5});
  check_close(slice(m, 1, 1, 3), {1, 2, 4, 5});
  check_close(concat({m, m}, 0), {0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5});
  auto parts = split(m, 1, {1, 2});
  check_close(parts[0], {0, 3});
  check_close(parts[1], {1, 2, 4, 5});
  check_close(expand(f64({1, 2}, {2, 1}), {2, 3}), {1, 1, 1, 2, 2, 2});
  CHECK(reshape(m, {-1}).shape() == Shape{6});
  CHECK_THROWS_WITH(reshape(m, {4, 2}), Contains("reshape: expected 6 elements (from [2,3]), got shape [4,2]"));
  CHECK_THROWS_WITH(slice(m, 1, 2, 5), Contains("slice: expected 0 <= start <= end <= 3"));
  CHECK_THROWS_WITH(concat({m, x}, 0), Contains("concat: expected shapes equal except along axis 0"));
  CHECK_THROWS_WITH(permute(m, {0, 0}), Contains("listed twice"));
  CHECK_THROWS_WITH(expand(m, {3, 3}), Contains("expand: cannot expand [2,3] to [3,3]"));
}

TEST_CASE("concat copies large parts in parallel pieces, every element where it belongs", "[op]") {
  // Above 1 MiB the CPU copies run in parallel, rows of 128 KiB and more in several pieces: a
  // part's rows, one long row (nothing before the axis), and odd byte counts (2-byte elements).
  struct Case {
    Shape a, b;
    int64_t axis;
    DType dtype;
  };
  const Case cases[] = {{{300, 1000}, {300, 41000}, 1, DType::f32},
                        {{1, 300001}, {1, 5}, 1, DType::f32},
                        {{3, 70001}, {2, 70001}, 0, DType::f32},
                        {{2, 5, 100001}, {2, 3, 100001}, 1, DType::bf16}};
  for (const Case& c : cases) {
    INFO(shape_str(c.a) << " and " << shape_str(c.b) << " along axis " << c.axis);
    // Distinct values exact in the dtype (bf16: below 256), a different sequence in each part.
    auto values = [&](const Shape& shape, int64_t salt) {
      const int64_t n = numel_of(shape);
      std::vector<float> v(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i)
        v[static_cast<size_t>(i)] = static_cast<float>(c.dtype == DType::bf16 ? (i * 7 + salt) % 251 : i * 3 + salt);
      return Tensor::from_vector(v, shape).to(c.dtype);
    };
    Tensor a = values(c.a, 1), b = values(c.b, 2);
    Tensor joined = concat({a, b}, c.axis).to(DType::f32);
    std::vector<float> va = a.to(DType::f32).to_vector<float>(), vb = b.to(DType::f32).to_vector<float>();
    std::vector<float> expected;
    int64_t outer = 1, inner = 1;
    for (int64_t d = 0; d < c.axis; ++d) outer *= c.a[static_cast<size_t>(d)];
    for (size_t d = static_cast<size_t>(c.axis) + 1; d < c.a.size(); ++d) inner *= c.a[d];
    const int64_t ra = c.a[static_cast<size_t>(c.axis)] * inner, rb = c.b[static_cast<size_t>(c.axis)] * inner;
    for (int64_t o = 0; o < outer; ++o) {
      expected.insert(expected.end(), va.begin() + o * ra, va.begin() + (o + 1) * ra);
      expected.insert(expected.end(), vb.begin() + o * rb, vb.begin() + (o + 1) * rb);
    }
    const std::vector<float> got = joined.to_vector<float>();
    REQUIRE(got.size() == expected.size());
    const auto wrong = std::mismatch(got.begin(), got.end(), expected.begin()).first;  // printed, not the vectors
    CHECK(wrong - got.begin() == static_cast<std::ptrdiff_t>(got.size()));
  }
}

TEST_CASE("matmul matches a naive triple loop for every transpose combination", "[op][matmul]") {
  manual_seed(1);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      Tensor a = Tensor::randn(ta ? Shape{2, 5, 3} : Shape{2, 3, 5}, DType::f64);
      Tensor b = Tensor::randn(tb ? Shape{2, 4, 5} : Shape{2, 5, 4}, DType::f64);
      Tensor c = matmul(a, b, ta, tb);
      REQUIRE(c.shape() == Shape{2, 3, 4});
      auto A = values(a), B = values(b), C = values(c);
      for (int n = 0; n < 2; ++n)
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 4; ++j) {
            double ref = 0;
            for (int k = 0; k < 5; ++k) {
              double av = ta ? A[n * 15 + k * 3 + i] : A[n * 15 + i * 5 + k];
              double bv = tb ? B[n * 20 + j * 5 + k] : B[n * 20 + k * 4 + j];
              ref += av * bv;
            }
            CHECK(C[n * 12 + i * 4 + j] == Approx(ref).margin(1e-12));
          }
    }
  CHECK_THROWS_WITH(matmul(Tensor::zeros({8, 16}), Tensor::zeros({32, 4})),
                    Contains("matmul: expected a.shape[-1] == b.shape[-2], got [8,16] x [32,4]"));
  CHECK_THROWS_WITH(matmul(Tensor::zeros({8, 16}), Tensor::zeros({16, 4}, DType::f64)),
                    Contains("matmul: expected tensors of the same dtype"));
}

TEST_CASE("the CPU GEMM through each of its libraries matches a naive loop", "[op][matmul][gemm]") {
  // Every library this build has (OpenBLAS, remat's AVX-512 SGEMM, Eigen), whichever this process
  // chose: transposes, padded leading dimensions, alpha and beta, odd sizes and sizes past the
  // libraries' blocking (the AVX-512 SGEMM's blocks are 224 rows, 1024 columns, 512 deep), f32 and f64.
  const std::vector<std::string> libraries = cpu::gemm_libraries();
  manual_seed(3);
  for (const std::string& library : libraries) {
    cpu::set_gemm_library(library);
    CHECK(cpu::gemm_library().rfind(library, 0) == 0);
    CHECK(cpu::gemm_libraries().front() == library);
    for (auto [m, n, k] : {std::tuple{1, 1, 1}, {7, 5, 3}, {37, 53, 29}, {130, 70, 300}, {240, 530, 600}, {30, 1060, 520}})
      for (bool ta : {false, true})
        for (bool tb : {false, true}) {
          const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 5;
          std::vector<double> a = values(Tensor::randn({(ta ? k : m) * lda}, DType::f64)),
                              b = values(Tensor::randn({(tb ? n : k) * ldb}, DType::f64)),
                              c0 = values(Tensor::randn({m * ldc}, DType::f64));
          std::vector<float> af(a.begin(), a.end()), bf(b.begin(), b.end()), cf(c0.begin(), c0.end());
          std::vector<double> cd = c0;
          const double alpha = 0.75, beta = -0.5;
          cpu::gemm<double>(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, cd.data(), ldc);
          cpu::gemm<float>(ta, tb, m, n, k, static_cast<float>(alpha), af.data(), lda, bf.data(), ldb,
                           static_cast<float>(beta), cf.data(), ldc);
          double worst64 = 0, worst32 = 0;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
              double ref = 0;
              for (int64_t p = 0; p < k; ++p)
                ref += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
              ref = alpha * ref + beta * c0[i * ldc + j];
              worst64 = std::max(worst64, std::abs(cd[i * ldc + j] - ref));
              worst32 = std::max(worst32, std::abs(static_cast<double>(cf[i * ldc + j]) - ref));
            }
          INFO(library << " m " << m << " n " << n << " k " << k << " ta " << ta << " tb " << tb);
          // Sums of k products of N(0,1) values: errors grow like sqrt(k) ulps of sqrt(k).
          CHECK(worst64 < 1e-13 * (k + 1));
          CHECK(worst32 < 1e-5 * (k + 1));
          bool padding_untouched = true;  // the ldc padding of C keeps its old values
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = n; j < ldc; ++j)
              padding_untouched = padding_untouched && cd[i * ldc + j] == c0[i * ldc + j] &&
                                  cf[i * ldc + j] == static_cast<float>(c0[i * ldc + j]);
          CHECK(padding_untouched);
        }
  }
  // auto: remat's AVX-512 SGEMM wherever it is built (f64 beside it on the BLAS or Eigen), else the BLAS.
  cpu::set_gemm_library("auto");
  CHECK((cpu::gemm_library().rfind("avx512 (f64: ", 0) == 0) == cpu::sgemm_avx512_built());
  cpu::set_gemm_library(libraries.front());
  CHECK_THROWS_WITH(cpu::set_gemm_library("mkl"),
                    Contains("set_gemm_library: expected auto, avx512, openblas or eigen, got 'mkl'"));
}

TEST_CASE("the AVX-512 SGEMM gives the same bits for any thread count, and never reads C when beta is 0",
          "[op][matmul][gemm]") {
  if (!cpu::sgemm_avx512_built()) {
    CHECK_THROWS_WITH(cpu::set_gemm_library("avx512"), Contains("not compiled for AVX-512"));
    WARN("this build has no AVX-512 SGEMM");
    return;
  }
  manual_seed(4);
  // Row splits (n <= m) and column splits, with tiles at the edges of each thread's share.
  for (auto [m, n, k] : {std::tuple{200, 90, 600}, {45, 700, 260}, {1000, 1000, 64}, {1100, 1050, 40}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        std::vector<float> a = Tensor::randn({m * k}).to_vector<float>(), b = Tensor::randn({k * n}).to_vector<float>();
        auto product = [&](int threads) {
          std::vector<float> c(static_cast<size_t>(m * n), std::numeric_limits<float>::quiet_NaN());
          const int64_t lda = ta ? m : k, ldb = tb ? k : n;
          cpu::sgemm_avx512(ta, tb, m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, c.data(), n, threads);
          return c;
        };
        const std::vector<float> one = product(1);
        INFO("m " << m << " n " << n << " k " << k << " ta " << ta << " tb " << tb);
        CHECK(std::none_of(one.begin(), one.end(), [](float v) { return std::isnan(v); }));
        for (int threads : {2, 3, 7})
          CHECK(std::memcmp(product(threads).data(), one.data(), one.size() * sizeof(float)) == 0);
      }
}

TEST_CASE("the AVX-512 SGEMM gives a row of C the same bits whatever rows the product has", "[op][matmul][gemm]") {
  if (!cpu::sgemm_avx512_built()) {
    WARN("this build has no AVX-512 SGEMM");
    return;
  }
  // A block's last panel of rows runs a narrower kernel (2, 4 or 8 rows) where few rows are left;
  // the rows it computes must equal the same rows computed in a full 14-row panel (70 rows: five).
  manual_seed(8);
  const int64_t n = 45, k = 600, full = 70;  // k past one block of depth (512): beta and bias apply once
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      std::vector<float> a = Tensor::randn({full * k}).to_vector<float>();
      std::vector<float> b = Tensor::randn({k * n}).to_vector<float>(), bias = Tensor::randn({n}).to_vector<float>();
      std::vector<float> c0 = Tensor::randn({full * n}).to_vector<float>();
      auto product = [&](int64_t m, bool with_bias) {
        std::vector<float> c(c0.begin(), c0.begin() + m * n);
        // With ta, op(A)'s first m rows are the first m columns of a [k, full] matrix.
        cpu::sgemm_avx512(ta, tb, m, n, k, 0.5f, a.data(), ta ? full : k, b.data(), tb ? k : n,
                          with_bias ? 1.0f : -2.0f, c.data(), n, 1, with_bias ? bias.data() : nullptr);
        return c;
      };
      for (bool with_bias : {false, true}) {
        const std::vector<float> reference = product(full, with_bias);
        for (int64_t m : {1, 2, 3, 4, 5, 8, 9, 13, 16, 18, 22, 32, 64}) {
          INFO("m " << m << " ta " << ta << " tb " << tb << " bias " << with_bias);
          CHECK(std::memcmp(product(m, with_bias).data(), reference.data(), m * n * sizeof(float)) == 0);
        }
      }
    }
}

TEST_CASE("gemm_bias gives the bits of the bias copied into C and a GEMM with beta 1, on every library",
          "[op][matmul][gemm]") {
  manual_seed(6);
  const std::vector<std::string> libraries = cpu::gemm_libraries();
  // Row and column splits, edge tiles, and k beyond one block of the AVX-512 SGEMM (512): there the
  // bias goes in with the first block only.
  for (const std::string& library : libraries) {
    cpu::set_gemm_library(library);
    for (auto [m, n, k] : {std::tuple{200, 90, 600}, {45, 700, 260}, {33, 47, 1}, {1000, 1000, 64}})
      for (bool ta : {false, true})
        for (bool tb : {false, true}) {
          std::vector<float> a = Tensor::randn({m * k}).to_vector<float>(),
                             b = Tensor::randn({k * n}).to_vector<float>(), bias = Tensor::randn({n}).to_vector<float>();
          const int64_t lda = ta ? m : k, ldb = tb ? k : n, ldc = n + 3;  // padding after each row of C
          std::vector<float> fused(static_cast<size_t>(m * ldc), -7.0f), copied = fused;
          cpu::gemm_bias(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, bias.data(), fused.data(), ldc);
          for (int64_t i = 0; i < m; ++i) std::copy(bias.begin(), bias.end(), copied.begin() + i * ldc);
          cpu::gemm(ta, tb, m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 1.0f, copied.data(), ldc);
          INFO(library << " m " << m << " n " << n << " k " << k << " ta " << ta << " tb " << tb);
          CHECK(std::memcmp(fused.data(), copied.data(), fused.size() * sizeof(float)) == 0);
          // Not a GEMM without the bias: it was added.
          std::vector<float> plain(fused.size(), -7.0f);
          cpu::gemm(ta, tb, m, n, k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, plain.data(), ldc);
          CHECK(fused[0] != plain[0]);
        }
  }
  cpu::set_gemm_library(libraries.front());
}

TEST_CASE("linear equals matmul with the transposed weight plus bias", "[op][linear]") {
  manual_seed(2);
  Tensor x = Tensor::randn({2, 3, 4}, DType::f64), w = Tensor::randn({5, 4}, DType::f64), b = Tensor::randn({5}, DType::f64);
  Tensor ref = add(matmul(x, w, false, true), b);
  check_close(linear(x, w, b), values(ref));
  CHECK_THROWS_WITH(linear(x, Tensor::zeros({5, 3}, DType::f64)), Contains("linear: expected x[..., I] and weight[O, I]"));
}

TEST_CASE("layer_norm normalises each row to zero mean and unit variance", "[op][layer_norm]") {
  manual_seed(3);
  Tensor x = Tensor::randn({4, 16}, DType::f64);
  Tensor y = layer_norm(x, Tensor::ones({16}, DType::f64), Tensor::zeros({16}, DType::f64), 1e-5);
  auto v = values(y), xv = values(x);
  for (int r = 0; r < 4; ++r) {
    double m = 0, var = 0, xm = 0, xvar = 0;
    for (int i = 0; i < 16; ++i) xm += xv[r * 16 + i] / 16;
    for (int i = 0; i < 16; ++i) xvar += (xv[r * 16 + i] - xm) * (xv[r * 16 + i] - xm) / 16;
    for (int i = 0; i < 16; ++i) m += v[r * 16 + i] / 16;
    for (int i = 0; i < 16; ++i) var += (v[r * 16 + i] - m) * (v[r * 16 + i] - m) / 16;
    CHECK(m == Approx(0).margin(1e-12));
    CHECK(var == Approx(xvar / (xvar + 1e-5)).epsilon(1e-12));
  }
  CHECK_THROWS_WITH(layer_norm(x, Tensor::ones({8}, DType::f64), Tensor::zeros({8}, DType::f64)),
                    Contains("layer_norm: expected weight and bias of shape [16]"));
}

TEST_CASE("layer_norm in f32: f64's values to rounding, and the same bits on 1 and 2 threads", "[op][layer_norm]") {
  // The CPU kernel's row sums run in 16 interleaved lanes and its parameter gradients in runs of
  // 64 channels (kernels/cpu/norm_softmax.cpp): widths that are and are not whole runs and lanes,
  // enough rows to split among threads.
  Backend& cpu = backend_for(Device::cpu());
  manual_seed(21);
  const int threads = omp_get_max_threads();
  for (int64_t c : {5, 16, 37, 256, 300}) {
    const int64_t rows = 24576 / c + 3;
    Tensor x = Tensor::randn({rows, c}), w = Tensor::randn({c}), b = Tensor::randn({c}), dy = Tensor::randn({rows, c});
    auto run = [&](const Tensor& xx, const Tensor& ww, const Tensor& bb, const Tensor& gg, int n) {
      omp_set_num_threads(n);
      std::vector<Tensor> f = cpu.layer_norm(xx, ww, bb, 1e-5, xx.dtype());
      std::vector<Tensor> g = cpu.layer_norm_backward(gg, xx, ww, f[1], f[2], Tensor());
      omp_set_num_threads(threads);
      return std::vector<Tensor>{f[0], f[1], f[2], g[0], g[1], g[2]};  // y, mean, rstd, dx, dw, db
    };
    const auto one = run(x, w, b, dy, 1), two = run(x, w, b, dy, 2);
    const auto exact = run(x.to(DType::f64), w.to(DType::f64), b.to(DType::f64), dy.to(DType::f64), threads);
    for (size_t i = 0; i < one.size(); ++i) {
      INFO("c " << c << " output " << i << " (y, mean, rstd, dx, dw, db)");
      const std::vector<double> f = values(one[i]), e = values(exact[i]);
      CHECK(f == values(two[i]));
      // dw and db sum over every row: their rounding grows with the rows' count
      const double tol = i >= 4 ? 2e-7 * static_cast<double>(rows) : 1e-5;
      double worst = 0;
      for (size_t j = 0; j < f.size(); ++j) worst = std::max(worst, std::abs(f[j] - e[j]) / (1 + std::abs(e[j])));
      CHECK(worst < tol);
    }
  }
}

TEST_CASE("layer_norm for a GEMM under autocast returns the compute dtype: the cast's bits, forward and backward",
          "[op][layer_norm][autocast]") {
  manual_seed(61);
  // The CPU keeps bf16 as storage only: both paths round (or widen, for f64) through a cast here;
  // the CUDA suite checks bf16's own kernels.
  const Tensor x0 = Tensor::randn({6, 40}), w0 = Tensor::randn({40}), b0 = Tensor::randn({40});
  for (DType compute : {DType::f64, DType::bf16}) {
    INFO(dtype_name(compute));
    const Tensor dy = Tensor::randn({6, 40}).to(compute);
    auto run = [&](AutocastOutput output) {
      Tensor x = x0.clone().set_requires_grad(true), w = w0.clone().set_requires_grad(true);
      Tensor b = b0.clone().set_requires_grad(true), y;
      {
        AutocastScope autocast(compute);
        y = layer_norm(x, w, b, 1e-5, output);
        // The f32 output, cast as a GEMM's autocast would cast it.
        if (output == AutocastOutput::f32) y = cast(y, compute);
      }
      CHECK(y.dtype() == compute);
      backward(y, dy);
      return std::vector<std::vector<double>>{values(y.to(DType::f64)), values(x.grad().to(DType::f64)),
                                              values(w.grad().to(DType::f64)), values(b.grad().to(DType::f64))};
    };
    CHECK(run(AutocastOutput::compute) == run(AutocastOutput::f32));
  }
  // Outside autocast, and for f64 x under it, x's dtype.
  CHECK(layer_norm(x0, w0, b0, 1e-5, AutocastOutput::compute).dtype() == DType::f32);
  AutocastScope autocast(DType::bf16);
  const Tensor x64 = x0.to(DType::f64), w64 = w0.to(DType::f64), b64 = b0.to(DType::f64);
  CHECK(layer_norm(x64, w64, b64, 1e-5, AutocastOutput::compute).dtype() == DType::f64);
}

TEST_CASE("layer_norm adds dx into a gradient it alone holds, with the engine's bits and one tensor less",
          "[autograd][layer_norm]") {
  manual_seed(65);
  const Tensor x0 = Tensor::randn({64, 512}), w = Tensor::randn({512}), b = Tensor::randn({512});
  const Tensor dy = Tensor::randn({64, 512});
  // A pre-norm residual step, y = h + dropout(layer_norm(h)): backward gives h the residual's
  // gradient first, then layer_norm's dx. Unless something else holds the first (here grad()
  // keeping y's gradient, which the residual passes on as it is), layer_norm adds into it.
  auto run = [&](bool keep_y_grad) {
    Tensor x = x0.clone().set_requires_grad(true);
    Tensor h = mul_scalar(x, 1.0);  // a value of the graph (a leaf's gradient is summed apart)
    set_rng_state({5, 1});
    Tensor y = dropout_add(layer_norm(h, w, b), h, 0.2);
    reset_peak_memory();
    const int64_t start = memory_stats().total.current;
    // mul_scalar: y's gradient a tensor of its own, not dy.
    std::vector<Tensor> g = keep_y_grad ? grad(mul_scalar(y, 1.0), {x, y}, dy) : grad(mul_scalar(y, 1.0), {x}, dy);
    return std::pair{values(g[0]), memory_stats().total.peak - start};
  };
  auto [added_in, peak_in] = run(false);
  auto [added_after, peak_after] = run(true);
  CHECK((added_in == added_after));  // not expanded: tens of thousands of values
  // The engine's sum is not made; layer_norm's dw and db (not wanted here, so let go before the
  // engine's addition) are alive at the peak of the run that adds into the gradient.
  CHECK(peak_after - peak_in == static_cast<int64_t>(x0.nbytes() - 2 * w.nbytes()));
}

TEST_CASE("softmax rows sum to one and match exp(x)/sum(exp(x))", "[op][softmax]") {
  Tensor x = f64({1, 2, 3, -1, 0, 1000}, {2, 3});
  auto y = values(softmax(x));
  double z = std::exp(1) + std::exp(2) + std::exp(3);
  CHECK(y[0] == Approx(std::exp(1) / z));
  CHECK(y[5] == Approx(1.0));  // stable for large inputs
  CHECK(y[3] + y[4] + y[5] == Approx(1.0));
}

TEST_CASE("softmax and cross_entropy take a row's maximum and exp sum in lanes, to the bit", "[op][softmax]") {
  manual_seed(13);
  for (int64_t n : {1, 5, 16, 17, 100, 1000, 4099}) {
    INFO("row of " << n);
    Tensor x = mul_scalar(Tensor::randn({3, n}, DType::f32), 3.0);
    std::vector<float> v = x.to_vector<float>();
    v[2 * n + n - 1] = 40.0f;  // the last row's maximum in its tail lane
    x = Tensor::from_vector(v, {3, n});
    std::vector<float> want_softmax(v.size()), rows_lse(3);
    for (int64_t r = 0; r < 3; ++r) {
      const float* row = v.data() + r * n;
      const float mx = *std::max_element(row, row + n);
      CHECK(cpu::lane_max(row, n) == mx);
      std::vector<float> exps(n);
      cpu::exp_shifted(row, mx, exps.data(), n);  // an element's exp depends on it alone
      const float sum = lane_sum_reference(exps.data(), n);
      CHECK(cpu::sum_exp_shifted(row, mx, n) == sum);
      for (int64_t i = 0; i < n; ++i) want_softmax[r * n + i] = exps[i] / sum;
      rows_lse[r] = mx + std::log(sum);
    }
    CHECK(softmax(x).to_vector<float>() == want_softmax);
    Tensor targets = Tensor::from_vector(std::vector<int64_t>{0, n / 2, n - 1}, {3});
    float total = 0.0f;  // cross_entropy's mean adds the rows' losses in row order
    for (int64_t r = 0; r < 3; ++r) total += rows_lse[r] - v[r * n + targets.to_vector<int64_t>()[r]];
    CHECK(static_cast<float>(cross_entropy(x, targets).item()) == total / 3.0f);
    // One thread computes the same bits as two.
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    std::vector<float> one_thread = softmax(x).to_vector<float>();
    omp_set_num_threads(threads);
    CHECK(one_thread == want_softmax);
  }
  // NaNs are passed over as a running maximum passes over them; -inf gives probability 0.
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<float> row{nan, 1.0f, -inf, 7.0f, nan, 2.0f, -3.0f, 6.5f, 0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 6.9f, 6.8f};
  CHECK(cpu::lane_max(row.data(), static_cast<int64_t>(row.size())) == 7.0f);
  CHECK(cpu::lane_max(row.data(), 0) == -inf);
  std::vector<float> p = softmax(Tensor::from_vector(std::vector<float>{-inf, 0.0f, -inf, 0.0f}, {4})).to_vector<float>();
  CHECK(p == std::vector<float>{0.0f, 0.5f, 0.0f, 0.5f});
}

TEST_CASE("fused attention equals the naive softmax(QK^T * scale)V", "[op][attention]") {
  manual_seed(4);
  for (bool causal : {false, true}) {
    Tensor q = Tensor::randn({2, 3, 7, 5}, DType::f64), k = Tensor::randn({2, 3, 7, 5}, DType::f64),
           v = Tensor::randn({2, 3, 7, 5}, DType::f64);
    double scale = 1.0 / std::sqrt(5.0);
    Tensor s = mul_scalar(matmul(q, k, false, true), scale);
    if (causal) {
      std::vector<double> mask(49);
      for (int i = 0; i < 7; ++i)
        for (int j = 0; j < 7; ++j) mask[i * 7 + j] = j > i ? -1e300 : 0.0;
      s = add(s, f64(mask, {7, 7}));
    }
    Tensor ref = matmul(softmax(s), v);
    check_close(attention(q, k, v, causal), values(ref), 1e-12);
  }
  CHECK_THROWS_WITH(attention(Tensor::zeros({2, 3, 4}), Tensor::zeros({2, 3, 4}), Tensor::zeros({2, 3, 4}), true),
                    Contains("attention: expected q, k, v of one shape [B, H, T, D]"));
}

TEST_CASE("attention reads the heads of a fused projection in place and its output merges without a copy",
          "[op][attention]") {
  // The heads as views of one [B, T, 3C] projection against the same values as contiguous leaves:
  // the same bits forward and backward, and on CPU o merges back to [B, T, C] as a view.
  const int64_t b = 2, t = 9, h = 3, d = 4, c = h * d;
  manual_seed(8);
  for (bool causal : {false, true}) {
    Tensor qkv = Tensor::randn({b, t, 3 * c}, DType::f64).set_requires_grad(true);
    Tensor upstream = Tensor::randn({b, t, c}, DType::f64);
    auto parts = split(qkv, 2, {c, c, c});
    auto to_heads = [&](const Tensor& m) { return permute(reshape(m, {b, t, h, d}), {0, 2, 1, 3}); };
    Tensor o = attention(to_heads(parts[0]), to_heads(parts[1]), to_heads(parts[2]), causal);
    Tensor merged = reshape(permute(o, {0, 2, 1, 3}), {b, t, c});
    CHECK(merged.storage() == o.storage());
    backward(sum(mul(merged, upstream)));

    std::vector<Tensor> dense;
    for (const Tensor& p : parts) dense.push_back(to_heads(p).as_contiguous().set_requires_grad(true));
    Tensor o2 = attention(dense[0], dense[1], dense[2], causal);
    CHECK(values(o2) == values(o));
    backward(sum(mul(reshape(permute(o2, {0, 2, 1, 3}), {b, t, c}), upstream)));
    // qkv's gradient, read head by head, is the dense leaves' gradients.
    for (int64_t i = 0; i < 3; ++i) {
      Tensor part = qkv.grad().view({b, t, c}, {t * 3 * c, 3 * c, 1}, i * c);
      auto hv = values(permute(reshape(part.as_contiguous(), {b, t, h, d}), {0, 2, 1, 3}));
      CHECK(hv == values(dense[static_cast<size_t>(i)].grad()));
    }
  }
}

TEST_CASE("f32 attention on the vector kernels: the Eigen path's values, the same bits twice, strided heads",
          "[op][attention]") {
  // kernels/cpu/attention_heads.cpp (AVX-512 or AVX2, whichever the build has) against
  // attention.cpp's Eigen path (REMAT_CPU_ATTENTION=eigen): head dims of one to eight vectors,
  // lengths that are and are not whole vectors, q, k, v as the heads of one [B, T, 3C] projection
  // as gpt hands them. f64 never takes the kernels (test_gradcheck's cases).
  const std::string isa = cpu::attention_kernels_isa();
  if (isa.empty()) {
    CHECK_FALSE(cpu::attention_kernels_fit(32));
    CHECK(cpu::attention_path() == "eigen");
    WARN("this build has no vector attention kernels");
    return;
  }
  const int64_t lanes = isa == "avx512" ? 16 : 8;
  CHECK(cpu::attention_kernels_fit(lanes));
  CHECK(cpu::attention_kernels_fit(128));
  CHECK_FALSE(cpu::attention_kernels_fit(lanes + 4));
  CHECK_FALSE(cpu::attention_kernels_fit(lanes / 2));
  CHECK_FALSE(cpu::attention_kernels_fit(264));
  CHECK_THROWS_WITH(cpu::set_attention_path("fast"),
                    Contains("set_attention_path: expected auto or eigen, got 'fast'"));
  cpu::set_attention_path("eigen");
  CHECK(cpu::attention_path() == "eigen");
  cpu::set_attention_path("auto");
  CHECK(cpu::attention_path() == isa + " kernels");
  Backend& cpu = backend_for(Device::cpu());
  manual_seed(12);
  int differing = 0;  // the outputs whose bits differ from Eigen's somewhere: the kernels ran
  for (auto [t, d] : {std::pair<int64_t, int64_t>{1, 16}, {5, 32}, {16, 16}, {17, 48}, {100, 32}, {128, 64}, {33, 128},
                      {7, 8}, {31, 24}})
    for (bool causal : {false, true}) {
      if (!cpu::attention_kernels_fit(d)) continue;  // 8 and 24 are whole vectors on AVX2 alone
      const int64_t b = 2, h = 3, c = h * d;
      Tensor qkv = Tensor::randn({b, t, 3 * c});
      auto head = [&](int64_t i) { return qkv.view({b, h, t, d}, {t * 3 * c, d, 3 * c, 1}, i * c); };
      Tensor q = head(0), k = head(1), v = head(2), d_o = Tensor::randn({b, h, t, d});
      const double scale = 1 / std::sqrt(static_cast<double>(d));
      auto run = [&](const char* path) {
        cpu::set_attention_path(path);
        CHECK(cpu::attention_kernels_chosen(d) == (std::string(path) == "auto"));
        std::vector<Tensor> out = cpu.attention(q, k, v, causal, scale);
        std::vector<Tensor> grads = cpu.attention_backward(d_o, q, k, v, out[0], out[1], causal, scale);
        out.insert(out.end(), grads.begin(), grads.end());
        return out;  // o, lse, dq, dk, dv
      };
      const std::vector<Tensor> fast = run("auto"), again = run("auto"), eigen = run("eigen");
      for (size_t i = 0; i < fast.size(); ++i) {
        INFO("t " << t << " d " << d << " causal " << causal << " output " << i << " (o, lse, dq, dk, dv)");
        const std::vector<double> f = values(fast[i]), e = values(eigen[i]);
        CHECK(f == values(again[i]));
        double worst = 0;
        for (size_t j = 0; j < f.size(); ++j) worst = std::max(worst, std::abs(f[j] - e[j]) / (1 + std::abs(e[j])));
        CHECK(worst < 1e-5);
        differing += f != e;
      }
    }
  CHECK(differing > 0);
  cpu::set_attention_path("auto");
}

TEST_CASE("dropout draws its mask from philox (seed, offset) and scales the kept values", "[op][dropout]") {
  manual_seed(5);
  RngState start = rng_state();
  Tensor x = Tensor::ones({1000}, DType::f64);
  auto y = values(dropout(x, 0.25));
  int kept = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    uint32_t bits = philox::bits_at(start.seed, start.offset, i);
    bool keep = philox::uniform_from_bits(bits) >= 0.25f;
    CHECK(y[i] == (keep ? 1.0 / 0.75 : 0.0));
    kept += keep;
  }
  CHECK(kept > 700);
  CHECK(kept < 800);
  CHECK(values(dropout(x, 0.25, /*training=*/false)) == values(x));
  CHECK_THROWS_WITH(dropout(x, 1.0), Contains("dropout: expected 0 <= p < 1, got 1"));
}

TEST_CASE("dropout_add is add(residual, dropout(x)) in one node: the same mask, bits and random stream",
          "[op][dropout]") {
  manual_seed(63);
  const Tensor x0 = Tensor::randn({5, 300}), r0 = Tensor::randn({5, 300}), dy = Tensor::randn({5, 300});
  // Values, both gradients and the stream's offset after, and the ops the tape recorded.
  auto run = [&](bool fused, const Tensor& r_src, bool training = true) {
    Tensor x = x0.clone().set_requires_grad(true), r = r_src.clone().set_requires_grad(true);
    set_rng_state({41, 7});
    Tensor y = fused ? dropout_add(x, r, 0.3, training) : add(r, training ? dropout(x, 0.3) : x);
    const double offset = static_cast<double>(rng_state().offset);
    std::vector<std::string> ops;
    for (const auto& node : std::static_pointer_cast<Graph>(y.autograd_meta_ptr()->graph)->nodes)
      ops.push_back(node->name());
    backward(y, dy);
    return std::pair{std::vector<std::vector<double>>{values(y), values(x.grad()), values(r.grad()), {offset}}, ops};
  };
  auto [fused, fused_ops] = run(true, r0);
  CHECK(fused == run(false, r0).first);
  CHECK(fused_ops == std::vector<std::string>{"dropout_add"});
  CHECK(std::count(fused[0].begin(), fused[0].end(), 0.0) == 0);  // y is not x's dropout alone
  // A residual that broadcasts runs as the two ops; eval mode is the addition.
  const Tensor row = Tensor::randn({300});
  auto [broadcast, broadcast_ops] = run(true, row);
  CHECK(broadcast == run(false, row).first);
  CHECK(broadcast_ops == std::vector<std::string>{"dropout", "add"});
  CHECK(run(true, r0, false) == run(false, r0, false));
  CHECK_THROWS_WITH(dropout_add(x0, r0, 1.0), Contains("dropout_add: expected 0 <= p < 1, got 1"));
}

TEST_CASE("embedding gathers rows and rejects out-of-range ids", "[op][embedding]") {
  Tensor w = f64({0, 1, 10, 11, 20, 21}, {3, 2});
  Tensor idx = Tensor::from_vector<int64_t>({2, 0, 2}, {3});
  check_close(embedding(idx, w), {20, 21, 0, 1, 20, 21});
  CHECK_THROWS_WITH(embedding(Tensor::from_vector<int64_t>({3}, {1}), w),
                    Contains("embedding: expected indices in [0, 3), got 3"));
  CHECK_THROWS_WITH(embedding(w, w), Contains("embedding: expected indices of dtype i32 or i64"));
}

TEST_CASE("embedding's backward adds each id's gradients in token order, to the bit", "[op][embedding]") {
  // 3000 tokens over 700 ids (repeats, ids never drawn), i32 and i64 ids: each row of dW equals a
  // naive loop that adds the tokens' rows in token order, starting from zero.
  manual_seed(15);
  const int64_t vocab = 700, c = 37, n = 3000;
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = (i * i * 7 + i * 13) % 523 + (i % 3 == 0 ? 150 : 0);
  Tensor dy = Tensor::randn({3, n / 3, c});
  std::vector<float> g = dy.to_vector<float>(), want(vocab * c, 0.0f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) want[ids[i] * c + j] += g[i * c + j];
  for (DType index_dtype : {DType::i64, DType::i32}) {
    Tensor idx = Tensor::from_vector(ids, {3, n / 3}).to(index_dtype);
    Tensor w = Tensor::randn({vocab, c}).set_requires_grad(true);
    backward(embedding(idx, w), dy);
    CHECK(w.grad().to_vector<float>() == want);
  }
}

TEST_CASE("cross_entropy equals the mean of logsumexp minus the target logit", "[op][cross_entropy]") {
  Tensor logits = f64({1, 2, 3, 0, 0, 0, 5, 1, 1}, {3, 3});
  Tensor targets = Tensor::from_vector<int64_t>({2, -100, 0}, {3});
  double row0 = std::log(std::exp(1) + std::exp(2) + std::exp(3)) - 3;
  double row2 = std::log(std::exp(5) + 2 * std::exp(1)) - 5;
  check_close(cross_entropy(logits, targets), {(row0 + row2) / 2});
  CHECK_THROWS_WITH(cross_entropy(logits, Tensor::from_vector<int64_t>({0, 1, 7}, {3})),
                    Contains("cross_entropy: expected targets in [0, 3) or ignore_index -100, got 7 at row 2"));
}

namespace {

// The head and loss unfused and fused, from the same leaves: loss, dh and dW of each.
struct HeadRun {
  Tensor loss, dh, dw;
};
HeadRun run_head(const Tensor& h0, const Tensor& w0, const Tensor& targets, int64_t chunk_rows, bool fused) {
  Tensor h = h0.clone().set_requires_grad(true), w = w0.clone().set_requires_grad(true);
  Tensor loss = fused ? linear_cross_entropy(h, w, targets, -100, chunk_rows)
                      : cross_entropy(matmul(h, w, false, true), targets);
  backward(loss);
  return {loss, h.grad(), w.grad()};
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.as_contiguous().raw_data(), b.as_contiguous().raw_data(), a.nbytes()) == 0;
}

}  // namespace

TEST_CASE("linear_cross_entropy is the head's matmul and cross_entropy: bit for bit in one chunk, within rounding "
          "in several",
          "[op][cross_entropy][fused-loss]") {
  manual_seed(31);
  for (DType dtype : {DType::f64, DType::f32}) {
    INFO(dtype_name(dtype));
    Tensor h = Tensor::randn({37, 16}, dtype), w = Tensor::randn({50, 16}, dtype);
    std::vector<int64_t> ids;
    for (int64_t i = 0; i < 37; ++i) ids.push_back(i % 9 == 4 ? -100 : (i * 13 + 5) % 50);
    Tensor targets = Tensor::from_vector(ids, {37});
    HeadRun plain = run_head(h, w, targets, 0, false);
    HeadRun one = run_head(h, w, targets, 37, true);
    CHECK(same_bits(one.loss, plain.loss));
    CHECK(same_bits(one.dh, plain.dh));
    CHECK(same_bits(one.dw, plain.dw));
    // Chunks of 8 rows (the last of 5): the divisor is the batch's used rows in every chunk, dW a
    // sum of the chunks' products.
    HeadRun chunks = run_head(h, w, targets, 8, true);
    const double tol = dtype == DType::f64 ? 1e-12 : 1e-5;
    check_close(chunks.loss, values(plain.loss), tol);
    check_close(chunks.dh, values(plain.dh), tol);
    check_close(chunks.dw, values(plain.dw), tol);
  }
}

TEST_CASE("linear_cross_entropy never holds the logits: its peak is a chunk's, the unfused one all of them",
          "[op][cross_entropy][fused-loss][memory]") {
  manual_seed(32);
  const int64_t n = 512, v = 2000, c = 8, logits_bytes = n * v * 4;
  Tensor h = Tensor::randn({n, c}), w = Tensor::randn({v, c});
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back((i * 7 + 1) % v);
  Tensor targets = Tensor::from_vector(ids, {n});
  auto peak_of = [&](bool fused) {
    HeadRun warm = run_head(h, w, targets, 32, fused);  // the GEMM's per-thread buffers come first
    int64_t base = memory_stats().total.current;
    reset_peak_memory();
    HeadRun run = run_head(h, w, targets, 32, fused);
    return memory_stats().total.peak - base;
  };
  int64_t unfused = peak_of(false), fused = peak_of(true);
  INFO("logits " << logits_bytes << " bytes; peak above the inputs: unfused " << unfused << ", fused " << fused);
  CHECK(unfused >= logits_bytes);
  // A chunk's logits and their gradient (32 x 2000 floats each: 512,000 bytes), dW twice and a
  // chunk's part of it (192,000), the leaves' copies and gradients (160,000): under a quarter.
  CHECK(fused < logits_bytes / 4);
}

TEST_CASE("linear_cross_entropy: a second backward, an ignored batch, and errors that say what was expected",
          "[op][cross_entropy][fused-loss][errors]") {
  manual_seed(33);
  Tensor h = Tensor::randn({6, 4}).set_requires_grad(true), w = Tensor::randn({5, 4}).set_requires_grad(true);
  Tensor targets = Tensor::from_vector<int64_t>({0, 4, 2, 1, 3, 0}, {6});
  Tensor loss = linear_cross_entropy(h, w, targets, -100, 4);
  backward(loss, Tensor(), {.retain_graph = true});
  std::vector<float> dh1 = h.grad().to_vector<float>(), dw1 = w.grad().to_vector<float>();
  h.zero_grad();
  w.zero_grad();
  backward(loss);
  CHECK(h.grad().to_vector<float>() == dh1);
  CHECK(w.grad().to_vector<float>() == dw1);
  // Every row ignored: NaN, as cross_entropy (and PyTorch).
  CHECK(std::isnan(linear_cross_entropy(h, w, Tensor::full({6}, -100, DType::i64)).item()));
  CHECK_THROWS_WITH(linear_cross_entropy(h, Tensor::randn({5, 3}), targets),
                    Contains("linear_cross_entropy: expected h [N, C], weight [V, C] and targets [N], got [6,4], [5,3]"));
  CHECK_THROWS_WITH(linear_cross_entropy(h, w, Tensor::from_vector<int64_t>({0, 1, 2, 3, 4, 9}, {6}), -100, 4),
                    Contains("expected targets in [0, 5) or ignore_index -100, got 9 at row 5"));
  CHECK_THROWS_WITH(linear_cross_entropy(h, w, targets, -100, -1), Contains("expected chunk_rows >= 0"));
  CHECK_THROWS_WITH(linear_cross_entropy(h, w, h), Contains("expected targets of dtype i32 or i64"));
  // The chunk by size: whole tiles of 64 rows, at most 64 MiB of logits, at least a row.
  CHECK(linear_cross_entropy_chunk_rows(8192, 50304, DType::bf16) == 640);
  CHECK(linear_cross_entropy_chunk_rows(100, 256, DType::f32) == 100);
  CHECK(linear_cross_entropy_chunk_rows(10, int64_t{1} << 30, DType::f32) == 1);
}

TEST_CASE("the op list names every op once and parses names back", "[op]") {
  for (int i = 0; i < kOpCount; ++i) CHECK(parse_op(kOpInfo[i].name) == static_cast<OpKind>(i));
  CHECK_THROWS_WITH(parse_op("conv3d"), Contains("unknown op 'conv3d'"));
  CHECK(backend_for(Device::cpu()).supports(OpKind::attention));
}

TEST_CASE("conv2d equals a naive direct convolution for strides and paddings", "[op][conv2d]") {
  manual_seed(6);
  for (auto [stride, padding] : {std::pair{1, 0}, {1, 1}, {2, 1}, {2, 0}}) {
    Tensor x = Tensor::randn({2, 3, 7, 6}, DType::f64), w = Tensor::randn({4, 3, 3, 3}, DType::f64),
           b = Tensor::randn({4}, DType::f64);
    Tensor y = conv2d(x, w, b, stride, padding);
    int64_t ho = (7 + 2 * padding - 3) / stride + 1, wo = (6 + 2 * padding - 3) / stride + 1;
    REQUIRE(y.shape() == Shape{2, 4, ho, wo});
    auto X = values(x), W = values(w), B = values(b), Y = values(y);
    for (int n = 0; n < 2; ++n)
      for (int o = 0; o < 4; ++o)
        for (int oy = 0; oy < ho; ++oy)
          for (int ox = 0; ox < wo; ++ox) {
            double ref = B[o];
            for (int c = 0; c < 3; ++c)
              for (int i = 0; i < 3; ++i)
                for (int j = 0; j < 3; ++j) {
                  int iy = oy * stride - padding + i, ix = ox * stride - padding + j;
                  if (iy >= 0 && iy < 7 && ix >= 0 && ix < 6) ref += X[((n * 3 + c) * 7 + iy) * 6 + ix] * W[((o * 3 + c) * 3 + i) * 3 + j];
                }
            CHECK(Y[((n * 4 + o) * ho + oy) * wo + ox] == Approx(ref).margin(1e-12));
          }
  }
  CHECK_THROWS_WITH(conv2d(Tensor::zeros({1, 3, 4, 4}), Tensor::zeros({2, 2, 3, 3})),
                    Contains("conv2d: expected weight [Cout, 3, kh, kw]"));
}

TEST_CASE("conv2d's gradients equal direct sums: images and tiles per GEMM, kernels past the border",
          "[op][conv2d]") {
  // The CPU backend's backward puts about 2^19 column values in one GEMM: [3, 32, 32, 32] by 3x3 is
  // one image per GEMM (three GEMMs), [5, 16, 32, 32] three then two, the small ones every image in
  // one. Its forward runs tiles of about 2^18 column values of one image: [3, 32, 32, 32] in two
  // tiles of 16 rows, [2, 48, 30, 25] two split inside row 15 (the "same" padding copy),
  // [2, 80, 45, 41] at stride 2 two split inside row 11 and [2, 64, 30, 27] without padding two split
  // inside row 14 (the copies row by row).
  struct Case {
    int64_t n, cin, h, w, cout, kh, kw;
    int stride, padding;
  };
  manual_seed(11);
  for (const Case& c : {Case{3, 32, 32, 32, 2, 3, 3, 1, 1}, Case{5, 16, 32, 32, 2, 3, 3, 2, 1},
                        Case{4, 3, 7, 6, 5, 3, 3, 1, 1}, Case{2, 2, 2, 3, 3, 5, 4, 3, 2}, Case{3, 2, 5, 5, 2, 1, 1, 2, 0},
                        Case{2, 3, 6, 7, 2, 4, 2, 2, 3}, Case{2, 48, 30, 25, 3, 3, 3, 1, 1},
                        Case{2, 80, 45, 41, 3, 3, 3, 2, 0}, Case{2, 64, 30, 27, 3, 3, 3, 1, 0}}) {
    INFO("x [" << c.n << ", " << c.cin << ", " << c.h << ", " << c.w << "], w [" << c.cout << ", " << c.cin << ", "
               << c.kh << ", " << c.kw << "], stride " << c.stride << ", padding " << c.padding);
    Tensor x = Tensor::randn({c.n, c.cin, c.h, c.w}, DType::f64).set_requires_grad(true);
    Tensor w = Tensor::randn({c.cout, c.cin, c.kh, c.kw}, DType::f64).set_requires_grad(true);
    Tensor b = Tensor::randn({c.cout}, DType::f64).set_requires_grad(true);
    Tensor y = conv2d(x, w, b, c.stride, c.padding);
    const int64_t ho = y.size(2), wo = y.size(3);
    REQUIRE(ho == (c.h + 2 * c.padding - c.kh) / c.stride + 1);
    REQUIRE(wo == (c.w + 2 * c.padding - c.kw) / c.stride + 1);
    Tensor dy = Tensor::randn(y.shape(), DType::f64);
    backward(y, dy);
    auto X = values(x), W = values(w), B = values(b), Y = values(y), DY = values(dy);
    std::vector<double> want_y(Y.size()), dx(X.size(), 0.0), dw(W.size(), 0.0), db(B.size(), 0.0);
    auto xi = [&](int64_t n, int64_t ch, int64_t iy, int64_t ix) { return ((n * c.cin + ch) * c.h + iy) * c.w + ix; };
    auto wi = [&](int64_t o, int64_t ch, int64_t i, int64_t j) { return ((o * c.cin + ch) * c.kh + i) * c.kw + j; };
    for (int64_t n = 0; n < c.n; ++n)
      for (int64_t o = 0; o < c.cout; ++o)
        for (int64_t oy = 0; oy < ho; ++oy)
          for (int64_t ox = 0; ox < wo; ++ox) {
            const size_t yi = static_cast<size_t>(((n * c.cout + o) * ho + oy) * wo + ox);
            double acc = B[o];
            db[o] += DY[yi];
            for (int64_t ch = 0; ch < c.cin; ++ch)
              for (int64_t i = 0; i < c.kh; ++i)
                for (int64_t j = 0; j < c.kw; ++j) {
                  const int64_t iy = oy * c.stride - c.padding + i, ix = ox * c.stride - c.padding + j;
                  if (iy < 0 || iy >= c.h || ix < 0 || ix >= c.w) continue;
                  acc += X[xi(n, ch, iy, ix)] * W[wi(o, ch, i, j)];
                  dx[xi(n, ch, iy, ix)] += DY[yi] * W[wi(o, ch, i, j)];
                  dw[wi(o, ch, i, j)] += DY[yi] * X[xi(n, ch, iy, ix)];
                }
            want_y[yi] = acc;
          }
    auto close = [](const std::vector<double>& got, const std::vector<double>& want) {
      double worst = 0;
      for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]) / (1 + std::abs(want[i])));
      return worst;
    };
    CHECK(close(Y, want_y) < 1e-12);
    CHECK(close(values(x.grad()), dx) < 1e-12);
    CHECK(close(values(w.grad()), dw) < 1e-12);
    CHECK(close(values(b.grad()), db) < 1e-12);
  }
}

TEST_CASE("f32 'same' convolutions on the vector kernels: f64's values to rounding, the same bits on 1 and 2 threads",
          "[op][conv2d]") {
  // kernels/cpu/conv_same.cpp runs the forward and the input gradient of f32 convolutions at
  // stride 1 whose output is as large as the input (AVX-512 or AVX2), and on AVX-512 the weight
  // gradient of the 3x3 ones on images of at least 32 x 32. Cases: tiles of 32 (16) pixels that end
  // inside a row and past the image (5x7, 3x37, 9x13, 33x35), images narrower than a vector (1x1,
  // 3x37's rows), output channels that are and are not whole 14-row (6-row) panels (both ways: the
  // input gradient's outputs are the input channels), 3x3, 5x5 and 7x7 kernels (7x7 wider than the
  // image); for the weight gradient, output channels in tiles of 3, 2 and 1, and images in one pass
  // and in two (an image's planes past 1 MiB).
  const std::string isa = cpu::conv_same_isa();
  if (isa.empty()) {
    CHECK_FALSE(cpu::conv_same_fits(3, 3, 1, 1));
    WARN("this build has no vector convolution kernel");
    return;
  }
  CHECK(cpu::conv_same_fits(3, 3, 1, 1));
  CHECK(cpu::conv_same_fits(5, 5, 1, 2));
  CHECK(cpu::conv_same_fits(7, 7, 1, 3));
  CHECK_FALSE(cpu::conv_same_fits(3, 3, 2, 1));
  CHECK_FALSE(cpu::conv_same_fits(3, 3, 1, 0));
  CHECK_FALSE(cpu::conv_same_fits(2, 2, 1, 1));
  CHECK_FALSE(cpu::conv_same_fits(3, 5, 1, 1));
  CHECK_FALSE(cpu::conv_same_fits(9, 9, 1, 4));
  CHECK_FALSE(cpu::conv_same_fits(1, 1, 1, 0));  // packed columns are faster
  CHECK(cpu::conv_same_weight_grad_fits(3, 3, 1, 1, 32, 32, 32, 96) == (isa == "avx512"));
  CHECK_FALSE(cpu::conv_same_weight_grad_fits(5, 5, 1, 2, 32, 32, 32, 96));
  CHECK_FALSE(cpu::conv_same_weight_grad_fits(3, 3, 1, 1, 16, 16, 64, 128));
  CHECK_FALSE(cpu::conv_same_weight_grad_fits(3, 3, 1, 1, 64, 64, 128, 128));
  struct Case {
    int64_t n, cin, h, w, cout, k;
  };
  // The kernel runs unless the GEMMs run on Eigen's (the columns: the reference path).
  std::string direct_library;
  for (const std::string& library : cpu::gemm_libraries())
    if (library != "eigen" && direct_library.empty()) direct_library = library;
  if (direct_library.empty()) {
    WARN("this build's GEMMs are Eigen's alone: convolutions keep the columns");
    return;
  }
  Backend& cpu = backend_for(Device::cpu());
  const std::string before = cpu::gemm_libraries().front();
  const int threads = omp_get_max_threads();
  manual_seed(23);
  int differing = 0;  // outputs whose bits differ from the im2col path's somewhere: the kernel ran
  int direct_weight_grads = 0;
  for (const Case& c : {Case{2, 3, 5, 7, 4, 3}, Case{3, 32, 16, 16, 29, 3}, Case{2, 17, 8, 8, 15, 7},
                        Case{1, 5, 1, 1, 3, 3}, Case{2, 20, 3, 37, 33, 5}, Case{2, 40, 9, 13, 2, 3},
                        Case{1, 3, 32, 32, 32, 3}, Case{3, 5, 33, 35, 8, 3}, Case{2, 200, 32, 32, 61, 3}}) {
    INFO("x [" << c.n << ", " << c.cin << ", " << c.h << ", " << c.w << "], w [" << c.cout << ", " << c.cin << ", "
               << c.k << ", " << c.k << "]");
    const int padding = static_cast<int>(c.k - 1) / 2;
    Tensor x = Tensor::randn({c.n, c.cin, c.h, c.w}), w = Tensor::randn({c.cout, c.cin, c.k, c.k});
    Tensor b = Tensor::randn({c.cout}), dy = Tensor::randn({c.n, c.cout, c.h, c.w});
    auto run = [&](const Tensor& xx, const Tensor& ww, const Tensor& bb, const Tensor& gg, int n, const char* library) {
      cpu::set_gemm_library(library);
      omp_set_num_threads(n);
      Tensor y = cpu.conv2d(xx, ww, bb, 1, padding);
      std::vector<Tensor> g = cpu.conv2d_backward(gg, xx, ww, 1, padding, true);
      omp_set_num_threads(threads);
      cpu::set_gemm_library(before);
      return std::vector<Tensor>{y, g[0], g[1], g[2]};  // y, dx, dw, db
    };
    const auto one = run(x, w, b, dy, 1, direct_library.c_str()), two = run(x, w, b, dy, 2, direct_library.c_str());
    const auto columns = run(x, w, b, dy, threads, "eigen");
    const auto exact = run(x.to(DType::f64), w.to(DType::f64), b.to(DType::f64), dy.to(DType::f64), threads, "auto");
    // dW on columns runs on the BLAS's GEMM, whose bits gemm.h promises for a fixed thread count
    // only (OpenBLAS's differ between 1 and 2 threads); remat's SGEMM and the direct kernels' do not
    // depend on it.
    const bool dw_any_threads = direct_library == "avx512" ||
                                cpu::conv_same_weight_grad_fits(c.k, c.k, 1, padding, c.h, c.w, c.cout, c.cin);
    for (size_t i = 0; i < one.size(); ++i) {
      INFO("output " << i << " (y, dx, dw, db)");
      const std::vector<double> f = values(one[i]), e = values(exact[i]);
      if (i != 2 || dw_any_threads) CHECK(f == values(two[i]));
      // Rounding grows with the terms of each sum: cin k^2 for y, cout k^2 for dx, every pixel of
      // every image for dw and db.
      const int64_t terms[] = {c.cin * c.k * c.k, c.cout * c.k * c.k, c.n * c.h * c.w, c.n * c.h * c.w};
      const double tol = 2e-7 * static_cast<double>(terms[i]);
      double worst = 0;
      for (size_t j = 0; j < f.size(); ++j) worst = std::max(worst, std::abs(f[j] - e[j]) / (1 + std::abs(e[j])));
      CHECK(worst < tol);
      differing += i < 2 && f != values(columns[i]);
    }
    if (cpu::conv_same_weight_grad_fits(c.k, c.k, 1, padding, c.h, c.w, c.cout, c.cin)) {
      // The backend's dw is the kernel's, bit for bit.
      std::vector<float> scratch(static_cast<size_t>(cpu::conv_same_weight_grad_scratch(c.cout, c.cin)));
      Tensor dw = Tensor::empty(w.shape());
      cpu::conv_same_weight_grad(x.data<float>(), dy.data<float>(), c.n, c.h, c.w, c.cout, c.cin, dw.data<float>(),
                                 scratch.data(), 1);
      CHECK(values(dw) == values(one[2]));
      ++direct_weight_grads;
    }
  }
  CHECK(differing > 0);
  CHECK(direct_weight_grads == (isa == "avx512" ? 3 : 0));
}

TEST_CASE("group_norm, resampling, modulation and timestep embedding compute the textbook values", "[op][image]") {
  manual_seed(8);
  Tensor x = Tensor::randn({2, 4, 3, 3}, DType::f64);
  Tensor y = group_norm(x, Tensor::ones({4}, DType::f64), Tensor::zeros({4}, DType::f64), 2);
  auto v = values(y);
  for (int g = 0; g < 4; ++g) {  // (sample, group) blocks of 18 values: zero mean
    double m = 0;
    for (int i = 0; i < 18; ++i) m += v[g * 18 + i] / 18;
    CHECK(m == Approx(0).margin(1e-12));
  }
  Tensor img = f64({1, 2, 3, 4}, {1, 1, 2, 2});
  check_close(upsample_nearest(img, 2), {1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4});
  check_close(avg_pool(upsample_nearest(img, 2), 2), {1, 2, 3, 4});
  // A factor of 3 on a wider than tall image, and the backward ops: each window's sum, each value spread.
  Tensor wide = f64({1, 2, 3, 4, 5, 6}, {1, 1, 2, 3});
  Tensor up3 = upsample_nearest(wide, 3);
  REQUIRE(up3.shape() == Shape{1, 1, 6, 9});
  auto u = values(up3);
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 9; ++j) CHECK(u[i * 9 + j] == 1 + (i / 3) * 3 + j / 3);
  check_close(avg_pool(up3, 3), {1, 2, 3, 4, 5, 6});
  Backend& cpu = backend_for(Device::cpu());
  std::vector<double> grid(54);
  for (size_t i = 0; i < grid.size(); ++i) grid[i] = static_cast<double>(i * i % 17);
  auto sums = values(cpu.upsample_nearest_backward(Tensor::from_vector(grid, {1, 1, 6, 9}), 3));
  REQUIRE(sums.size() == 6);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) {
      double want = 0;
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) want += grid[(3 * i + a) * 9 + 3 * j + b];
      CHECK(sums[i * 3 + j] == want);
    }
  auto spread = values(cpu.avg_pool_backward(wide, 3));
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 9; ++j) CHECK(spread[i * 9 + j] == Approx((1 + (i / 3) * 3 + j / 3) / 9.0));
  check_close(modulate(f64({1, 2, 3, 4}, {1, 2, 2}), f64({10, 20}, {1, 2}), f64({1, -1}, {1, 2})), {12, 20, 16, 20});
  auto e = values(timestep_embedding(f64({0.5}, {1}), 4, 100.0));
  CHECK(e[0] == Approx(std::cos(0.5)));
  CHECK(e[1] == Approx(std::cos(0.5 * 0.1)));  // f_1 = 100^(-1/2)
  CHECK(e[3] == Approx(std::sin(0.5 * 0.1)));
  CHECK_THROWS_WITH(group_norm(x, Tensor::ones({4}, DType::f64), Tensor::zeros({4}, DType::f64), 3),
                    Contains("expected channels (4) divisible by groups (3)"));
  CHECK_THROWS_WITH(avg_pool(Tensor::zeros({1, 1, 3, 4}), 2), Contains("divisible by 2"));
}

TEST_CASE("group_norm of an empty batch is empty, with zero parameter gradients", "[op][image]") {
  Tensor w = Tensor::ones({4}, DType::f64).set_requires_grad(true), b = Tensor::zeros({4}, DType::f64).set_requires_grad(true);
  Tensor x = Tensor::zeros({0, 4, 3, 3}, DType::f64).set_requires_grad(true);
  Tensor y = group_norm(x, w, b, 2);
  CHECK(y.shape() == Shape{0, 4, 3, 3});
  backward(sum(y));
  CHECK(values(w.grad()) == std::vector<double>(4, 0.0));
  CHECK(values(b.grad()) == std::vector<double>(4, 0.0));
  CHECK(x.grad().shape() == Shape{0, 4, 3, 3});
}
