// Example 2: an op of your own with its own backward (softplus, log(1 + e^x), with the stable
// form max(x, 0) + log1p(e^-|x|)), checked against central differences in f64, then used inside a
// checkpoint region, where replay re-runs it from the tape.
#include <remat/remat.h>

#include <cmath>
#include <cstdio>
#include <vector>

using namespace remat;

// Element-wise on the host for brevity (a GPU version would call its own kernel).
Tensor softplus(const Tensor& x) {
  CustomOp op;
  op.name = "softplus";
  op.forward = [](const std::vector<Tensor>& in) {
    std::vector<double> v = in[0].to_vector<double>();
    for (double& e : v) e = std::max(e, 0.0) + std::log1p(std::exp(-std::abs(e)));
    return std::vector<Tensor>{Tensor::from_vector(v, in[0].shape()).to(in[0].dtype())};
  };
  // d softplus / dx = sigmoid(x): the gradient is grad * sigmoid(x), from the saved input.
  op.backward = [](const std::vector<Tensor>& grads, const std::vector<Tensor>& saved) {
    return std::vector<Tensor>{mul(grads[0], sigmoid(saved[0]))};
  };
  op.saved = {0};
  return custom(op, {x})[0];
}

int main() {
  manual_seed(1);
  Tensor x = Tensor::randn({5, 7}, DType::f64).set_requires_grad(true);
  Tensor w = Tensor::randn({5, 7}, DType::f64);
  auto loss = [&](const Tensor& in) { return sum(mul(softplus(in), w)); };
  backward(loss(x));
  std::vector<double> analytic = x.grad().to_vector<double>(), values = x.to_vector<double>();
  double worst = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const double h = 1e-6;
    auto at = [&](double v) {
      std::vector<double> moved = values;
      moved[i] = v;
      NoGradGuard no_grad;
      return loss(Tensor::from_vector(moved, x.shape())).item();
    };
    double numeric = (at(values[i] + h) - at(values[i] - h)) / (2 * h);
    worst = std::max(worst, std::abs(numeric - analytic[i]) / std::max(1.0, std::abs(numeric)));
  }
  std::printf("softplus: gradient against central differences in f64, worst relative error %.2e\n", worst);

  // Inside a region its input is not kept: backward replays softplus from the tape.
  Tensor y = Tensor::randn({5, 7}, DType::f64).set_requires_grad(true);
  Tensor out;
  {
    CheckpointScope region;
    out = sum(mul(softplus(mul(y, y)), w));
  }
  reset_checkpoint_counters();
  backward(out);
  std::printf("in a checkpoint region: %lld replay(s), %lld op(s) re-run\n",
              static_cast<long long>(checkpoint_counters().replays),
              static_cast<long long>(checkpoint_counters().ops_replayed));
  bool ok = worst < 1e-7 && checkpoint_counters().replays == 1 && y.grad().defined();
  return ok ? 0 : 1;
}
