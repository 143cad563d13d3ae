// CUDA suite ([cuda]): exits 77 (skipped) on a machine without a GPU; listing works anywhere.
#define CATCH_CONFIG_RUNNER
#include <catch.hpp>
#include <cstdio>
#include <string>

#include "remat.h"
#include "runtime/cuda_backend.h"

using namespace remat;

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::string(argv[i]).rfind("--list", 0) == 0;
  if (!listing && cuda_device_count() == 0) {
    std::printf("test_cuda: %s; skipping the CUDA suite\n",
                cuda_built() ? "no CUDA device found" : "remat was built without CUDA");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}

TEST_CASE("cuda allocator counts a round trip of bytes exactly", "[cuda]") {
  Device gpu = Device::cuda(0);
  reset_peak_memory(gpu);
  MemoryStats before = memory_stats(gpu);
  {
    Tensor host = Tensor::arange(1000, DType::f32);
    Tensor dev = host.to(gpu);
    MemoryStats during = memory_stats(gpu);
    CHECK(during.total.current - before.total.current == 4000);
    CHECK(dev.to(Device::cpu()).to_vector<float>() == host.to_vector<float>());
  }
  MemoryStats after = memory_stats(gpu);
  CHECK(after.total.current == before.total.current);
  CHECK(after.total.peak - before.total.current == 4000);
}

TEST_CASE("cuda device discovery names the device", "[cuda]") {
  REQUIRE(cuda_device_count() > 0);
  CHECK(!cuda_device_name(0).empty());
}
