// `remat-bench twin`: one f64 forward and backward of a model with its weights, inputs, loss and
// gradients written to a safetensors file, so that a PyTorch twin (bench/peer) can show it computes
// the same function before the two are timed against each other.
#pragma once

#include <cstdint>
#include <string>

namespace remat::bench {

struct TwinOptions {
  std::string model = "dit";  // gpt, dit or unet
  std::string config = "tiny";
  uint64_t seed = 1;
  std::string out;  // the safetensors file to write
};

// Writes `param.<name>` (every parameter, after a random perturbation), `grad.<name>`, the inputs
// (gpt: `input.idx`, `input.targets`; dit and unet: `input.x_t`, `input.t`, `input.labels`,
// `input.target`) and `output.loss`, without dropout; returns 0.
int run_twin(const TwinOptions& options);

}  // namespace remat::bench
