// Sampling from a trained diffusion model: steps from noise (t = 1) to images (t = 0), Euler steps of
// the rectified-flow ODE or stochastic (DDPM-like) steps, optionally with classifier-free guidance,
// written as a PNG grid (libpng), one class per column cycling.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "../runtime/tensor.h"

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
  // Stochasticity of each step in [0, 1]: 0 = Euler steps of the ODE (deterministic); 1 = draws
  // from the Gaussian posterior q(x_s | x_t, x0 = predicted x0) of the flow's forward process
  // (ancestral sampling, DDPM), which re-noises the images and so corrects the errors an imperfect
  // model accumulates along the ODE; values between scale the fresh noise as DDIM's eta.
  double eta = 0.0;
};

// One step from time t to s < t given the velocity v at x_t: the predicted x0 = x_t - t v and
// noise x1 = x_t + (1 - t) v are recombined as x_s = (1 - s) x0 + sqrt(s^2 - c^2) x1 + c z, where c
// is eta times the posterior standard deviation (z ~ N(0, 1), drawn only when c > 0). eta = 0 is the
// Euler step x_t - (t - s) v.
Tensor flow_sampler_step(const Tensor& x_t, const Tensor& v, double t, double s, double eta);

// Called after each step with (steps done, steps in all): progress display.
using SampleProgress = std::function<void(int, int)>;

// The grid's columns for n images (ceil(sqrt(n))) and the label of each image: one class per column,
// cycling through the classes.
int64_t grid_columns(int64_t n);
std::vector<int64_t> sample_labels(int64_t n);

// Returns the images [n, 3, S, S] in [-1, 1] (labelled by sample_labels) and writes the PNG grid
// (atomically).
Tensor sample_images(const SampleOptions& options, const SampleProgress& on_step = {});

// The rectified-flow loss of trained weights at `times` evenly spaced flow times (bin centres), on the
// same n images and noise for every time: where along the path from noise to image the model is wrong.
struct FlowLossAtTime {
  double t, loss;
};
std::vector<FlowLossAtTime> flow_loss_by_time(const std::string& weights, int64_t n = 64, int times = 10,
                                              uint64_t seed = 0,
                                              const std::function<void(const FlowLossAtTime&)>& on_time = {});

// An RGB PNG of images [N, 3, S, S] in [-1, 1], laid out in a grid of `columns` with 2-pixel gaps.
void write_png_grid(const std::string& path, const Tensor& images, int64_t columns, int scale = 1);

}  // namespace remat
