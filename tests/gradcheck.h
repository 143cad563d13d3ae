// Finite-difference gradient check in f64: compares autograd gradients of sum(f(inputs) * w)
// against central differences, element by element.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "extension.h"  // the tests reach the tape and the backends too

namespace remat::testing {

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

struct GradcheckResult {
  bool ok = true;
  std::string report;  // the worst element per input, or the first mismatch
};

// Inputs that require grad are checked; others are held constant. The global RNG state is
// restored before every evaluation so random ops draw the same mask each time.
GradcheckResult gradcheck(const Fn& f, const std::vector<Tensor>& inputs, double eps = 1e-6, double atol = 1e-7,
                          double rtol = 1e-5);

// f64 leaf tensors for gradcheck.
Tensor randn64(const Shape& shape);
Tensor uniform64(const Shape& shape, double lo, double hi);

}  // namespace remat::testing
