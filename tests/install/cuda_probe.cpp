// Run by the install test where CUDA's libraries cannot be loaded: the CPU must work, the CUDA
// part must report itself unavailable with the loader's reason, and asking for a GPU must be a
// clear error. Prints one line per fact; exits 0 when all hold.
#include <remat/remat.h>

#include <cstdio>
#include <string>

int main() {
  using namespace remat;
  Tensor x = Tensor::randn({4, 3}).set_requires_grad(true);
  backward(sum(gelu(x)));
  std::printf("cpu: gradient %s\n", x.grad().defined() ? "computed" : "MISSING");
  std::printf("cuda: built %s, %d device(s), reason: %s\n", cuda_built() ? "yes" : "no", cuda_device_count(),
              cuda_unavailable_reason().c_str());
  std::string error;
  try {
    Tensor::zeros({2}).to(Device::cuda(0));
  } catch (const Error& e) {
    error = e.what();
  }
  std::printf("cuda:0 request: %s\n", error.c_str());
  bool ok = x.grad().defined() && cuda_device_count() == 0 && !cuda_unavailable_reason().empty() &&
            error.find("cuda:0 requested, but") != std::string::npos;
  return ok ? 0 : 1;
}
