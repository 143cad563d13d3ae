// libFuzzer target: the safetensors reader on arbitrary bytes. Any input must give a file or a
// remat::Error, never a crash, a sanitizer report or an allocation larger than the input.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "models/safetensors.h"
#include "runtime/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    remat::SafetensorsFile f = remat::read_safetensors(in, "fuzz");
    for (const auto& [name, t] : f.tensors)
      if (t.numel() > 0) (void)t.to_vector<double>()[0];  // the data is readable
  } catch (const remat::Error&) {
  }
  return 0;
}
