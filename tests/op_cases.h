// The op catalogue of the tests: for every op in the op list, small cases (a function and f64
// leaf inputs). Used by the f64 gradient checks on the CPU and by the CPU/CUDA parity tests.
#pragma once

#include <string>
#include <vector>

#include "gradcheck.h"

namespace remat::testing {

struct OpCase {
  std::string description;
  Fn f;
  std::vector<Tensor> inputs;
  double eps = 1e-6;  // finite-difference step of the gradient check
};

// Never empty for an op in the list: the switch has no default (-Werror=switch).
std::vector<OpCase> cases_for(OpKind op);

}  // namespace remat::testing
