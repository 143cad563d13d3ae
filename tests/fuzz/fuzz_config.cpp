// libFuzzer target: what the command line and run folders hand the library as numbers and names:
// model configs with overrides (remat train --channels ... and configs read back from files),
// devices, compute dtypes, byte counts (--max-memory) and time samplings. Each must be accepted or
// refused with a remat::Error, and never build a model (only its parameter count is asked).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>

#include "autograd/autocast.h"
#include "models/images.h"
#include "models/tasks.h"
#include "runtime/allocator.h"
#include "runtime/device.h"
#include "runtime/error.h"

namespace {

// Consumes the input front to back.
struct Input {
  const uint8_t* data;
  size_t size;
  uint8_t byte() { return size ? (--size, *data++) : 0; }
  double number() {
    double v = 0;
    size_t n = size < sizeof v ? size : sizeof v;
    std::memcpy(&v, data, n);
    data += n, size -= n;
    return v;
  }
  std::string text() {
    size_t n = byte() % 24;
    n = n < size ? n : size;
    std::string s(reinterpret_cast<const char*>(data), n);
    data += n, size -= n;
    return s;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in{data, size};
  const char* models[] = {"gpt", "dit", "unet", "resnet"};
  const char* names[] = {"tiny", "small", "gpt2", "huge"};
  const char* fields[] = {"vocab", "channels", "heads", "layers", "seq_len", "batch", "dropout", "image"};
  std::string model = models[in.byte() % 4], name = names[in.byte() % 4];
  std::map<std::string, double> overrides;
  for (int i = in.byte() % 4; i > 0; --i) overrides[fields[in.byte() % 8]] = in.number();
  try {
    int64_t n = remat::task_parameter_count(model, name, overrides);
    if (n <= 0) __builtin_trap();  // a config that passed its checks has parameters
  } catch (const remat::Error&) {
  }
  try {
    remat::Device d = remat::parse_device(in.text());
    remat::parse_compute_dtype(in.text(), d);
  } catch (const remat::Error&) {
  }
  try {
    remat::parse_time_sampling(in.text());
  } catch (const remat::Error&) {
  }
  try {
    if (remat::parse_byte_count(in.text()) < 1) __builtin_trap();
  } catch (const remat::Error&) {
  }
  return 0;
}
