// Runtime: dtypes, devices, shapes, tensor handles and views, conversions, Philox, allocator counters.
#include <catch.hpp>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "runtime/philox.h"
#include "remat.h"
#include "runtime/cuda_backend.h"
#include "runtime/half.h"

using namespace remat;
using Catch::Matchers::Contains;

TEST_CASE("dtype and device names parse and print", "[runtime]") {
  CHECK(parse_dtype("bf16") == DType::bf16);
  CHECK(dtype_size(DType::f16) == 2);
  CHECK_THROWS_WITH(parse_dtype("f8"), Contains("unknown dtype 'f8'") && Contains("f32, f64"));
  CHECK(parse_device("cpu") == Device::cpu());
  CHECK(parse_device("cuda:1") == Device::cuda(1));
  CHECK(Device::cuda(3).str() == "cuda:3");
  CHECK_THROWS_WITH(parse_device("gpu"), Contains("expected cpu, cuda or cuda:N"));
  // An index too large for int once escaped as std::out_of_range ("stoi"; found by fuzz_config).
  for (const char* bad : {"cuda:77777777777777777777", "cuda:-1", "cuda:+1", "cuda:", "cuda:1x"})
    CHECK_THROWS_WITH(parse_device(bad), Contains("expected cuda:N with N a device index"));
}

TEST_CASE("broadcasting follows NumPy and names the op on failure", "[runtime]") {
  CHECK(broadcast_shapes({2, 1, 4}, {3, 1}, "add") == Shape{2, 3, 4});
  CHECK(broadcast_shapes({}, {5}, "add") == Shape{5});
  CHECK_THROWS_WITH(broadcast_shapes({2, 3}, {4}, "mul"), Contains("mul: expected broadcastable shapes, got [2,3] and [4]"));
}

TEST_CASE("view_strides: runs contiguous within themselves split and merge in place, others do not", "[runtime]") {
  using S = Strides;
  CHECK(*view_strides({2, 3, 4}, {12, 4, 1}, {6, 4}) == S{4, 1});
  CHECK(*view_strides({2, 3, 4}, {12, 4, 1}, {24}) == S{1});
  // The middle third of a fused projection [2, 5, 24]: rows of 8 with a row stride of 24.
  CHECK(*view_strides({2, 5, 8}, {120, 24, 1}, {2, 5, 2, 4}) == S{120, 24, 4, 1});
  CHECK(*view_strides({2, 5, 8}, {120, 24, 1}, {10, 8}) == S{24, 1});  // batch and time merge
  CHECK_FALSE(view_strides({2, 5, 8}, {120, 24, 1}, {2, 40}));         // a row and the next do not
  CHECK_FALSE(view_strides({4, 3, 2}, {1, 4, 12}, {12, 2}));          // a transpose must copy
  // Size-1 dimensions carry no layout, in either shape (their strides are free: not compared);
  // empty and 0-d tensors always view.
  auto without_ones = [](const Shape& shape, std::optional<Strides> strides) {
    REQUIRE(strides);
    Strides kept;
    for (size_t i = 0; i < shape.size(); ++i)
      if (shape[i] != 1) kept.push_back((*strides)[i]);
    return kept;
  };
  CHECK(without_ones({4, 3, 1, 2}, view_strides({4, 3, 2}, {1, 4, 12}, {4, 3, 1, 2})) == S{1, 4, 12});
  CHECK(*view_strides({1, 6}, {100, 1}, {2, 3}) == S{3, 1});
  CHECK(without_ones({1, 6, 1}, view_strides({6}, {2}, {1, 6, 1})) == S{2});
  CHECK(view_strides({}, {}, {1, 1}).has_value());
  CHECK(*view_strides({0, 3}, {3, 1}, {3, 0}) == S{0, 1});
}

TEST_CASE("errors carry the message and the source location", "[runtime]") {
  try {
    REMAT_CHECK(1 == 2, "expected ", 1, " got ", 2);
    FAIL("no throw");
  } catch (const Error& e) {
    CHECK(e.message() == "expected 1 got 2");
    CHECK_THAT(e.what(), Contains("test_runtime.cpp:"));
  }
}

TEST_CASE("tensor factories fill values and views share storage", "[runtime]") {
  Tensor a = Tensor::arange(6);
  CHECK(a.to_vector<float>() == std::vector<float>{0, 1, 2, 3, 4, 5});
  Tensor m = a.view({2, 3}, {3, 1}, 0);
  Tensor t = m.view({3, 2}, {1, 3}, 0);  // transpose
  CHECK_FALSE(t.is_contiguous());
  CHECK(t.to_vector<float>() == std::vector<float>{0, 3, 1, 4, 2, 5});
  CHECK(t.storage() == a.storage());
  Tensor c = t.as_contiguous();
  CHECK(c.is_contiguous());
  CHECK(c.storage() != a.storage());
  CHECK(Tensor::full({2}, 2.5, DType::f64).to_vector<double>() == std::vector<double>{2.5, 2.5});
  CHECK_THROWS_WITH(Tensor::from_vector<float>({1, 2, 3}, {2, 2}), Contains("expected 4 values for shape [2,2], got 3"));
  CHECK_THROWS_WITH(a.data<double>(), Contains("data<f64>: tensor is f32"));
}

TEST_CASE("fill_ writes the value's bits into every element of every dtype and size", "[runtime]") {
  // fill_ replicates one converted element; compare with an element-by-element conversion.
  for (DType dtype : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8}) {
    for (int64_t n : {0, 1, 2, 3, 7, 64, 1001}) {
      for (double value : {0.0, -0.0, 1.0, -2.5, 3.0, 100.0}) {
        if ((dtype == DType::u8 && value < 0) || (!is_floating(dtype) && value != std::trunc(value))) continue;
        Tensor t = Tensor::full({n}, 7.0, dtype);
        t.fill_(value);
        Tensor one = Tensor::from_vector<double>({value}, {1}).to(dtype);
        std::vector<uint8_t> expected_bits(static_cast<size_t>(one.nbytes()));
        std::memcpy(expected_bits.data(), one.raw_data(), expected_bits.size());
        const auto* bytes = static_cast<const uint8_t*>(t.raw_data());
        bool all_equal = true;
        for (int64_t i = 0; i < n; ++i)
          all_equal = all_equal && std::memcmp(bytes + i * one.nbytes(), expected_bits.data(), expected_bits.size()) == 0;
        INFO(dtype_name(dtype) << " n " << n << " value " << value);
        CHECK(all_equal);
      }
    }
  }
}

TEST_CASE("as_contiguous copies any strided view like an index-by-index walk", "[runtime]") {
  // The reference: element i of the view is at offset sum(index_d * stride_d) in the storage.
  auto naive = [](const Tensor& base, const Shape& shape, const Strides& strides, int64_t offset) {
    std::vector<double> all = base.to_vector<double>(), out;
    std::vector<int64_t> index(shape.size(), 0);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    for (int64_t i = 0; i < n; ++i) {
      int64_t at = offset, rest = i;
      for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
        at += (rest % shape[d]) * strides[d];
        rest /= shape[d];
      }
      out.push_back(all[at]);
    }
    return out;
  };
  struct Case {
    Shape shape;
    Strides strides;
    int64_t offset;
  };
  // 6 x 5 x 4 x 3 = 360 elements of storage; views of it.
  std::vector<Case> cases = {
      {{3, 4, 5, 6}, {1, 3, 12, 60}, 0},      // fully reversed dims
      {{6, 5, 2, 3}, {60, 12, 3, 1}, 0},      // a slice of the third dim: rows stay contiguous
      {{6, 1, 4, 1, 3}, {60, 7, 3, 9, 1}, 0},  // size-1 dims with odd strides
      {{2, 10, 3}, {120, 12, 2}, 5},          // strided inner dim, with an offset
      {{5, 6}, {12, 60}, 1},                  // a transposed slice
      {{360}, {1}, 0},                        // already contiguous
      {{0, 3}, {3, 1}, 0},                    // empty
      {{}, {}, 17},                           // a scalar
      {{4, 3, 30}, {0, 1, 3}, 0},             // broadcast (stride 0)
      {{6, 60}, {1, 6}, 0},                   // a transpose (tiles through a buffer), smaller than a tile
      {{2, 20, 9}, {180, 1, 20}, 0},          // [B, T, C] -> [B, C, T]: two runs of transposed rows
  };
  for (DType dtype : {DType::f32, DType::f64, DType::i64, DType::bf16}) {
    Tensor base = Tensor::arange(360, DType::f64).to(dtype);
    for (const Case& c : cases) {
      INFO(dtype_name(dtype) << " " << shape_str(c.shape));
      Tensor v = base.view(c.shape, c.strides, c.offset);
      Tensor copy = v.as_contiguous();
      CHECK(copy.is_contiguous());
      CHECK(copy.to_vector<double>() == naive(base, c.shape, c.strides, c.offset));
    }
  }
  // Large enough to take the threaded path.
  Tensor big = Tensor::arange(8 * 128 * 8 * 32, DType::f64).to(DType::f32);
  Tensor heads = big.view({8, 8, 128, 32}, {128 * 8 * 32, 32, 8 * 32, 1}, 0);  // [B,T,H,D] -> [B,H,T,D]
  CHECK(heads.as_contiguous().to_vector<double>() == naive(big, heads.shape(), heads.strides(), 0));
  // Transposes over many tiles, with partial tiles and column chunks at the ends, in every width.
  for (DType dtype : {DType::f32, DType::f64, DType::bf16}) {
    Tensor wide = Tensor::arange(3 * 250 * 141, DType::f64).to(dtype);
    for (const Case& c : std::vector<Case>{{{141, 250}, {1, 141}, 0}, {{3, 141, 250}, {250 * 141, 1, 141}, 0}}) {
      INFO(dtype_name(dtype) << " " << shape_str(c.shape));
      CHECK(wide.view(c.shape, c.strides, c.offset).as_contiguous().to_vector<double>() ==
            naive(wide, c.shape, c.strides, c.offset));
    }
  }
}

TEST_CASE("in-place writes bump the version counter shared by views", "[runtime]") {
  Tensor a = Tensor::zeros({4});
  Tensor v = a.view({2}, {1}, 2);
  uint64_t before = v.version();
  a.fill_(1.0);
  CHECK(v.version() == before + 1);
  CHECK(v.to_vector<float>() == std::vector<float>{1, 1});
}

TEST_CASE("bf16 and f16 conversions round to nearest even", "[runtime]") {
  CHECK(bf16_to_f32(f32_to_bf16(1.0f)) == 1.0f);
  CHECK(bf16_to_f32(f32_to_bf16(1.00390625f)) == 1.0f);        // halfway, rounds to even
  CHECK(bf16_to_f32(f32_to_bf16(1.01171875f)) == 1.015625f);   // halfway, rounds up to even
  CHECK(f16_to_f32(f32_to_f16(0.1f)) == Approx(0.0999755859375f).margin(0));
  CHECK(f16_to_f32(f32_to_f16(65504.0f)) == 65504.0f);
  CHECK(std::isinf(f16_to_f32(f32_to_f16(70000.0f))));
  CHECK(f16_to_f32(f32_to_f16(5.9604645e-8f)) == 5.9604645e-8f);  // smallest subnormal
  Tensor x = Tensor::from_vector<float>({0.5f, -2.0f, 3.25f}, {3});
  CHECK(x.to(DType::bf16).to(DType::f32).to_vector<float>() == x.to_vector<float>());
  CHECK(x.to(DType::f16).to_vector<float>() == x.to_vector<float>());
}

TEST_CASE("philox 4x32-10 matches the Random123 known-answer vectors", "[runtime][rng]") {
  // Random123 kat_vectors: philox4x32 10 rounds, counter 0 and key 0.
  philox::U32x4 zero = philox::philox4x32_10(0, 0);
  CHECK(zero.v[0] == 0x6627e8d5u);
  CHECK(zero.v[1] == 0xe169c58du);
  CHECK(zero.v[2] == 0xbc57ac4cu);
  CHECK(zero.v[3] == 0x9b00dbd8u);
}

TEST_CASE("philox fill_bits gives bits_at's values for any start and length", "[runtime][rng]") {
  const uint64_t seed = 0x1234567890abcdefull, offset = (uint64_t(1) << 32) - 3;  // blocks cross 2^32
  for (uint64_t first : {0, 1, 2, 3, 5, 63, 64, 1000}) {
    for (uint64_t n : {0, 1, 3, 4, 63, 64, 65, 200, 1031}) {
      std::vector<uint32_t> fast(n);
      philox::fill_bits(seed, offset, first, n, fast.data());
      for (uint64_t i = 0; i < n; ++i) {
        INFO("first " << first << ", n " << n << ", i " << i);
        REQUIRE(fast[i] == philox::bits_at(seed, offset, first + i));
      }
    }
  }
}

TEST_CASE("the random stream advances and replays from a saved state", "[runtime][rng]") {
  manual_seed(42);
  RngState start = rng_state();
  Tensor a = Tensor::rand({10});
  CHECK(rng_state().offset == start.offset + 3);  // 10 values in blocks of 4
  set_rng_state(start);
  Tensor b = Tensor::rand({10});
  CHECK(a.to_vector<float>() == b.to_vector<float>());
  Tensor n = Tensor::randn({20000}, DType::f64);
  auto v = n.to_vector<double>();
  double m = 0, s = 0;
  for (double x : v) m += x;
  m /= v.size();
  for (double x : v) s += (x - m) * (x - m);
  CHECK(std::abs(m) < 0.03);
  CHECK(std::abs(std::sqrt(s / v.size()) - 1.0) < 0.03);
}

TEST_CASE("allocator counters are exact for a known sequence of allocations", "[runtime][memory]") {
  Allocator& cpu = allocator_for(Device::cpu());
  cpu.reset_peak();
  MemoryStats base = cpu.stats();
  const auto& base_param = base[MemoryCategory::parameter];
  {
    Tensor p;
    {
      MemoryCategoryScope scope(MemoryCategory::parameter);
      p = Tensor::empty({256}, DType::f32);  // 1024 bytes of parameter
    }
    Tensor a = Tensor::empty({100}, DType::f64);  // 800 bytes of activation
    {
      Tensor w = Tensor::empty({50}, DType::f32);  // 200 more, freed at once
    }
    MemoryStats s = cpu.stats();
    CHECK(s.total.current - base.total.current == 1824);
    CHECK(s.total.peak - base.total.current == 2024);
    CHECK(s[MemoryCategory::parameter].current - base_param.current == 1024);
    CHECK(s[MemoryCategory::activation].allocated - base[MemoryCategory::activation].allocated == 1000);
    CHECK(s[MemoryCategory::activation].freed - base[MemoryCategory::activation].freed == 200);
  }
  MemoryStats end = cpu.stats();
  CHECK(end.total.current == base.total.current);
  CHECK(end.total.peak - base.total.current == 2024);
  cpu.reset_peak();
  CHECK(cpu.stats().total.peak == base.total.current);
}

TEST_CASE("the cpu allocator hands freed blocks of 64 KiB and more out again, as reserved bytes, until emptied",
          "[runtime][memory]") {
  const bool caching = cpu_caching();
  set_cpu_caching(true);  // off by default under AddressSanitizer
  empty_cache();
  Allocator& cpu = allocator_for(Device::cpu());
  const MemoryStats base = cpu.stats();
  CHECK(cpu_cached_bytes() == 0);
  constexpr int64_t kBlock = 256 << 10;
  const void* first = nullptr;
  {
    Tensor t = Tensor::empty({kBlock / 4}, DType::f32);
    first = t.raw_data();
  }
  CHECK(cpu_cached_bytes() == kBlock);
  CHECK(cpu.stats().reserved - base.reserved == kBlock);
  CHECK(cpu.stats().total.current == base.total.current);  // the counters count live bytes only
  {
    Tensor other = Tensor::empty({kBlock / 4 + 16}, DType::f32);  // another size: a block of its own
    CHECK(other.raw_data() != first);
    Tensor same = Tensor::empty({kBlock / 8}, DType::f64);  // the same size
    CHECK(same.raw_data() == first);
    CHECK(cpu_cached_bytes() == 0);
    Tensor small = Tensor::empty({1000}, DType::f32);  // under 64 KiB: left to malloc
  }
  CHECK(cpu_cached_bytes() >= kBlock);
  empty_cache();
  CHECK(cpu_cached_bytes() == 0);
  CHECK(cpu.stats().reserved == base.reserved);
  set_cpu_caching(false);
  {
    Tensor t = Tensor::empty({kBlock / 4}, DType::f32);
  }
  CHECK(cpu_cached_bytes() == 0);
  CHECK(cpu.stats().reserved == base.reserved);
  set_cpu_caching(caching);
}

TEST_CASE("the memory recorder logs allocs and frees with their category", "[runtime][memory]") {
  Allocator& cpu = allocator_for(Device::cpu());
  cpu.start_recording();
  {
    MemoryCategoryScope scope(MemoryCategory::workspace);
    Tensor t = Tensor::empty({8}, DType::f64);
  }
  auto events = cpu.stop_recording();
  REQUIRE(events.size() == 2);
  CHECK(events[0].bytes == 64);
  CHECK(events[1].bytes == -64);
  CHECK(events[0].category == MemoryCategory::workspace);
  CHECK(events[1].time_us >= events[0].time_us);
}

TEST_CASE("storage that changes what it holds moves between categories, the total unchanged", "[runtime][memory]") {
  Allocator& cpu = allocator_for(Device::cpu());
  cpu.reset_peak();
  MemoryStats base = cpu.stats();
  auto moved = [&](const MemoryStats& s, MemoryCategory c) { return s[c].current - base[c].current; };
  cpu.start_recording();
  {
    Tensor t = Tensor::empty({100}, DType::f32);  // 400 bytes of activation
    t.storage()->set_category(MemoryCategory::gradient);
    MemoryStats s = cpu.stats();
    CHECK(s.total.current - base.total.current == 400);
    CHECK(s.total.peak - base.total.current == 400);
    CHECK(moved(s, MemoryCategory::activation) == 0);
    CHECK(moved(s, MemoryCategory::gradient) == 400);
    CHECK(s[MemoryCategory::gradient].peak - base[MemoryCategory::gradient].current >= 400);
    CHECK(s[MemoryCategory::activation].freed - base[MemoryCategory::activation].freed == 400);
  }
  auto events = cpu.stop_recording();
  MemoryStats end = cpu.stats();
  CHECK(end.total.current == base.total.current);
  CHECK(moved(end, MemoryCategory::gradient) == 0);  // freed as what it held last
  CHECK(moved(end, MemoryCategory::activation) == 0);
  REQUIRE(events.size() == 4);  // allocated, moved out and in, freed
  CHECK((events[1].bytes == -400 && events[1].category == MemoryCategory::activation));
  CHECK((events[2].bytes == 400 && events[2].category == MemoryCategory::gradient));
  CHECK((events[3].bytes == -400 && events[3].category == MemoryCategory::gradient));
}

TEST_CASE("cuda discovery reports devices without throwing, zero on a machine without a GPU", "[runtime][cuda-discovery]") {
  int n = cuda_device_count();
  CHECK(n >= 0);
  if (n == 0) CHECK_THROWS_WITH(Tensor::zeros({2}).to(Device::cuda(0)), Contains("cuda:0"));
  // The CUDA part built beside this binary loads, GPU or not: a symbol it leaves unresolved (a
  // library it names but does not link) would fail the load and turn every GPU away.
  if (cuda_built()) CHECK(cuda_unavailable_reason().find("could not be loaded") == std::string::npos);
}

TEST_CASE("linear's cuBLASLt epilogue switches: their defaults, read from the environment once, a bad value a "
          "clear error",
          "[runtime][cuda-discovery]") {
  // Nothing else in this binary asks for these settings, so the first read here is the first read.
  struct Switch {
    const char* variable;
    bool (*get)();
    void (*set)(bool);
    bool fallback;  // when the variable is unset
  };
  for (const Switch& s : {Switch{"REMAT_CUDA_BIAS_EPILOGUE", cuda_bias_epilogue, set_cuda_bias_epilogue, true},
                          Switch{"REMAT_CUDA_BIAS_GRAD_EPILOGUE", cuda_bias_grad_epilogue,
                                 set_cuda_bias_grad_epilogue, false}}) {
    INFO(s.variable);
    const char* was = std::getenv(s.variable);
    const std::string saved = was ? was : "";
    setenv(s.variable, "yes", 1);
    CHECK_THROWS_WITH(s.get(), Contains(std::string(s.variable) + ": expected 0 or 1, got 'yes'"));
    unsetenv(s.variable);
    CHECK(s.get() == s.fallback);
    setenv(s.variable, s.fallback ? "0" : "1", 1);
    CHECK(s.get() == s.fallback);  // read once: the process keeps what it read
    s.set(!s.fallback);
    CHECK(s.get() == !s.fallback);
    if (was) setenv(s.variable, saved.c_str(), 1);
    else unsetenv(s.variable);
  }
}

TEST_CASE("the cuda attention path is auto unless chosen, by name or by setting", "[runtime][cuda-discovery]") {
  // Unset in the test environment: each call picks the fastest path that fits its inputs.
  if (std::getenv("REMAT_CUDA_ATTENTION") == nullptr) CHECK(cuda_attention() == CudaAttention::automatic);
  CHECK(parse_cuda_attention("auto") == CudaAttention::automatic);
  CHECK(std::string(cuda_attention_name(CudaAttention::automatic)) == "auto");
  CHECK(parse_cuda_attention("gemm") == CudaAttention::gemm);
  CHECK(parse_cuda_attention("flash") == CudaAttention::flash);
  CHECK(parse_cuda_attention("mma") == CudaAttention::mma);
  CHECK(std::string(cuda_attention_name(CudaAttention::mma)) == "mma");
  CHECK(parse_cuda_attention("cudnn") == CudaAttention::cudnn);
  CHECK(std::string(cuda_attention_name(CudaAttention::cudnn)) == "cudnn");
  CHECK_THROWS_WITH(parse_cuda_attention("cudnn9"), Contains("expected auto, flash, gemm, mma or cudnn, got 'cudnn9'"));
  const CudaAttention before = cuda_attention();
  set_cuda_attention(CudaAttention::gemm);
  CHECK(cuda_attention() == CudaAttention::gemm);
  CHECK(std::string(cuda_attention_name(cuda_attention())) == "gemm");
  set_cuda_attention(before);
}
