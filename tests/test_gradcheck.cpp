// Every op in the op list has an f64 finite-difference gradient check. The catalogue's switch
// (op_cases.cpp) has no default, so adding an op without a case fails to compile (-Werror=switch).
#include <catch.hpp>

#include "op_cases.h"

using namespace remat;
using namespace remat::testing;

TEST_CASE("every op's backward matches finite differences in f64", "[op][gradcheck]") {
  manual_seed(7);
  for (int i = 0; i < kOpCount; ++i) {
    OpKind op = static_cast<OpKind>(i);
    std::vector<OpCase> cases = cases_for(op);
    DYNAMIC_SECTION(op_name(op)) {
      REQUIRE_FALSE(cases.empty());  // an op in the list without a gradient check fails here
      for (OpCase& c : cases) {
        INFO(op_name(op) << ": " << c.description);
        GradcheckResult r = gradcheck(c.f, c.inputs, c.eps);
        INFO(r.report);
        CHECK(r.ok);
      }
    }
  }
}

TEST_CASE("gradcheck itself catches a wrong backward", "[op][gradcheck]") {
  CustomOp wrong{"wrong_square",
                 [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mul(in[0], in[0])}; },
                 [](const std::vector<Tensor>& g, const std::vector<Tensor>& saved) {
                   return std::vector<Tensor>{mul(g[0], saved[0])};  // missing the factor 2
                 },
                 {0}};
  GradcheckResult r = gradcheck([wrong](auto& in) { return custom(wrong, {in[0]})[0]; }, {randn64({3})});
  CHECK_FALSE(r.ok);
}
