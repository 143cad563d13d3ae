// The f64 reference step that the PyTorch peers' --check compare their twins against.
#include "bench_twin.h"

#include <fmt/format.h>

#include "autograd/engine.h"
#include "autograd/ops.h"
#include "models/dit.h"
#include "models/gpt.h"
#include "models/safetensors.h"
#include "models/unet.h"
#include "runtime/random.h"

namespace remat::bench {

namespace {

// Adds 0.05 N(0, 1) to every parameter: adaLN-Zero and the zero-initialised output layers would
// otherwise leave most of the model out of the output, and most of its gradients zero.
void perturb(Module& model) {
  for (Tensor& p : model.parameters()) {
    Tensor noise = Tensor::randn(p.shape(), DType::f64);
    double* dst = p.data<double>();
    const double* src = noise.data<double>();
    for (int64_t i = 0; i < p.numel(); ++i) dst[i] += 0.05 * src[i];
  }
}

// i64 values below `below` in a fixed pattern.
Tensor ids(const Shape& shape, int64_t below) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<int64_t> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[static_cast<size_t>(i)] = (i * 7 + 3) % below;
  return Tensor::from_vector(values, shape);
}

// gpt: next-token cross-entropy of token ids; dit and unet: the squared error of the velocity
// against a random target at random images, times and labels.
std::vector<std::pair<std::string, Tensor>> inputs_and_loss(Gpt& model, Tensor& loss) {
  const GptConfig& c = model.config;
  Tensor idx = ids({c.batch, c.seq_len}, c.vocab), targets = ids({c.batch, c.seq_len}, c.vocab - 1);
  loss = model.loss(idx, targets);
  return {{"input.idx", idx}, {"input.targets", targets}};
}

template <typename Model>
std::vector<std::pair<std::string, Tensor>> inputs_and_loss(Model& model, Tensor& loss) {
  const int64_t b = model.config.batch, s = model.config.image;
  Tensor x_t = Tensor::randn({b, 3, s, s}, DType::f64), t = Tensor::rand({b}, DType::f64);
  Tensor target = Tensor::randn({b, 3, s, s}, DType::f64), labels = ids({b}, model.config.classes);
  Tensor err = sub(model.forward(x_t, t, labels), target);
  loss = mean(mul(err, err));
  return {{"input.x_t", x_t}, {"input.t", t}, {"input.labels", labels}, {"input.target", target}};
}

template <typename Model, typename Config>
int dump(Config config, const TwinOptions& o) {
  config.dtype = DType::f64;
  manual_seed(o.seed);
  Model model(config);
  perturb(model);
  Tensor loss;
  std::vector<std::pair<std::string, Tensor>> tensors = inputs_and_loss(model, loss);
  backward(loss);
  tensors.push_back({"output.loss", loss});
  for (auto& [name, p] : model.named_parameters()) {
    REMAT_CHECK(p.grad().defined(), "remat-bench twin: ", name, " got no gradient");
    tensors.push_back({"param." + name, p});
    tensors.push_back({"grad." + name, p.grad()});
  }
  save_safetensors(o.out, tensors, {{"model", o.model}, {"config", o.config}});
  fmt::print("{} {}: loss {:.17g}; {} parameter tensors and their gradients written to {}\n", o.model, o.config,
             loss.item(), model.named_parameters().size(), o.out);
  return 0;
}

}  // namespace

int run_twin(const TwinOptions& o) {
  REMAT_CHECK(o.model == "gpt" || o.model == "dit" || o.model == "unet",
              "remat-bench twin: expected --model gpt, dit or unet, got '", o.model, "'");
  REMAT_CHECK(!o.out.empty(), "remat-bench twin: expected --out FILE");
  check_writable_file(o.out, "--out");
  // No dropout: the twin draws no masks of its own.
  if (o.model == "gpt") {
    GptConfig c = gpt_config(o.config);
    c.dropout = 0;
    return dump<Gpt>(c, o);
  }
  if (o.model == "dit") return dump<Dit>(dit_config(o.config), o);
  UnetConfig c = unet_config(o.config);
  c.dropout = 0;
  return dump<Unet>(c, o);
}

}  // namespace remat::bench
