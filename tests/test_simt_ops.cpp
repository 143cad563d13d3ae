// The CUDA kernels beyond attention and the row kernels (tests/test_simt.cpp), run on the CPU under
// the SIMT emulator (tests/simt_emulator.h) against the CPU backend: elementwise (broadcasting
// binary ops, the bias add, strided gathers, Philox dropout and casts bit for bit; unary functions
// and their gradients within rounding; the multi-tensor AdamW bit for bit with the per-tensor one);
// reductions over any axes (sums and maxima by column tiles for bias gradients, by a block or a
// thread per output otherwise; the max backward; clipping's sums of squares, norm and scale); the
// embedding with its deterministic backward (CUB's stable radix sort stood in for by a stable
// sort); the image and conditioning ops of dit and unet; the im2col convolution (its GEMMs on the
// host). Grids are smaller than the launches' so that every grid-stride loop turns. First, the
// emulator's own scheduling: a missing barrier fails, a divergent one is reported.
#include "simt_emulator.h"  // first: the kernels compile against its built-ins

#include <catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cuda/conv_kernels.cuh"
#include "kernels/cuda/elementwise_kernels.cuh"
#include "kernels/cuda/embedding_kernels.cuh"
#include "kernels/cuda/image_kernels.cuh"
#include "kernels/cuda/reduce_kernels.cuh"
#include "remat.h"

namespace {

using namespace remat;
namespace ew = remat::cuda::elementwise_kernels;
namespace red = remat::cuda::reduce_kernels;
namespace emb = remat::cuda::embedding_kernels;
namespace im = remat::cuda::image_kernels;
namespace conv = remat::cuda::conv_kernels;

Backend& cpu() { return backend_for(Device::cpu()); }

// Grid-stride kernels run as `blocks` blocks of `threads`, fewer than n needs.
constexpr unsigned kBlocks = 3;
constexpr int kThreads = 64;

template <typename F>
void grid_stride(const F& kernel) {
  remat_simt::launch({kBlocks, 1, 1}, kThreads, 0, kernel);
}

Tensor random_tensor(const Shape& shape, DType dtype, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> v(static_cast<size_t>(numel_of(shape)));
  for (double& x : v) x = normal(rng);
  return Tensor::from_vector(v, shape).to(dtype);
}

// The same bytes, or the first element where they differ.
bool same_bits(const Tensor& got, const Tensor& want) {
  REQUIRE(got.shape() == want.shape());
  REQUIRE(got.dtype() == want.dtype());
  Tensor g = got.as_contiguous(), w = want.as_contiguous();
  const size_t width = dtype_size(g.dtype());
  for (int64_t i = 0; i < g.numel(); ++i)
    if (std::memcmp(static_cast<const char*>(g.raw_data()) + i * width,
                    static_cast<const char*>(w.raw_data()) + i * width, width) != 0) {
      UNSCOPED_INFO("first difference at element " << i << ": " << g.to_vector<double>()[i] << " against "
                                                   << w.to_vector<double>()[i]);
      return false;
    }
  return true;
}

// The largest |got - want| over rtol * max(|want|, 1).
double worst_relative(const Tensor& got, const Tensor& want) {
  std::vector<double> g = got.to_vector<double>(), w = want.to_vector<double>();
  REQUIRE(g.size() == w.size());
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i) worst = std::max(worst, std::abs(g[i] - w[i]) / std::max(std::abs(w[i]), 1.0));
  return worst;
}

// ---- the emulator itself ------------------------------------------------------------------------

// Each thread writes its slot of a shared tile, then reads its neighbour's: right with the barrier
// between, wrong without it in every block (the scheduler runs each phase thread by thread).
void neighbour_sums(bool with_barrier, int salt, std::vector<int>& out) {
  __shared__ int tile[64];
  const int t = static_cast<int>(threadIdx.x);
  tile[t] = t + salt + static_cast<int>(blockIdx.x);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * 64 + t] = tile[(t + 1) % 64];
}

TEST_CASE("the emulator runs threads in turn: a missing barrier fails every time, a divergent one is reported",
          "[simt][emulator]") {
  int salt = 1;
  for (bool with_barrier : {true, false, true, false}) {
    salt += 1000;  // (the tile is static: each launch writes values unlike the last one's)
    std::vector<int> out(2 * 64, 0);
    remat_simt::launch({2, 1, 1}, 64, 0, [&] { neighbour_sums(with_barrier, salt, out); });
    std::vector<int> right(2, 0);  // per block
    for (int i = 0; i < 2 * 64; ++i) right[i / 64] += out[i] == (i % 64 + 1) % 64 + salt + i / 64;
    INFO((with_barrier ? "with" : "without") << " the barrier");
    if (with_barrier) CHECK(right == std::vector<int>{64, 64});
    else CHECK((right[0] < 64 && right[1] < 64));  // block 0 runs its threads forward, block 1 backward
  }
  // Half the threads wait at a barrier that the other half never reach.
  auto divergent = [] {
    if (threadIdx.x < 16) __syncthreads();
  };
  CHECK_THROWS_WITH(remat_simt::launch({1, 1, 1}, 32, 0, divergent),
                    Catch::Matchers::Contains("a barrier the others never reach"));
}

// ---- elementwise --------------------------------------------------------------------------------

template <typename T>
Tensor emulated_binary(BinaryFn fn, const Tensor& a, const Tensor& b) {
  Shape out_shape = broadcast_shapes(a.shape(), b.shape(), "binary");
  Tensor out = Tensor::empty(out_shape, a.dtype());
  const int64_t n = out.numel();
  if (a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous()) {
    grid_stride([&] { ew::binary_same_kernel<T>(fn, a.data<T>(), b.data<T>(), out.data<T>(), n); });
  } else {
    ew::Indexer ix = ew::make_indexer(out_shape, a, &b, "binary");
    grid_stride([&] { ew::binary_broadcast_kernel<T>(fn, a.data<T>(), b.data<T>(), out.data<T>(), n, ix); });
  }
  return out;
}

Tensor transposed_view(const Tensor& x) {  // [m, n] contiguous -> its [n, m] transpose, strided
  return x.view({x.size(1), x.size(0)}, {1, x.size(1)}, 0);
}

TEST_CASE("elementwise kernels, emulated: broadcasting binary ops, the bias add and strided gathers give the cpu's bits",
          "[simt][elementwise]") {
  std::mt19937 rng(11);
  for (BinaryFn fn : {BinaryFn::add, BinaryFn::sub, BinaryFn::mul, BinaryFn::div}) {
    INFO("binary fn " << static_cast<int>(fn));
    Tensor a = random_tensor({3, 1, 5}, DType::f32, rng), b = random_tensor({4, 1}, DType::f32, rng);
    CHECK(same_bits(emulated_binary<float>(fn, a, b), cpu().binary(fn, a, b)));
    Tensor c = random_tensor({7, 9}, DType::f32, rng), d = random_tensor({7, 9}, DType::f32, rng);
    CHECK(same_bits(emulated_binary<float>(fn, c, d), cpu().binary(fn, c, d)));
    // A strided input (a transpose) against a row: the broadcast kernel reads through strides.
    Tensor e = transposed_view(random_tensor({6, 5}, DType::f64, rng)), f = random_tensor({6}, DType::f64, rng);
    CHECK(same_bits(emulated_binary<double>(fn, e, f), cpu().binary(fn, e, f)));
  }
  // linear's bias, added in place after its GEMM: a row broadcast.
  Tensor y = random_tensor({9, 7}, DType::f32, rng), bias = random_tensor({7}, DType::f32, rng);
  Tensor with_bias = y.clone();
  grid_stride([&] { ew::add_bias_kernel<float>(with_bias.data<float>(), bias.data<float>(), 9, 7); });
  CHECK(same_bits(with_bias, cpu().binary(BinaryFn::add, y, bias)));
  // Strided copies by element width: a transpose and a sliced, stepped view.
  for (DType dtype : {DType::f32, DType::bf16, DType::f64}) {
    INFO("gather of " << dtype_name(dtype));
    Tensor base = random_tensor({8, 13}, dtype, rng);
    for (const Tensor& view : {transposed_view(base), base.view({4, 5}, {26, 2}, 3)}) {
      Tensor out = Tensor::empty(view.shape(), dtype);
      ew::Indexer ix = ew::make_indexer(view.shape(), view, nullptr, "copy_strided");
      const auto* src = static_cast<const uint16_t*>(view.raw_data());
      const auto* src4 = static_cast<const uint32_t*>(view.raw_data());
      const auto* src8 = static_cast<const uint64_t*>(view.raw_data());
      const int64_t n = view.numel();
      grid_stride([&] {
        switch (dtype_size(dtype)) {
          case 2: ew::gather_kernel(src, static_cast<uint16_t*>(out.raw_data()), n, ix); break;
          case 4: ew::gather_kernel(src4, static_cast<uint32_t*>(out.raw_data()), n, ix); break;
          default: ew::gather_kernel(src8, static_cast<uint64_t*>(out.raw_data()), n, ix); break;
        }
      });
      CHECK(same_bits(out, view.as_contiguous()));
    }
  }
}

TEST_CASE("elementwise kernels, emulated: dropout draws the cpu's mask and casts round as the cpu does",
          "[simt][elementwise]") {
  std::mt19937 rng(12);
  for (DType dtype : {DType::f32, DType::f64}) {
    // 1001 elements (not a multiple of Philox's 4) at a stream offset within the seed's stream.
    Tensor x = random_tensor({1001}, dtype, rng);
    const double p = 0.3;
    const uint64_t seed = 0x1234abcdULL, offset = 77;
    Tensor y = Tensor::empty(x.shape(), dtype);
    if (dtype == DType::f32)
      grid_stride([&] {
        ew::dropout_kernel<float>(x.data<float>(), y.data<float>(), x.numel(), static_cast<float>(p),
                                  1.0f / (1.0f - static_cast<float>(p)), seed, offset);
      });
    else
      grid_stride([&] {
        ew::dropout_kernel<double>(x.data<double>(), y.data<double>(), x.numel(), static_cast<float>(p),
                                   1.0 / (1.0 - p), seed, offset);
      });
    Tensor want = cpu().dropout(x, p, seed, offset, x.dtype());
    INFO("dropout in " << dtype_name(dtype));
    CHECK(same_bits(y, want));
    // Not a vacuous match: some dropped and some kept.
    std::vector<double> v = want.to_vector<double>();
    const auto zeros = std::count(v.begin(), v.end(), 0.0);
    CHECK(zeros > 200);
    CHECK(zeros < 400);
  }
  // Casts: f32 -> bf16 across ties, subnormals, infinities and NaN, and back; f32 <-> f64.
  std::vector<float> special = {0.f, -0.f, 1.f, 1.00390625f, 1.01171875f, 1.0f + 1.0f / 256 + 1.0f / 65536,
                                3.4e38f, -3.4e38f, 1e-40f, INFINITY, -INFINITY, NAN};
  Tensor f = random_tensor({500}, DType::f32, rng);
  std::vector<float> values = f.to_vector<float>();
  values.insert(values.end(), special.begin(), special.end());
  Tensor x = Tensor::from_vector(values, {static_cast<int64_t>(values.size())});
  const int64_t n = x.numel();
  Tensor to_bf16 = Tensor::empty(x.shape(), DType::bf16), to_f64 = Tensor::empty(x.shape(), DType::f64);
  grid_stride([&] { ew::cast_kernel<float, cuda::bf16>(x.data<float>(), to_bf16.data<cuda::bf16>(), n); });
  grid_stride([&] { ew::cast_kernel<float, double>(x.data<float>(), to_f64.data<double>(), n); });
  CHECK(same_bits(to_bf16, cpu().cast(x, DType::bf16)));
  CHECK(same_bits(to_f64, cpu().cast(x, DType::f64)));
  Tensor back = Tensor::empty(x.shape(), DType::f32);
  grid_stride([&] { ew::cast_kernel<cuda::bf16, float>(to_bf16.data<cuda::bf16>(), back.data<float>(), n); });
  CHECK(same_bits(back, cpu().cast(to_bf16, DType::f32)));
}

TEST_CASE("elementwise kernels, emulated: packs of 16 bytes and one element at a time give the same bits",
          "[simt][elementwise]") {
  std::mt19937 rng(14);
  std::normal_distribution<double> normal(0.0, 1.0);
  // 1001 values (packs of kPack, then a tail of 1), laid out at the start of a buffer (aligned: the
  // kernels take packs) and one element in (misaligned: the same kernels take each element alone).
  const int64_t n = 1001;
  std::vector<double> a_values(n), b_values(n);
  for (int64_t i = 0; i < n; ++i) a_values[i] = normal(rng), b_values[i] = normal(rng);
  auto placed = [&](const std::vector<double>& v, int64_t offset, DType dtype) {
    std::vector<double> buffer(n + 1, 0.0);
    std::copy(v.begin(), v.end(), buffer.begin() + offset);
    return Tensor::from_vector(buffer, {n + 1}).to(dtype).view({n}, {1}, offset);
  };
  for (DType dtype : {DType::f32, DType::bf16}) {
    INFO(dtype_name(dtype));
    std::vector<Tensor> results[2];
    for (int64_t offset : {0, 1}) {
      INFO("at element offset " << offset);
      Tensor a = placed(a_values, offset, dtype), b = placed(b_values, offset, dtype);
      Tensor product = placed(a_values, offset, dtype), dropped = placed(a_values, offset, dtype),
             gelu = placed(a_values, offset, dtype), gelu_grad = placed(a_values, offset, dtype),
             as_f32 = placed(a_values, offset, DType::f32);
      auto run = [&]<typename T>() {
        CHECK(cuda::packed_elements(n, cuda::packable(a.data<T>(), b.data<T>(), product.data<T>())) ==
              (offset == 0 ? 1000 : 0));
        grid_stride([&] { ew::binary_same_kernel<T>(BinaryFn::mul, a.data<T>(), b.data<T>(), product.data<T>(), n); });
        grid_stride([&] { ew::dropout_kernel<T>(a.data<T>(), dropped.data<T>(), n, 0.3f, 1.0f / 0.7f, 99, 5); });
        grid_stride([&] { ew::unary_kernel<T>(UnaryFn::gelu, a.data<T>(), gelu.data<T>(), n, 0.0f); });
        grid_stride([&] {
          ew::unary_backward_kernel<T>(UnaryFn::gelu, b.data<T>(), a.data<T>(), nullptr, gelu_grad.data<T>(), n, 0.0f);
        });
        grid_stride([&] { ew::cast_kernel<T, float>(a.data<T>(), as_f32.data<float>(), n); });
      };
      if (dtype == DType::f32) run.operator()<float>();
      else run.operator()<cuda::bf16>();
      if (dtype == DType::f32) {  // the cpu backend computes in f32, not bf16
        CHECK(same_bits(product, cpu().binary(BinaryFn::mul, a, b)));
        CHECK(same_bits(dropped, cpu().dropout(a, 0.3, 99, 5, a.dtype())));
      }
      CHECK(same_bits(as_f32, cpu().cast(a, DType::f32)));
      results[offset] = {product, dropped, as_f32, gelu, gelu_grad};
    }
    // One operation per element (a product, dropout's mask and scale, a cast): the same bits either
    // way. A function of several operations (GELU and its gradient) within rounding: the compiler
    // may contract a * b + c into one FMA differently in the two loops (the host's does here).
    for (size_t k = 0; k < results[0].size(); ++k) {
      INFO("result " << k << " packed against one element at a time");
      if (k < 3) CHECK(same_bits(results[0][k], results[1][k]));
      else CHECK(worst_relative(results[0][k].to(DType::f32), results[1][k].to(DType::f32)) < (dtype == DType::f32 ? 1e-6 : 1e-2));
    }
  }
}

TEST_CASE("elementwise kernels, emulated: unary functions and their gradients within rounding of the cpu's",
          "[simt][elementwise]") {
  std::mt19937 rng(13);
  Tensor x = random_tensor({300}, DType::f32, rng), dy = random_tensor({300}, DType::f32, rng);
  Tensor positive = cpu().unary(UnaryFn::add_scalar, cpu().unary(UnaryFn::mul_scalar, x, 0.0), 0.5);
  positive = cpu().binary(BinaryFn::add, cpu().binary(BinaryFn::mul, x, x), positive);  // x^2 + 0.5
  const int64_t n = x.numel();
  for (UnaryFn fn : {UnaryFn::add_scalar, UnaryFn::mul_scalar, UnaryFn::pow_scalar, UnaryFn::neg, UnaryFn::exp,
                     UnaryFn::log, UnaryFn::tanh, UnaryFn::sqrt, UnaryFn::rsqrt, UnaryFn::relu, UnaryFn::gelu,
                     UnaryFn::silu, UnaryFn::sigmoid}) {
    const bool needs_positive = fn == UnaryFn::log || fn == UnaryFn::sqrt || fn == UnaryFn::rsqrt ||
                                fn == UnaryFn::pow_scalar;
    const Tensor& in = needs_positive ? positive : x;
    const double s = fn == UnaryFn::pow_scalar ? 1.5 : 0.75;
    Tensor y = Tensor::empty(in.shape()), dx = Tensor::empty(in.shape());
    grid_stride([&] { ew::unary_kernel<float>(fn, in.data<float>(), y.data<float>(), n, static_cast<float>(s)); });
    Tensor want_y = cpu().unary(fn, in, s);
    grid_stride([&] {
      ew::unary_backward_kernel<float>(fn, dy.data<float>(), in.data<float>(), want_y.data<float>(), dx.data<float>(),
                                       n, static_cast<float>(s));
    });
    INFO("unary fn " << static_cast<int>(fn));
    CHECK(worst_relative(y, want_y) < 1e-6);
    CHECK(worst_relative(dx, cpu().unary_backward(fn, dy, in, want_y, s)) < 1e-5);
  }
}

TEST_CASE("elementwise kernels, emulated: the multi-tensor AdamW gives the per-tensor kernel's bits",
          "[simt][elementwise][optim]") {
  std::mt19937 rng(14);
  const std::vector<int64_t> sizes = {37, 0, 300, 5, 129};
  struct State {
    Tensor p, g, m, v;
  };
  std::vector<State> one, chunked;
  for (int64_t n : sizes) {
    State s{random_tensor({n}, DType::f32, rng), random_tensor({n}, DType::f32, rng),
            random_tensor({n}, DType::f32, rng), cpu().unary(UnaryFn::exp, random_tensor({n}, DType::f32, rng), 0)};
    one.push_back(s);
    chunked.push_back({s.p.clone(), s.g, s.m.clone(), s.v.clone()});
  }
  const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
  const int64_t step = 3;
  const float bias1 = 1.0f - static_cast<float>(std::pow(0.9, step)), bias2 = 1.0f - static_cast<float>(std::pow(0.95, step));
  ew::AdamWChunk<float> chunk{};
  for (size_t i = 0; i < sizes.size(); ++i) {
    const float lr = 1e-3f * static_cast<float>(i + 1), decay = i % 2 ? 0.f : lr * 0.1f;
    State& s = one[i];
    grid_stride([&] {
      ew::adamw_kernel<float>(s.p.data<float>(), s.g.data<float>(), s.m.data<float>(), s.v.data<float>(), s.p.numel(),
                              b1, b2, bias1, bias2, lr, eps, decay);
    });
    State& c = chunked[i];
    const int k = chunk.count;
    chunk.p[k] = c.p.data<float>();
    chunk.g[k] = c.g.data<float>();
    chunk.m[k] = c.m.data<float>();
    chunk.v[k] = c.v.data<float>();
    chunk.lr[k] = lr;
    chunk.decay[k] = decay;
    chunk.start[k + 1] = chunk.start[k] + sizes[i];
    chunk.count = k + 1;
  }
  grid_stride([&] { ew::adamw_chunk_kernel<float>(chunk, b1, b2, bias1, bias2, eps); });
  for (size_t i = 0; i < sizes.size(); ++i) {
    INFO("tensor " << i << " of " << sizes[i] << " elements");
    CHECK(same_bits(chunked[i].p, one[i].p));
    CHECK(same_bits(chunked[i].m, one[i].m));
    CHECK(same_bits(chunked[i].v, one[i].v));
  }
  // And the per-tensor kernel is AdamW: against the cpu's update of the same tensor, within rounding.
  std::mt19937 again(14);
  std::vector<State> fresh;
  for (int64_t n : sizes)
    fresh.push_back({random_tensor({n}, DType::f32, again), random_tensor({n}, DType::f32, again),
                     random_tensor({n}, DType::f32, again),
                     cpu().unary(UnaryFn::exp, random_tensor({n}, DType::f32, again), 0)});
  State& f = fresh[2];
  Tensor before = f.p.clone();
  cpu().adamw_update(f.p, f.g, f.m, f.v, {3e-3, 0.9, 0.95, 1e-8, 0.1, step});
  CHECK(worst_relative(one[2].p, f.p) < 1e-6);
  CHECK(worst_relative(one[2].m, f.m) < 1e-6);
  CHECK(worst_relative(one[2].v, f.v) < 1e-6);
  CHECK(worst_relative(before, f.p) > 1e-4);  // the update moved the parameters
}

// ---- reductions ---------------------------------------------------------------------------------

template <typename Op>
Tensor emulated_reduce(const Tensor& x, const std::vector<int64_t>& axes, Op op, float identity) {
  red::ReducePlan plan = red::plan_reduce(x.shape(), axes);
  Tensor out = Tensor::empty(plan.out_shape);
  if (plan.block_per_output())
    remat_simt::launch({static_cast<unsigned>(plan.n_out), 1, 1}, 128, 0, [&] {
      red::reduce_block_kernel<float>(x.data<float>(), out.data<float>(), plan.index(), op, identity);
    });
  else
    grid_stride([&] { red::reduce_thread_kernel<float>(x.data<float>(), out.data<float>(), plan.index(), op, identity); });
  return out;
}

// Sums and maxima of the rows of a [rows, cols] matrix by column tiles and row slices, as reduce.cu
// runs them (the slices' partials folded by a second kernel when there are several).
template <typename T, typename Op>
Tensor emulated_column_reduce(const Tensor& x, Op op, cuda::Acc<T> identity) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t slices = red::column_slices(rows), rows_per_slice = (rows + slices - 1) / slices;
  const int64_t tiles = (cols + red::kColumnTile - 1) / red::kColumnTile;
  std::vector<cuda::Acc<T>> partial(slices * cols);
  Tensor y = Tensor::empty({1, cols}, x.dtype());
  remat_simt::launch({static_cast<unsigned>(tiles), static_cast<unsigned>(slices), 1},
                     {red::kColumnTile, red::kRowLanes, 1}, 0, [&] {
                       red::reduce_columns_kernel<T>(x.data<T>(), rows, cols, rows_per_slice, op, identity,
                                                     slices > 1 ? partial.data() : nullptr, y.data<T>());
                     });
  if (slices > 1)
    grid_stride([&] { red::fold_slices_kernel<T>(partial.data(), slices, cols, op, y.data<T>()); });
  return y;
}

template <typename T>
void check_column_reductions(int64_t rows, int64_t cols, double tol, std::mt19937& rng) {
  Tensor x = random_tensor({rows, cols}, dtype_of<T>::value, rng);
  red::ReducePlan plan = red::plan_reduce(x.shape(), {0});
  INFO("column reductions in " << dtype_name(x.dtype()) << ", " << rows << " x " << cols << ", "
                               << red::column_slices(rows) << " slices");
  CHECK(plan.by_columns());
  CHECK(worst_relative(emulated_column_reduce<T>(x, cuda::SumOp{}, 0), cpu().reduce_sum(x.to(DType::f64), {0})) < tol);
  CHECK(same_bits(emulated_column_reduce<T>(x, cuda::MaxOp{}, -std::numeric_limits<cuda::Acc<T>>::infinity()),
                  cpu().reduce_max(x, {0})));
}

TEST_CASE("column reductions (bias gradients), emulated: sums and maxima over the leading axis", "[simt][reduce]") {
  std::mt19937 rng(10);
  check_column_reductions<double>(1100, 70, 1e-12, rng);  // three slices, a partial column tile
  check_column_reductions<float>(100, 33, 1e-5, rng);     // one slice: written directly
}

TEST_CASE("reduction kernels, emulated: sums and maxima over any axes, the max backward, clipping",
          "[simt][reduce]") {
  std::mt19937 rng(15);
  // Inner and middle axes by a thread per output; a long reduction to few outputs by a block each.
  struct Case {
    Shape shape;
    std::vector<int64_t> axes;
  };
  for (const Case& c : {Case{{4, 5, 6}, {1}}, Case{{4, 5, 6}, {0, 2}}, Case{{4, 5, 6}, {2}}, Case{{3, 2000}, {1}},
                        Case{{2, 40, 30}, {1, 2}}}) {
    INFO("shape " << shape_str(c.shape) << ", " << c.axes.size() << " axes from " << c.axes.front());
    Tensor x = random_tensor(c.shape, DType::f32, rng);
    red::ReducePlan plan = red::plan_reduce(c.shape, c.axes);
    CHECK_FALSE(plan.by_columns());  // (the column path has the case above)
    Tensor sum = emulated_reduce(x, c.axes, cuda::SumOp{}, 0.f);
    CHECK(worst_relative(sum, cpu().reduce_sum(x.to(DType::f64), c.axes)) < 1e-5);
    Tensor max = emulated_reduce(x, c.axes, cuda::MaxOp{}, -INFINITY);
    CHECK(same_bits(max, cpu().reduce_max(x, c.axes)));
  }
  // The max backward shares the gradient among ties, as the cpu does.
  Tensor x = Tensor::from_vector(std::vector<float>{1, 3, 3, 2, 5, 0, 5, 5, -1, -1, -1, -1}, {3, 4});
  Tensor dy = Tensor::from_vector(std::vector<float>{0.5f, 3.f, 1.f}, {3, 1});
  Tensor y = cpu().reduce_max(x, {1});
  red::ReducePlan plan = red::plan_reduce(x.shape(), {1});
  Tensor dx = Tensor::zeros(x.shape());
  grid_stride([&] {
    red::max_backward_kernel<float>(dy.data<float>(), x.data<float>(), y.data<float>(), dx.data<float>(), plan.index());
  });
  CHECK(same_bits(dx, cpu().reduce_max_backward(dy, x, y)));
  CHECK(dx.to_vector<float>()[1] == 0.25f);

  // Clipping: each tensor's sum of squares in f64 (two fixed-order stages), then the norm and the
  // scale as the host computes them from the same sums, then the tensors scaled in their dtype;
  // several tensors a launch, each in its slot, its bits the same whatever shares its launch.
  std::vector<Tensor> grads = {random_tensor({1000}, DType::f32, rng), random_tensor({0}, DType::f32, rng),
                               random_tensor({77}, DType::f32, rng)};
  auto chunk_of = [](std::vector<Tensor>& xs, const std::vector<int>& slots) {
    red::ClipChunk<float> c{};
    for (size_t k = 0; k < xs.size(); ++k) {
      c.x[k] = xs[k].data<float>();
      c.n[k] = xs[k].numel();
      c.slot[k] = slots[k];
      c.start[k + 1] = c.start[k] + xs[k].numel();
    }
    c.count = static_cast<int>(xs.size());
    return c;
  };
  auto sums_of = [&](const red::ClipChunk<float>& c, int slots) {
    std::vector<double> partial(static_cast<size_t>(slots) * red::kSquareBlocks, -1.0), totals(slots, -1.0);
    remat_simt::launch({red::kSquareBlocks, static_cast<unsigned>(c.count), 1}, kThreads, 0,
                       [&] { red::sum_squares_partial_kernel<float>(c, partial.data()); });
    remat_simt::launch({static_cast<unsigned>(slots), 1, 1}, kThreads, 0,
                       [&] { red::sum_partials_kernel(partial.data(), red::kSquareBlocks, totals.data()); });
    return totals;
  };
  // All three in one launch, the slots reversed.
  std::vector<double> totals = sums_of(chunk_of(grads, {2, 1, 0}), 3);
  for (size_t i = 0; i < grads.size(); ++i) {
    double want = 0;
    for (float g : grads[i].to_vector<float>()) want += static_cast<double>(g) * g;
    CHECK(std::abs(totals[2 - i] - want) <= 1e-12 * want);
  }
  CHECK(totals[1] == 0.0);
  // Each alone: the same bits.
  for (size_t i = 0; i < grads.size(); ++i) {
    std::vector<Tensor> one = {grads[i]};
    CHECK(sums_of(chunk_of(one, {0}), 1)[0] == totals[2 - i]);
  }
  std::reverse(totals.begin(), totals.end());
  for (double max_norm : {1.0, 1e6}) {
    double norm = 0, clip[2] = {0, 0};
    remat_simt::launch({1, 1, 1}, 1, 0, [&] {
      red::clip_coefficient_kernel(totals.data(), static_cast<int64_t>(totals.size()), max_norm, &norm, clip);
    });
    const double want_norm = std::sqrt(totals[0] + totals[1] + totals[2]);
    CHECK(norm == want_norm);
    const bool scaled = want_norm > max_norm;
    CHECK(clip[1] == (scaled ? 1.0 : 0.0));
    std::vector<Tensor> g = {grads[0].clone(), grads[1].clone(), grads[2].clone()};
    red::ClipChunk<float> c = chunk_of(g, {0, 1, 2});
    grid_stride([&] { red::scale_by_clip_kernel<float>(c, clip); });
    for (size_t i = 0; i < g.size(); ++i)
      CHECK(same_bits(g[i], scaled ? cpu().unary(UnaryFn::mul_scalar, grads[i], max_norm / (want_norm + 1e-6))
                                   : grads[i]));
  }
}

// ---- embedding ----------------------------------------------------------------------------------

TEST_CASE("embedding kernels, emulated: the lookup, its index check and the backward give the cpu's bits",
          "[simt][embedding]") {
  std::mt19937 rng(16);
  const int64_t vocab = 11, c = 6;
  // Repeated ids (summed in position order), unused rows, and both index widths.
  std::vector<int64_t> ids = {3, 7, 3, 0, 10, 3, 7, 2, 2, 9, 3, 0, 5};
  const int64_t n = static_cast<int64_t>(ids.size());
  Tensor weight = random_tensor({vocab, c}, DType::f32, rng), dy = random_tensor({n, c}, DType::f32, rng);
  for (DType index_dtype : {DType::i64, DType::i32}) {
    INFO("indices in " << dtype_name(index_dtype));
    Tensor idx = Tensor::from_vector(ids, {n}).to(index_dtype);
    const bool is64 = index_dtype == DType::i64;
    IndexFault fault{};
    Tensor out = Tensor::empty({n, c});
    grid_stride([&] {
      emb::embedding_kernel<float>(idx.raw_data(), is64, weight.data<float>(), out.data<float>(), n, c, vocab, &fault);
    });
    CHECK(same_bits(out, cpu().embedding(idx, weight)));
    CHECK(fault.claimed == 0);

    // The backward as sparse_ops.cu runs it, with a stable sort for CUB's radix sort.
    std::vector<uint32_t> keys(n);
    std::vector<int32_t> positions(n), order(n), offsets(vocab + 1);
    grid_stride([&] {
      emb::embedding_keys_kernel(idx.raw_data(), is64, n, vocab, keys.data(), positions.data(), &fault);
    });
    std::vector<int32_t> by_key(positions);
    std::stable_sort(by_key.begin(), by_key.end(), [&](int32_t a, int32_t b) { return keys[a] < keys[b]; });
    std::vector<uint32_t> sorted_keys(n);
    for (int64_t i = 0; i < n; ++i) sorted_keys[i] = keys[by_key[i]], order[i] = positions[by_key[i]];
    grid_stride([&] { emb::embedding_offsets_kernel(sorted_keys.data(), n, vocab, offsets.data()); });
    Tensor dw = Tensor::empty({vocab, c});
    grid_stride([&] {
      emb::embedding_backward_kernel<float>(dy.data<float>(), order.data(), offsets.data(), dw.data<float>(), vocab, c);
    });
    CHECK(same_bits(dw, cpu().embedding_backward(dy, idx, vocab)));
    CHECK(fault.claimed == 0);
  }
  // A bad index: its row reads as zero, the record names the op, the index and its position, and
  // the backward sorts it past every row.
  std::vector<int64_t> bad = ids;
  bad[4] = vocab + 2;
  bad[9] = -1;
  Tensor idx = Tensor::from_vector(bad, {n});
  IndexFault fault{};
  Tensor out = Tensor::empty({n, c});
  grid_stride([&] {
    emb::embedding_kernel<float>(idx.raw_data(), true, weight.data<float>(), out.data<float>(), n, c, vocab, &fault);
  });
  CHECK(fault.claimed == 1);
  CHECK(fault.op == static_cast<int32_t>(IndexFaultOp::embedding));
  CHECK((fault.position == 4 || fault.position == 9));  // whichever thread came first
  CHECK(fault.value == bad[fault.position]);
  CHECK(fault.bound == vocab);
  std::vector<float> rows = out.to_vector<float>();
  CHECK(std::all_of(rows.begin() + 4 * c, rows.begin() + 5 * c, [](float v) { return v == 0.f; }));
  std::vector<uint32_t> keys(n);
  std::vector<int32_t> positions(n);
  IndexFault backward_fault{};
  grid_stride([&] {
    emb::embedding_keys_kernel(idx.raw_data(), true, n, vocab, keys.data(), positions.data(), &backward_fault);
  });
  CHECK(backward_fault.op == static_cast<int32_t>(IndexFaultOp::embedding_backward));
  CHECK(keys[4] == static_cast<uint32_t>(vocab));
  CHECK(keys[9] == static_cast<uint32_t>(vocab));
}

// ---- image and conditioning ops (dit, unet) -----------------------------------------------------

TEST_CASE("image kernels, emulated: upsampling, pooling, modulation and the timestep embedding",
          "[simt][image]") {
  std::mt19937 rng(17);
  const int f = 2;
  Tensor x = random_tensor({2, 3, 5, 4}, DType::f32, rng);  // [N, C, H, W]
  const int64_t h = 5, w = 4;
  // Upsampling copies; its backward and the pooling sum each window in the cpu's order.
  Tensor up = Tensor::empty({2, 3, h * f, w * f});
  grid_stride([&] { im::upsample_kernel<float>(x.data<float>(), up.data<float>(), up.numel(), h, w, f); });
  CHECK(same_bits(up, cpu().upsample_nearest(x, f)));
  Tensor dup = random_tensor(up.shape(), DType::f32, rng), dx = Tensor::empty(x.shape());
  grid_stride([&] { im::window_sum_kernel<float>(dup.data<float>(), dx.data<float>(), dx.numel(), h, w, f, 1.f); });
  CHECK(same_bits(dx, cpu().upsample_nearest_backward(dup, f)));
  Tensor pooled = Tensor::empty(x.shape());
  grid_stride([&] {
    im::window_sum_kernel<float>(dup.data<float>(), pooled.data<float>(), pooled.numel(), h, w, f, 1.f / (f * f));
  });
  CHECK(worst_relative(pooled, cpu().avg_pool(dup, f)) < 1e-6);
  Tensor spread = Tensor::empty(up.shape());
  grid_stride([&] {
    im::spread_kernel<float>(x.data<float>(), spread.data<float>(), spread.numel(), h, w, f, 1.f / (f * f));
  });
  CHECK(same_bits(spread, cpu().avg_pool_backward(x, f)));

  // adaLN modulation over [B, T, C] with a shift and scale per (batch, channel).
  const int64_t b = 2, t = 7, c = 5;
  Tensor tokens = random_tensor({b, t, c}, DType::f64, rng), shift = random_tensor({b, c}, DType::f64, rng),
         scale = random_tensor({b, c}, DType::f64, rng), dy = random_tensor({b, t, c}, DType::f64, rng);
  Tensor y = Tensor::empty(tokens.shape(), DType::f64);
  grid_stride([&] {
    im::modulate_kernel<double>(tokens.data<double>(), shift.data<double>(), scale.data<double>(), y.data<double>(),
                                y.numel(), t, c);
  });
  CHECK(worst_relative(y, cpu().modulate(tokens, shift, scale)) < 1e-14);
  Tensor mdx = Tensor::empty(tokens.shape(), DType::f64), dshift = Tensor::empty({b, c}, DType::f64),
         dscale = Tensor::empty({b, c}, DType::f64);
  grid_stride([&] {
    im::modulate_backward_kernel<double>(dy.data<double>(), tokens.data<double>(), scale.data<double>(),
                                         mdx.data<double>(), dshift.data<double>(), dscale.data<double>(), b, t, c);
  });
  std::vector<Tensor> want = cpu().modulate_backward(dy, tokens, scale);
  CHECK(worst_relative(mdx, want[0]) < 1e-14);
  CHECK(worst_relative(dshift, want[1]) < 1e-14);
  CHECK(worst_relative(dscale, want[2]) < 1e-14);

  // Timestep embedding: [B] -> [B, dim], cos then sin (dim even: the op checks it).
  Tensor steps = Tensor::from_vector(std::vector<double>{0.0, 3.0, 250.5, 999.0}, {4});
  for (int dim : {8, 34}) {
    const int64_t half = dim / 2;
    Tensor want_y = cpu().timestep_embedding(steps, dim, 10000.0);
    Tensor emb_y = Tensor::empty({4, dim}, DType::f64);
    grid_stride([&] { im::timestep_kernel<double>(steps.data<double>(), emb_y.data<double>(), 4, half, dim, 10000.0); });
    INFO("timestep embedding of dim " << dim);
    CHECK(worst_relative(emb_y, want_y) < 1e-12);
    Tensor dy_emb = random_tensor({4, dim}, DType::f64, rng), dt = Tensor::empty({4}, DType::f64);
    grid_stride([&] {
      im::timestep_backward_kernel<double>(steps.data<double>(), dy_emb.data<double>(), dt.data<double>(), 4, half,
                                           dim, 10000.0);
    });
    CHECK(worst_relative(dt, cpu().timestep_embedding_backward(dy_emb, steps, dim, 10000.0)) < 1e-9);
  }
}

// ---- the im2col convolution (conv2d where cuDNN cannot: f64, or a build without it) -------------

// c [m, n] = a [m, k] b [k, n] (a and b read through the given transposes), on the host in double.
std::vector<double> host_gemm(const std::vector<double>& a, bool ta, const std::vector<double>& b, bool tb, int64_t m,
                              int64_t n, int64_t k) {
  std::vector<double> c(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t e = 0; e < k; ++e) s += (ta ? a[e * m + i] : a[i * k + e]) * (tb ? b[j * k + e] : b[e * n + j]);
      c[i * n + j] = s;
    }
  return c;
}

TEST_CASE("convolution kernels, emulated: im2col, its adjoint and the bias kernels make the cpu's conv2d",
          "[simt][conv]") {
  std::mt19937 rng(18);
  struct Case {
    int64_t n, cin, h, w, cout, k;
    int stride, padding;
  };
  for (const Case& cs : {Case{2, 3, 6, 5, 4, 3, 1, 1}, Case{1, 2, 7, 7, 3, 3, 2, 0}, Case{2, 1, 5, 6, 2, 1, 1, 0}}) {
    INFO("conv " << cs.n << "x" << cs.cin << "x" << cs.h << "x" << cs.w << " by " << cs.cout << "x" << cs.k << "x"
                 << cs.k << ", stride " << cs.stride << ", padding " << cs.padding);
    Tensor x = random_tensor({cs.n, cs.cin, cs.h, cs.w}, DType::f64, rng);
    Tensor wt = random_tensor({cs.cout, cs.cin, cs.k, cs.k}, DType::f64, rng);
    Tensor bias = random_tensor({cs.cout}, DType::f64, rng);
    const conv::ConvShape s = conv::conv_shape(x, wt, cs.stride, cs.padding);
    const int64_t k = s.k(), p = s.p(), np = s.n * p;
    const std::vector<double> wv = wt.to_vector<double>();
    // Forward: each image's columns, W [Cout, K] times them, then the bias.
    std::vector<double> cols(static_cast<size_t>(s.n * k * p));
    grid_stride([&] { conv::im2col_kernel<double>(x.data<double>(), cols.data(), s, k * p, p); });
    std::vector<double> y(static_cast<size_t>(s.n * s.cout * p));
    for (int64_t i = 0; i < s.n; ++i) {
      std::vector<double> image(cols.begin() + i * k * p, cols.begin() + (i + 1) * k * p);
      std::vector<double> yi = host_gemm(wv, false, image, false, s.cout, p, k);
      std::copy(yi.begin(), yi.end(), y.begin() + i * s.cout * p);
    }
    Tensor yt = Tensor::from_vector(y, {s.n, s.cout, s.ho, s.wo});
    const int64_t total = yt.numel();
    grid_stride([&] { conv::add_channel_bias_kernel<double>(yt.data<double>(), bias.data<double>(), total, s.cout, p); });
    CHECK(worst_relative(yt, cpu().conv2d(x, wt, bias, cs.stride, cs.padding)) < 1e-13);

    // Backward: dcols = W^T dy per image, gathered onto the pixels; dw from the channels-first
    // gradient and the columns of all images side by side; db by a block per channel.
    Tensor dy = random_tensor(yt.shape(), DType::f64, rng);
    std::vector<Tensor> want = cpu().conv2d_backward(dy, x, wt, cs.stride, cs.padding, true);
    const std::vector<double> dyv = dy.to_vector<double>();
    std::vector<double> dcols(static_cast<size_t>(s.n * k * p));
    for (int64_t i = 0; i < s.n; ++i) {
      std::vector<double> dyi(dyv.begin() + i * s.cout * p, dyv.begin() + (i + 1) * s.cout * p);
      std::vector<double> di = host_gemm(wv, true, dyi, false, k, p, s.cout);
      std::copy(di.begin(), di.end(), dcols.begin() + i * k * p);
    }
    Tensor dx = Tensor::empty(x.shape(), DType::f64);
    grid_stride([&] { conv::col2im_kernel<double>(dcols.data(), dx.data<double>(), s); });
    CHECK(worst_relative(dx, want[0]) < 1e-13);
    std::vector<double> all_cols(static_cast<size_t>(k * np)), dyc(static_cast<size_t>(s.cout * np));
    grid_stride([&] { conv::im2col_kernel<double>(x.data<double>(), all_cols.data(), s, p, np); });
    grid_stride([&] { conv::channels_first_kernel<double>(dy.data<double>(), dyc.data(), s.n, s.cout, p); });
    Tensor dw = Tensor::from_vector(host_gemm(dyc, false, all_cols, true, s.cout, k, np), wt.shape());
    CHECK(worst_relative(dw, want[1]) < 1e-13);
    Tensor db = Tensor::empty({s.cout}, DType::f64);
    remat_simt::launch({static_cast<unsigned>(s.cout), 1, 1}, kThreads, 0,
                       [&] { conv::channel_sum_kernel<double>(dy.data<double>(), db.data<double>(), s.n, s.cout, p); });
    CHECK(worst_relative(db, want[2]) < 1e-13);
  }
}

}  // namespace
