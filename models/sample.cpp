// Euler sampling of the rectified flow, and the PNG grid writer.
#include "models/sample.h"

#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "models/images.h"
#include "models/safetensors.h"
#include "models/tasks.h"

namespace remat {

namespace {

// A trained dit or unet with its weights, ready for inference (eval mode).
struct FlowModel {
  std::unique_ptr<TrainTask> task;
  nlohmann::json config;
  bool label_dropout = false;  // trained with dropped labels: knows the unconditional velocity
};

FlowModel load_flow_model(const std::string& weights, const std::string& model_name, uint64_t seed) {
  SafetensorsFile file = load_safetensors(weights);
  std::string model = model_name;
  auto stored_model = file.metadata.find("model");
  if (model.empty()) {
    REMAT_CHECK(stored_model != file.metadata.end(), weights, ": no model name in the metadata; pass --model");
    model = stored_model->second;
  }
  auto stored_config = file.metadata.find("config");
  REMAT_CHECK(stored_config != file.metadata.end(), weights, ": no model config in the metadata (not written by remat train?)");
  FlowModel out;
  try {
    out.config = nlohmann::json::parse(stored_config->second);
  } catch (const nlohmann::json::exception& e) {
    REMAT_FAIL(weights, ": corrupted config metadata: ", e.what());
  }
  out.task = make_task_from_json(model, out.config, seed);
  REMAT_CHECK(out.task->image_size() > 0, "model ", model, " does not generate images; expected dit or unet");
  NoGradGuard no_grad;
  for (auto& [name, p] : out.task->model().named_parameters()) {
    const Tensor& w = file.at(name);
    REMAT_CHECK(w.shape() == p.shape(), weights, ": parameter ", name, " has shape ", shape_str(w.shape()),
                ", the model expects ", shape_str(p.shape()));
    p.copy_(w);
  }
  out.task->model().eval();
  out.label_dropout = file.metadata.count("label_dropout") > 0;
  return out;
}

}  // namespace

Tensor flow_sampler_step(const Tensor& x_t, const Tensor& v, double t, double s, double eta) {
  REMAT_CHECK(0 <= s && s < t && t <= 1, "sampler step: expected 0 <= s < t <= 1, got t ", t, " and s ", s);
  REMAT_CHECK(eta >= 0 && eta <= 1, "sample: expected --eta in [0, 1], got ", eta);
  if (eta == 0) return sub(x_t, mul_scalar(v, t - s));
  // x_t = a_t x0 + sigma_t x1 with a = 1 - t, sigma = t. The forward process from s to t multiplies
  // by a_t / a_s and adds variance sigma_t^2 - (a_t / a_s)^2 sigma_s^2; the posterior of x_s given
  // x_t and x0 then has the variance below (zero at s = 0, and s^2 at t = 1 where x_t says nothing).
  double a_ts = (1 - t) / (1 - s);
  double forward_var = t * t - a_ts * a_ts * s * s;
  double c = eta * std::sqrt(std::max(forward_var * s * s / (t * t), 0.0));
  Tensor x0 = sub(x_t, mul_scalar(v, t)), x1 = add(x_t, mul_scalar(v, 1 - t));
  Tensor x_s = add(mul_scalar(x0, 1 - s), mul_scalar(x1, std::sqrt(std::max(s * s - c * c, 0.0))));
  if (c > 0) x_s = add(x_s, mul_scalar(Tensor::randn(x_t.shape(), x_t.dtype(), x_t.device()), c));
  return x_s;
}

int64_t grid_columns(int64_t n) { return static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n)))); }

std::vector<int64_t> sample_labels(int64_t n) {
  std::vector<int64_t> labels(n);
  int64_t columns = grid_columns(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = (i % columns) % ShapesTask::kClasses;
  return labels;
}

Tensor sample_images(const SampleOptions& o, const SampleProgress& on_step) {
  REMAT_CHECK(o.n >= 1 && o.steps >= 1, "sample: expected --n >= 1 and --steps >= 1, got ", o.n, " and ", o.steps);
  REMAT_CHECK(std::isfinite(o.guidance) && o.guidance >= 0, "sample: expected --guidance >= 0, got ", o.guidance);
  REMAT_CHECK(o.eta >= 0 && o.eta <= 1, "sample: expected --eta in [0, 1], got ", o.eta);
  REMAT_CHECK(o.scale >= 1 && o.scale <= 16, "sample: expected --scale in 1..16, got ", o.scale);
  REMAT_CHECK(o.n <= 65536 && o.steps <= 100000, "sample: expected --n <= 65536 and --steps <= 100000, got ", o.n,
              " and ", o.steps);
  check_writable_file(o.out, "--out");  // before the sampling, not after it
  FlowModel loaded = load_flow_model(o.weights, o.model, o.seed);
  bool guided = o.guidance != 1.0;
  REMAT_CHECK(!guided || loaded.label_dropout, "sample: --guidance ", o.guidance, " needs weights trained ",
              "with --label-dropout (the unconditional velocity); ", o.weights, " were trained without");
  TrainTask* task = loaded.task.get();
  const nlohmann::json& config = loaded.config;
  NoGradGuard no_grad;
  int64_t s = task->image_size();
  manual_seed(o.seed);
  Tensor x = Tensor::randn({o.n, 3, s, s});
  int64_t columns = grid_columns(o.n);
  std::vector<int64_t> labels = sample_labels(o.n);
  // Guided: one batch of 2n, the labelled images then the same images without a label.
  if (guided) labels.resize(2 * o.n, config.value("classes", int64_t{ShapesTask::kClasses}));  // the "no label" label
  Tensor y = Tensor::from_vector(labels, {static_cast<int64_t>(labels.size())});
  double dt = 1.0 / o.steps;
  for (int k = 0; k < o.steps; ++k) {
    double now = 1.0 - k * dt, next = k + 1 == o.steps ? 0.0 : 1.0 - (k + 1) * dt;
    Tensor t = Tensor::full({y.size(0)}, now);
    Tensor v;
    if (guided) {
      auto both = split(task->velocity(concat({x, x}, 0), t, y), 0, {o.n, o.n});  // conditional, unconditional
      v = add(both[1], mul_scalar(sub(both[0], both[1]), o.guidance));
    } else {
      v = task->velocity(x, t, y);
    }
    x = flow_sampler_step(x, v, now, next, o.eta);
    if (on_step) on_step(k + 1, o.steps);
  }
  write_png_grid(o.out, x, columns, o.scale);
  return x;
}

std::vector<FlowLossAtTime> flow_loss_by_time(const std::string& weights, int64_t n, int times, uint64_t seed,
                                              const std::function<void(const FlowLossAtTime&)>& on_time) {
  REMAT_CHECK(n >= 1 && times >= 1, "flow-loss: expected --n >= 1 and --times >= 1, got ", n, " and ", times);
  FlowModel loaded = load_flow_model(weights, "", seed);
  NoGradGuard no_grad;
  // The same images and noise at every time, so that the rows differ only by t.
  ShapesTask data(loaded.task->image_size(), seed);
  auto [x0, labels] = data.batch(n);
  manual_seed(seed);
  Tensor noise = Tensor::randn(x0.shape());
  Device device = loaded.task->device();
  x0 = x0.to(device), labels = labels.to(device), noise = noise.to(device);
  std::vector<FlowLossAtTime> out;
  for (int i = 0; i < times; ++i) {
    double t = (i + 0.5) / times;  // bin centres
    Tensor x_t = add(mul_scalar(x0, 1 - t), mul_scalar(noise, t));
    Tensor err = sub(loaded.task->velocity(x_t, Tensor::full({n}, t).to(device), labels), sub(noise, x0));
    out.push_back({t, static_cast<double>(mean(mul(err, err)).to(Device::cpu()).to_vector<float>()[0])});
    if (on_time) on_time(out.back());
  }
  return out;
}

void write_png_grid(const std::string& path, const Tensor& images, int64_t columns, int scale) {
  REMAT_CHECK(images.dim() == 4 && images.size(1) == 3, "write_png_grid: expected images [N, 3, S, S], got ",
              shape_str(images.shape()));
  REMAT_CHECK(scale >= 1 && scale <= 16, "write_png_grid: expected a scale in 1..16, got ", scale);
  int64_t n = images.size(0), s = images.size(2) * scale, gap = 2 * scale, rows = (n + columns - 1) / columns;
  int64_t width = columns * (s + gap) + gap, height = rows * (s + gap) + gap;
  std::vector<uint8_t> rgb(static_cast<size_t>(width * height * 3), 32);
  auto px = images.to_vector<float>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t ox = gap + (i % columns) * (s + gap), oy = gap + (i / columns) * (s + gap);
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t y = 0; y < s; ++y)
        for (int64_t x = 0; x < s; ++x) {
          int64_t src = images.size(2), sy = y / scale, sx = x / scale;
          float v = std::clamp((px[((i * 3 + c) * src + sy) * src + sx] + 1.0f) * 0.5f, 0.0f, 1.0f);
          rgb[((oy + y) * width + ox + x) * 3 + c] = static_cast<uint8_t>(std::lround(v * 255.0f));
        }
  }
  std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  REMAT_CHECK(f != nullptr, "cannot write ", tmp, ": ", std::strerror(errno));
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    std::remove(tmp.c_str());
    REMAT_FAIL("writing the PNG ", path, " failed");
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  for (int64_t y = 0; y < height; ++y) png_write_row(png, rgb.data() + y * width * 3);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(f);
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  REMAT_CHECK(!ec, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

}  // namespace remat
