// The gpt, dit and unet training tasks.
#include "models/tasks.h"

#include <cmath>

#include "autograd/ops.h"
#include "models/data.h"
#include "models/dit.h"
#include "models/gpt.h"
#include "models/images.h"
#include "models/unet.h"

namespace remat {

Tensor TrainTask::velocity(const Tensor&, const Tensor&, const Tensor&) {
  REMAT_FAIL("this model does not generate images: sampling needs --model dit or unet");
}

void TrainTask::set_label_dropout(double p) {
  REMAT_CHECK(p == 0, "--label-dropout ", p, ": this model has no class labels (it applies to dit and unet)");
}

void TrainTask::set_time_sampling(TimeSampling s) {
  REMAT_CHECK(s == TimeSampling::uniform, "--time-sampling ", time_sampling_name(s),
              ": this model is not a diffusion model (it applies to dit and unet)");
}

namespace {

int64_t positive_int(const std::string& key, double value) {
  REMAT_CHECK(value >= 1 && value <= 1e12 && value == std::floor(value), "config field ", key,
              ": expected a whole number from 1 to 10^12, got ", value);
  return static_cast<int64_t>(value);
}

double probability(const std::string& key, double value) {
  REMAT_CHECK(value >= 0 && value < 1, "config field ", key, ": expected 0 <= p < 1, got ", value);
  return value;
}

class GptTask final : public TrainTask {
 public:
  GptTask(GptConfig c, uint64_t seed) : config_(std::move(c)), model_((manual_seed(seed), config_)), data_(config_.vocab, seed + 1) {}
  Module& model() override { return model_; }
  Tensor next_loss() override {
    const StepRows r = step_rows();
    auto [x, y] = data_.batch(r.total, config_.seq_len);
    if (r.rows == r.total) return model_.loss(x.to(device()), y.to(device()));
    auto mine = [&](const Tensor& v) { return contiguous(slice(v, 0, r.begin, r.begin + r.rows)).to(device()); };
    RngBatchShardScope shard(r.begin, r.rows, r.total);
    return model_.loss(mine(x), mine(y));
  }
  int64_t batch() const override { return config_.batch; }
  double items_per_step() const override { return static_cast<double>(config_.batch * config_.seq_len); }
  const char* item_name() const override { return "tokens"; }
  nlohmann::json config() const override {
    const GptConfig& c = config_;
    return {{"name", c.name}, {"vocab", c.vocab}, {"channels", c.channels}, {"heads", c.heads}, {"layers", c.layers},
            {"seq_len", c.seq_len}, {"batch", c.batch}, {"dropout", c.dropout}, {"fused_loss", c.fused_loss}};
  }
  RngState data_state() const override { return data_.state(); }
  void set_data_state(RngState s) override { data_.set_state(s); }
  double reference_loss() const override { return AdditionTask::reference_loss(); }
  double uniform_loss() const override { return data_.uniform_loss(); }
  std::string reference_text() const override {
    char line[128];
    std::snprintf(line, sizeof line, "task reference %.4f, uniform guess %.4f", reference_loss(), uniform_loss());
    return line;
  }
  static GptConfig parse(const nlohmann::json& j) {
    GptConfig c;
    c.name = j.at("name"), c.vocab = j.at("vocab"), c.channels = j.at("channels"), c.heads = j.at("heads");
    c.layers = j.at("layers"), c.seq_len = j.at("seq_len"), c.batch = j.at("batch"), c.dropout = j.at("dropout");
    c.fused_loss = j.value("fused_loss", false);  // a run resumed goes on with the loss it trained with
    return c;
  }

 private:
  GptConfig config_;
  Gpt model_;
  AdditionTask data_;
};

// dit and unet share the data and the objective.
template <typename Model, typename Config>
class FlowTask final : public TrainTask {
 public:
  FlowTask(Config c, uint64_t seed) : config_(std::move(c)), model_((manual_seed(seed), config_)), data_(config_.image, seed + 1) {}
  Module& model() override { return model_; }
  Tensor next_loss() override {
    const StepRows r = this->step_rows();
    auto [x0, labels] = data_.batch(r.total, label_dropout_);
    x0 = x0.to(device()), labels = labels.to(device());
    return rectified_flow_loss([this](const Tensor& x, const Tensor& t, const Tensor& y) { return model_.forward(x, t, y); },
                               x0, labels, time_sampling_, r.begin, r.rows);
  }
  int64_t batch() const override { return config_.batch; }
  double items_per_step() const override { return static_cast<double>(config_.batch); }
  const char* item_name() const override { return "images"; }
  Tensor velocity(const Tensor& x_t, const Tensor& t, const Tensor& labels) override { return model_.forward(x_t, t, labels); }
  int64_t image_size() const override { return config_.image; }
  void set_label_dropout(double p) override {
    REMAT_CHECK(p >= 0 && p < 1, "expected --label-dropout in [0, 1), got ", p);
    label_dropout_ = p;
  }
  void set_time_sampling(TimeSampling s) override { time_sampling_ = s; }
  nlohmann::json config() const override { return to_json(config_); }
  RngState data_state() const override { return data_.state(); }
  void set_data_state(RngState s) override { data_.set_state(s); }
  // A velocity of zero scores E|x1 - x0|^2 = 1 + E x0^2; a model has to beat that.
  std::string reference_text() const override { return "rectified flow: predicting zero velocity scores about 1.6"; }

 private:
  static nlohmann::json to_json(const DitConfig& c) {
    return {{"name", c.name}, {"image", c.image}, {"patch", c.patch}, {"channels", c.channels}, {"heads", c.heads},
            {"double_blocks", c.double_blocks}, {"single_blocks", c.single_blocks}, {"classes", c.classes},
            {"batch", c.batch}, {"ada_zero", c.ada_zero}};
  }
  static nlohmann::json to_json(const UnetConfig& c) {
    return {{"name", c.name}, {"image", c.image}, {"base", c.base}, {"groups", c.groups}, {"heads", c.heads},
            {"classes", c.classes}, {"batch", c.batch}, {"mults", c.mults}, {"dropout", c.dropout}};
  }
  Config config_;
  Model model_;
  ShapesTask data_;
  double label_dropout_ = 0;
  TimeSampling time_sampling_ = TimeSampling::uniform;
};

DitConfig parse_dit(const nlohmann::json& j) {
  DitConfig c;
  c.name = j.at("name"), c.image = j.at("image"), c.patch = j.at("patch"), c.channels = j.at("channels");
  c.heads = j.at("heads"), c.double_blocks = j.at("double_blocks"), c.single_blocks = j.at("single_blocks");
  c.classes = j.at("classes"), c.batch = j.at("batch"), c.ada_zero = j.at("ada_zero");
  return c;
}

UnetConfig parse_unet(const nlohmann::json& j) {
  UnetConfig c;
  c.name = j.at("name"), c.image = j.at("image"), c.base = j.at("base"), c.groups = j.at("groups");
  c.heads = j.at("heads"), c.classes = j.at("classes"), c.batch = j.at("batch");
  c.mults = j.at("mults").get<std::vector<int64_t>>(), c.dropout = j.at("dropout");
  return c;
}

}  // namespace

namespace {

// A named config with its overrides applied (fields checked as numbers here, as a whole by the model).
template <typename Apply>
void apply_overrides(const std::map<std::string, double>& overrides, Apply apply) {
  for (const auto& [key, value] : overrides) apply(key, value);
}

GptConfig gpt_from(const std::string& name, const std::map<std::string, double>& overrides) {
  GptConfig c = gpt_config(name);
  apply_overrides(overrides, [&](const std::string& key, double value) {
    if (key == "vocab") c.vocab = positive_int(key, value);
    else if (key == "channels") c.channels = positive_int(key, value);
    else if (key == "heads") c.heads = positive_int(key, value);
    else if (key == "layers") c.layers = positive_int(key, value);
    else if (key == "seq_len") c.seq_len = positive_int(key, value);
    else if (key == "batch") c.batch = positive_int(key, value);
    else if (key == "dropout") c.dropout = probability(key, value);
    else if (key == "fused_loss") c.fused_loss = value != 0;
    else REMAT_FAIL("unknown config field '", key,
                    "' for gpt: expected vocab, channels, heads, layers, seq_len, batch, dropout or fused_loss");
  });
  check_config(c);
  return c;
}

DitConfig dit_from(const std::string& name, const std::map<std::string, double>& overrides) {
  DitConfig c = dit_config(name);
  apply_overrides(overrides, [&](const std::string& key, double value) {
    if (key == "channels") c.channels = positive_int(key, value);
    else if (key == "heads") c.heads = positive_int(key, value);
    else if (key == "batch") c.batch = positive_int(key, value);
    else if (key == "layers") c.single_blocks = positive_int(key, value);
    else if (key == "fused_loss") REMAT_FAIL("--fused-loss: only gpt has a language model's head to fuse with its loss");
    else REMAT_FAIL("unknown config field '", key, "' for dit: expected channels, heads, batch or layers (single blocks)");
  });
  check_config(c);
  return c;
}

UnetConfig unet_from(const std::string& name, const std::map<std::string, double>& overrides) {
  UnetConfig c = unet_config(name);
  apply_overrides(overrides, [&](const std::string& key, double value) {
    if (key == "channels") c.base = positive_int(key, value);
    else if (key == "batch") c.batch = positive_int(key, value);
    else if (key == "dropout") c.dropout = probability(key, value);
    else if (key == "fused_loss") REMAT_FAIL("--fused-loss: only gpt has a language model's head to fuse with its loss");
    else REMAT_FAIL("unknown config field '", key, "' for unet: expected channels (base width), batch or dropout");
  });
  check_config(c);
  return c;
}

// The model's weights must fit in this machine's memory before a byte of them is drawn.
void check_parameters_fit(const std::string& model, int64_t parameters) {
  int64_t have = host_memory_bytes(), need = parameters * static_cast<int64_t>(sizeof(float));
  REMAT_CHECK(parameters <= have / static_cast<int64_t>(sizeof(float)), model, ": ", parameters, " parameters need ",
              format_bytes(need), " for the weights alone, more than the ", format_bytes(have), " of memory there is");
}

}  // namespace

int64_t task_parameter_count(const std::string& model, const std::string& name,
                             const std::map<std::string, double>& overrides) {
  if (model == "gpt") return parameter_count(gpt_from(name, overrides));
  if (model == "dit") return parameter_count(dit_from(name, overrides));
  if (model == "unet") return parameter_count(unet_from(name, overrides));
  REMAT_FAIL("unknown model '", model, "': expected gpt, dit or unet");
}

std::unique_ptr<TrainTask> make_task(const std::string& model, const std::string& name,
                                     const std::map<std::string, double>& overrides, uint64_t seed) {
  check_parameters_fit(model, task_parameter_count(model, name, overrides));
  if (model == "gpt") return std::make_unique<GptTask>(gpt_from(name, overrides), seed);
  if (model == "dit") return std::make_unique<FlowTask<Dit, DitConfig>>(dit_from(name, overrides), seed);
  return std::make_unique<FlowTask<Unet, UnetConfig>>(unet_from(name, overrides), seed);
}

std::unique_ptr<TrainTask> make_task_from_json(const std::string& model, const nlohmann::json& config, uint64_t seed) {
  try {
    // Configs from files are checked like any other: a file may be damaged or hand-edited.
    if (model == "gpt") {
      GptConfig c = GptTask::parse(config);
      check_config(c);
      check_parameters_fit(model, parameter_count(c));
      return std::make_unique<GptTask>(c, seed);
    }
    if (model == "dit") {
      DitConfig c = parse_dit(config);
      check_config(c);
      check_parameters_fit(model, parameter_count(c));
      return std::make_unique<FlowTask<Dit, DitConfig>>(c, seed);
    }
    if (model == "unet") {
      UnetConfig c = parse_unet(config);
      check_config(c);
      check_parameters_fit(model, parameter_count(c));
      return std::make_unique<FlowTask<Unet, UnetConfig>>(c, seed);
    }
  } catch (const nlohmann::json::exception& e) {
    REMAT_FAIL("corrupted model config for ", model, ": ", e.what());
  }
  REMAT_FAIL("unknown model '", model, "': expected gpt, dit or unet");
}

}  // namespace remat
