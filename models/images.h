// Synthetic images for the diffusion models, generated in code: one coloured shape (disc, square,
// triangle or cross) per image at a random position and size on a dark background, labelled by
// its shape. Pixels in [-1, 1], images [B, 3, S, S]. And the rectified-flow objective.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "nn/layers.h"
#include "../runtime/random.h"
#include "../runtime/tensor.h"

namespace remat {

inline constexpr float kBackground = -0.8f;  // every channel of the background

// Whether the point (dx, dy), in radii from the shape's centre (y down), is inside shape `cls`.
bool inside_shape(int cls, float dx, float dy);
const char* shape_name(int cls);  // "disc", "square", "triangle", "cross"

class ShapesTask {
 public:
  static constexpr int kClasses = 4;  // disc, square, triangle, cross
  static constexpr int kNoLabel = kClasses;  // a dropped label: the unconditional model of guidance
  ShapesTask(int64_t size, uint64_t seed);
  // Images [B, 3, S, S] (f32) and labels [B] (i64). With label_dropout > 0 each label is replaced
  // by kNoLabel with that probability (training for classifier-free guidance).
  std::pair<Tensor, Tensor> batch(int64_t batch, double label_dropout = 0);
  RngState state() const { return rng_.state(); }
  void set_state(RngState s) { rng_.set_state(s); }

 private:
  int64_t size_;
  RandomStream rng_;
};

// Class embeddings for labels [B] in [0, classes]: rows of `table` (classes rows) for the classes, zeros
// for the label `classes` (no label). The null embedding is zero rather than a learned row so that a
// model trained without dropped labels keeps its shapes and can be fine-tuned with them.
Tensor class_embedding(nn::Embedding& table, const Tensor& labels, int64_t classes);

// How training draws the time t of rectified flow. uniform: U(0, 1). logit_normal: sigmoid of N(0, 1)
// (SD3, Esser et al. 2024), which spends the steps on the middle times where the outlines of the
// images are decided, and few on the ends (near t = 0 the task is denoising a nearly clean image,
// near t = 1 predicting the mean image), which the model learns early anyway.
enum class TimeSampling { uniform, logit_normal };
TimeSampling parse_time_sampling(const std::string& name);  // "uniform" or "logit-normal"
const char* time_sampling_name(TimeSampling s);

// Rectified flow: x_t = (1 - t) x0 + t x1 with x1 ~ N(0, 1) and t drawn by `times`; the model
// predicts the velocity x1 - x0 and the loss is its mean squared error. `model(x_t, t, labels)`
// returns [B, 3, S, S].
// Data parallel: with rows >= 0, this process computes rows [row_begin, row_begin + rows) of the
// batch x0 [B, ...]: the noise and times are drawn for the whole batch (so each sample gets its own
// whichever process computes it) and the model runs on those rows, its random ops in a batch shard.
using VelocityModel = std::function<Tensor(const Tensor& x_t, const Tensor& t, const Tensor& labels)>;
Tensor rectified_flow_loss(const VelocityModel& model, const Tensor& x0, const Tensor& labels,
                           TimeSampling times = TimeSampling::uniform, int64_t row_begin = 0, int64_t rows = -1);

// How much an image [3, S, S] looks like each class: its foreground (pixels away from the background
// colour) against the best-fitting outline of the class over centre and radius, as intersection
// over union (1: the outline exactly, up to the pixel grid). iou[] is 0 and best_class -1 for an
// empty image.
struct ShapeFit {
  int best_class = -1;
  double iou[ShapesTask::kClasses] = {};
  int64_t area = 0;  // foreground pixels
};
std::vector<ShapeFit> fit_shapes(const Tensor& images);  // [N, 3, S, S]

// How a batch of samples matches its labels. "Classified": the label's outline fits best of all
// classes. "Recognised": classified, and with an IoU of at least min_iou, the measure behind
// "recognisable shapes" (remat sample prints it). The bar is strict for small shapes, whose rim of
// one pixel is much of their area: a clean shape scores 0.95 or more, a square with rounded
// corners fits a disc better than a square.
struct ShapeScore {
  int64_t classified = 0, recognised = 0, n = 0;
  double mean_iou = 0;                                // with the label's outline
  std::vector<std::pair<int64_t, int64_t>> per_class;  // (recognised, n) by label
};
inline constexpr double kRecognisedIou = 0.8;
ShapeScore score_shapes(const Tensor& images, const std::vector<int64_t>& labels, double min_iou = kRecognisedIou);

}  // namespace remat
