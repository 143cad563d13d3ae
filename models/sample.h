// Sampling from a trained diffusion model: Euler steps of the rectified-flow ODE from noise (t = 1)
// to images (t = 0), optionally with classifier-free guidance, written as a PNG grid (libpng), one
// class per column cycling.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "runtime/tensor.h"

namespace remat {

struct SampleOptions {
  std::string model;    // "" = from the weights file's metadata
  std::string weights;  // model.safetensors written by `remat train`
  std::string out = "samples.png";
  int64_t n = 16;
  int steps = 32;
  uint64_t seed = 0;
  int scale = 1;        // enlarge each pixel to scale x scale in the PNG
  // Classifier-free guidance: v = v_uncond + guidance (v_cond - v_uncond); 1 = the conditional
  // velocity alone. Other values need weights trained with --label-dropout.
  double guidance = 1.0;
};

// Called after each Euler step with (steps done, steps in all): progress display.
using SampleProgress = std::function<void(int, int)>;

// Returns the images [n, 3, S, S] in [-1, 1] and writes the PNG grid (atomically).
Tensor sample_images(const SampleOptions& options, const SampleProgress& on_step = {});

// An RGB PNG of images [N, 3, S, S] in [-1, 1], laid out in a grid of `columns` with 2-pixel gaps.
void write_png_grid(const std::string& path, const Tensor& images, int64_t columns, int scale = 1);

}  // namespace remat
