// Finite-difference gradient check in f64.
#include "gradcheck.h"

#include <cmath>
#include <sstream>

namespace remat::testing {

Tensor randn64(const Shape& shape) { return Tensor::randn(shape, DType::f64).set_requires_grad(true); }

Tensor uniform64(const Shape& shape, double lo, double hi) {
  Tensor u = Tensor::rand(shape, DType::f64);
  double* p = u.data<double>();
  for (int64_t i = 0; i < u.numel(); ++i) p[i] = lo + (hi - lo) * p[i];
  return u.set_requires_grad(true);
}

GradcheckResult gradcheck(const Fn& f, const std::vector<Tensor>& inputs, double eps, double atol, double rtol) {
  RngState rng = rng_state();
  // Fixed random weights make the check sensitive to every output element.
  Tensor probe = f(inputs);
  Tensor w;
  {
    NoGradGuard no_grad;
    set_rng_state({12345, 0});
    w = Tensor::randn(probe.shape(), DType::f64);
  }
  auto objective = [&]() {
    set_rng_state(rng);
    Tensor out = f(inputs);
    return sum(mul(out, w));
  };
  for (const Tensor& t : inputs) const_cast<Tensor&>(t).zero_grad();
  backward(objective());

  GradcheckResult result;
  std::ostringstream report;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const Tensor& x = inputs[k];
    if (!x.requires_grad()) continue;
    Tensor analytic = x.grad();
    std::vector<double> a = analytic.defined() ? analytic.to_vector<double>() : std::vector<double>(x.numel(), 0.0);
    double* p = x.data<double>();
    double worst = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      double saved = p[i];
      double plus, minus;
      {
        NoGradGuard no_grad;
        p[i] = saved + eps;
        plus = objective().item();
        p[i] = saved - eps;
        minus = objective().item();
        p[i] = saved;
      }
      double numeric = (plus - minus) / (2 * eps);
      double err = std::abs(a[i] - numeric);
      worst = std::max(worst, err);
      if (err > atol + rtol * std::abs(numeric) && result.ok) {
        result.ok = false;
        report << "input " << k << " element " << i << ": analytic " << a[i] << " vs numeric " << numeric << "; ";
      }
    }
    report << "input " << k << " max abs err " << worst << "; ";
  }
  set_rng_state(rng);
  result.report = report.str();
  return result;
}

}  // namespace remat::testing
