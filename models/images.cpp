// Shape images and the rectified-flow loss.
#include "models/images.h"

#include <cmath>
#include <vector>

#include "autograd/ops.h"

namespace remat {

ShapesTask::ShapesTask(int64_t size, uint64_t seed) : size_(size), rng_(seed) {
  REMAT_CHECK(size >= 8, "shapes task: expected images of at least 8x8, got ", size);
}

std::pair<Tensor, Tensor> ShapesTask::batch(int64_t batch, double label_dropout) {
  REMAT_CHECK(label_dropout >= 0 && label_dropout < 1, "shapes task: expected a label dropout in [0, 1), got ", label_dropout);
  const int64_t s = size_;
  std::vector<float> pixels(batch * 3 * s * s, -0.8f);
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
        bool inside = false;
        switch (cls) {
          case 0: inside = dx * dx + dy * dy <= 1.0f; break;                          // disc
          case 1: inside = std::abs(dx) <= 0.8f && std::abs(dy) <= 0.8f; break;       // square
          case 2: inside = dy <= 0.8f && dy >= -0.9f + 2.0f * std::abs(dx); break;    // triangle
          case 3: inside = (std::abs(dx) <= 0.3f && std::abs(dy) <= 1.0f) ||          // cross
                           (std::abs(dy) <= 0.3f && std::abs(dx) <= 1.0f);
            break;
        }
        if (!inside) continue;
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

Tensor rectified_flow_loss(const VelocityModel& model, const Tensor& x0, const Tensor& labels, TimeSampling times) {
  int64_t b = x0.size(0);
  Tensor noise = Tensor::randn(x0.shape(), x0.dtype(), x0.device());
  Tensor t = times == TimeSampling::uniform ? Tensor::rand({b}, x0.dtype(), x0.device())
                                            : sigmoid(Tensor::randn({b}, x0.dtype(), x0.device()));
  Tensor tb = reshape(t, {b, 1, 1, 1});
  Tensor x_t = add(mul(add_scalar(neg(tb), 1.0), x0), mul(tb, noise));  // (1 - t) x0 + t x1
  Tensor v = model(x_t, t, labels);
  Tensor err = sub(v, sub(noise, x0));
  return mean(mul(err, err));
}

}  // namespace remat
