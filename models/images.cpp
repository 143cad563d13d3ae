// Shape images and the rectified-flow loss.
#include "models/images.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "autograd/ops.h"
#include "runtime/random.h"

namespace remat {

bool inside_shape(int cls, float dx, float dy) {
  switch (cls) {
    case 0: return dx * dx + dy * dy <= 1.0f;                                        // disc
    case 1: return std::abs(dx) <= 0.8f && std::abs(dy) <= 0.8f;                      // square
    case 2: return dy <= 0.8f && dy >= -0.9f + 2.0f * std::abs(dx);                   // triangle
    case 3: return (std::abs(dx) <= 0.3f && std::abs(dy) <= 1.0f) ||                  // cross
                   (std::abs(dy) <= 0.3f && std::abs(dx) <= 1.0f);
    default: REMAT_FAIL("inside_shape: expected a class in [0, ", ShapesTask::kClasses, "), got ", cls);
  }
}

const char* shape_name(int cls) {
  static const char* const names[] = {"disc", "square", "triangle", "cross"};
  REMAT_CHECK(cls >= 0 && cls < ShapesTask::kClasses, "shape_name: expected a class in [0, ", ShapesTask::kClasses,
              "), got ", cls);
  return names[cls];
}

ShapesTask::ShapesTask(int64_t size, uint64_t seed) : size_(size), rng_(seed) {
  REMAT_CHECK(size >= 8, "shapes task: expected images of at least 8x8, got ", size);
}

std::pair<Tensor, Tensor> ShapesTask::batch(int64_t batch, double label_dropout) {
  REMAT_CHECK(label_dropout >= 0 && label_dropout < 1, "shapes task: expected a label dropout in [0, 1), got ", label_dropout);
  const int64_t s = size_;
  std::vector<float> pixels(batch * 3 * s * s, kBackground);
  std::vector<int64_t> labels(batch);
  for (int64_t b = 0; b < batch; ++b) {
    int cls = static_cast<int>(rng_.uniform() * kClasses) % kClasses;
    labels[b] = cls;
    float radius = s * (0.18f + 0.14f * rng_.uniform());
    float cx = radius + (s - 2 * radius) * rng_.uniform(), cy = radius + (s - 2 * radius) * rng_.uniform();
    float color[3] = {0.2f + 0.8f * rng_.uniform(), 0.2f + 0.8f * rng_.uniform(), 0.2f + 0.8f * rng_.uniform()};
    for (int64_t y = 0; y < s; ++y)
      for (int64_t x = 0; x < s; ++x) {
        float dx = (x + 0.5f - cx) / radius, dy = (y + 0.5f - cy) / radius;
        if (!inside_shape(cls, dx, dy)) continue;
        for (int c = 0; c < 3; ++c) pixels[((b * 3 + c) * s + y) * s + x] = 2.0f * color[c] - 1.0f;
      }
    // Drawn only when dropping, so that runs without it keep the data stream they always had.
    if (label_dropout > 0 && rng_.uniform() < label_dropout) labels[b] = kNoLabel;
  }
  return {Tensor::from_vector(pixels, {batch, 3, s, s}), Tensor::from_vector(labels, {batch})};
}

Tensor class_embedding(nn::Embedding& table, const Tensor& labels, int64_t classes) {
  REMAT_CHECK(labels.dim() == 1 && labels.dtype() == DType::i64, "class embedding: expected labels [B] of i64, got ",
              shape_str(labels.shape()), " of ", dtype_name(labels.dtype()));
  // The labels are a handful of integers: reading them on the host is cheap (one sync on cuda).
  std::vector<int64_t> ids = labels.to(Device::cpu()).to_vector<int64_t>();
  bool any_dropped = false;
  for (int64_t& id : ids) {
    REMAT_CHECK(id >= 0 && id <= classes, "class embedding: expected labels in [0, ", classes, "] (", classes,
                ": no label), got ", id);
    if (id == classes) any_dropped = true;
  }
  if (!any_dropped) return table(labels);
  std::vector<float> keep(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    keep[i] = ids[i] == classes ? 0.0f : 1.0f;
    if (ids[i] == classes) ids[i] = 0;  // any row: it is multiplied by zero, and so is its gradient
  }
  int64_t b = static_cast<int64_t>(ids.size());
  Tensor rows = table(Tensor::from_vector(ids, {b}).to(labels.device()));
  Tensor mask = Tensor::from_vector(keep, {b, 1}).to(labels.device());
  if (mask.dtype() != rows.dtype()) mask = cast(mask, rows.dtype());
  return mul(rows, mask);
}

TimeSampling parse_time_sampling(const std::string& name) {
  if (name == "uniform") return TimeSampling::uniform;
  if (name == "logit-normal") return TimeSampling::logit_normal;
  REMAT_FAIL("unknown time sampling '", name, "': expected uniform or logit-normal");
}

const char* time_sampling_name(TimeSampling s) { return s == TimeSampling::uniform ? "uniform" : "logit-normal"; }

Tensor rectified_flow_loss(const VelocityModel& model, const Tensor& x0_in, const Tensor& labels_in, TimeSampling times,
                           int64_t row_begin, int64_t rows) {
  const int64_t total = x0_in.size(0);
  Tensor noise = Tensor::randn(x0_in.shape(), x0_in.dtype(), x0_in.device());
  Tensor t = times == TimeSampling::uniform ? Tensor::rand({total}, x0_in.dtype(), x0_in.device())
                                            : sigmoid(Tensor::randn({total}, x0_in.dtype(), x0_in.device()));
  Tensor x0 = x0_in, labels = labels_in;
  std::optional<RngBatchShardScope> shard;
  if (rows >= 0 && rows != total) {
    REMAT_CHECK(rows >= 1 && row_begin >= 0 && row_begin + rows <= total, "rectified_flow_loss: rows [", row_begin,
                ", ", row_begin + rows, ") are not inside the batch of ", total);
    auto mine = [&](const Tensor& v) { return contiguous(slice(v, 0, row_begin, row_begin + rows)); };
    x0 = mine(x0), labels = mine(labels), noise = mine(noise), t = mine(t);
    shard.emplace(row_begin, rows, total);
  }
  const int64_t b = x0.size(0);
  Tensor tb = reshape(t, {b, 1, 1, 1});
  Tensor x_t = add(mul(add_scalar(neg(tb), 1.0), x0), mul(tb, noise));  // (1 - t) x0 + t x1
  Tensor v = model(x_t, t, labels);
  Tensor err = sub(v, sub(noise, x0));
  return mean(mul(err, err));
}

namespace {

// The overlap of `mask` (S x S, `area` pixels set) with the outline of class `cls` at centre
// (cx, cy) and radius r, as intersection over union. Parts of the outline off the image count
// against it: the data's shapes lie inside their images.
double outline_iou(const std::vector<uint8_t>& mask, int64_t s, int64_t area, int cls, double cx, double cy, double r) {
  // Only pixels within the shape's square can be inside it.
  int64_t x0 = static_cast<int64_t>(std::floor(cx - r)), x1 = static_cast<int64_t>(std::ceil(cx + r)) + 1,
          y0 = static_cast<int64_t>(std::floor(cy - r)), y1 = static_cast<int64_t>(std::ceil(cy + r)) + 1;
  int64_t shape_area = 0, overlap = 0;
  for (int64_t y = y0; y < y1; ++y)
    for (int64_t x = x0; x < x1; ++x) {
      float dx = static_cast<float>((x + 0.5 - cx) / r), dy = static_cast<float>((y + 0.5 - cy) / r);
      if (!inside_shape(cls, dx, dy)) continue;
      ++shape_area;
      if (x >= 0 && x < s && y >= 0 && y < s) overlap += mask[y * s + x];
    }
  return static_cast<double>(overlap) / static_cast<double>(area + shape_area - overlap);
}

// The best outline of class `cls` for `mask`: a search on a half-pixel grid of centres within 3
// pixels of the mask's centroid and of radii from 3 pixels to 0.4 of the image (the data's are 0.18
// to 0.32), then on an eighth-pixel grid around the best. The data has no rotation, and every class's
// centre lies within a quarter radius of its centroid (the triangle's is the farthest, 0.23 r).
double best_iou(const std::vector<uint8_t>& mask, int64_t s, int64_t area, double mx, double my, int cls) {
  double best = -1, bx = mx, by = my, br = 3;
  auto search = [&](double cx0, double cy0, double dc, double r0, double r1, double step) {
    double best_x = bx, best_y = by, best_r = br;
    for (double r = r0; r <= r1 + 1e-9; r += step)
      for (double cy = cy0 - dc; cy <= cy0 + dc + 1e-9; cy += step)
        for (double cx = cx0 - dc; cx <= cx0 + dc + 1e-9; cx += step) {
          if (r <= 0) continue;
          double iou = outline_iou(mask, s, area, cls, cx, cy, r);
          if (iou > best) best = iou, best_x = cx, best_y = cy, best_r = r;
        }
    bx = best_x, by = best_y, br = best_r;
  };
  search(mx, my, 3.0, 3.0, 0.4 * static_cast<double>(s), 0.5);
  search(bx, by, 0.5, br - 0.5, br + 0.5, 0.125);
  return best;
}

}  // namespace

std::vector<ShapeFit> fit_shapes(const Tensor& images) {
  REMAT_CHECK(images.dim() == 4 && images.size(1) == 3 && images.size(2) == images.size(3),
              "fit_shapes: expected images [N, 3, S, S], got ", shape_str(images.shape()));
  const int64_t n = images.size(0), s = images.size(2);
  std::vector<float> px = cast(images, DType::f32).to(Device::cpu()).to_vector<float>();
  std::vector<ShapeFit> fits(n);
#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) {
    // Foreground: pixels whose mean distance from the background colour over the channels is at least
    // half the least a shape's colour has (0.2: every channel of a colour is >= -0.6).
    std::vector<uint8_t> mask(s * s);
    int64_t area = 0;
    double sx = 0, sy = 0;
    for (int64_t y = 0; y < s; ++y)
      for (int64_t x = 0; x < s; ++x) {
        float d = 0;
        for (int64_t c = 0; c < 3; ++c) d += std::abs(px[((i * 3 + c) * s + y) * s + x] - kBackground);
        mask[y * s + x] = d / 3.0f > 0.1f;
        if (mask[y * s + x]) area++, sx += x + 0.5, sy += y + 0.5;
      }
    ShapeFit& fit = fits[i];
    fit.area = area;
    if (area == 0) continue;
    for (int cls = 0; cls < ShapesTask::kClasses; ++cls) {
      fit.iou[cls] = best_iou(mask, s, area, sx / area, sy / area, cls);
      if (fit.best_class < 0 || fit.iou[cls] > fit.iou[fit.best_class]) fit.best_class = cls;
    }
  }
  return fits;
}

ShapeScore score_shapes(const Tensor& images, const std::vector<int64_t>& labels, double min_iou) {
  REMAT_CHECK(static_cast<int64_t>(labels.size()) == images.size(0), "score_shapes: expected ", images.size(0),
              " labels, got ", labels.size());
  std::vector<ShapeFit> fits = fit_shapes(images);
  ShapeScore score;
  score.n = static_cast<int64_t>(fits.size());
  score.per_class.assign(ShapesTask::kClasses, {0, 0});
  for (size_t i = 0; i < fits.size(); ++i) {
    int64_t label = labels[i];
    REMAT_CHECK(label >= 0 && label < ShapesTask::kClasses, "score_shapes: expected labels in [0, ",
                ShapesTask::kClasses, "), got ", label);
    bool recognised = fits[i].best_class == label && fits[i].iou[label] >= min_iou;
    score.classified += fits[i].best_class == label;
    score.recognised += recognised;
    score.mean_iou += fits[i].iou[label] / static_cast<double>(fits.size());
    score.per_class[label].first += recognised;
    score.per_class[label].second += 1;
  }
  return score;
}

}  // namespace remat
