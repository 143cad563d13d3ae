// Built-in policies and option parsing.
#include "checkpoint/policy.h"

#include "checkpoint/options.h"
#include "runtime/error.h"

namespace remat {

const char* decision_name(Decision d) {
  switch (d) {
    case Decision::must_save: return "MUST_SAVE";
    case Decision::prefer_save: return "PREFER_SAVE";
    case Decision::must_recompute: return "MUST_RECOMPUTE";
    case Decision::prefer_recompute: return "PREFER_RECOMPUTE";
    case Decision::must_offload: return "MUST_OFFLOAD";
    case Decision::prefer_offload: return "PREFER_OFFLOAD";
  }
  return "?";
}

Policy save_nothing() {
  return {"save_nothing", [](const PolicyContext&) { return Decision::prefer_recompute; }};
}

Policy save_all() {
  return {"save_all", [](const PolicyContext&) { return Decision::prefer_save; }};
}

Policy save_ops(const std::vector<OpKind>& ops, std::string name) {
  if (name.empty()) {
    name = "sac:";
    for (size_t i = 0; i < ops.size(); ++i) {
      if (i) name += ',';
      name += op_name(ops[i]);
    }
  }
  return {name, [ops](const PolicyContext& ctx) {
            for (OpKind k : ops)
              if (k == ctx.kind) return Decision::must_save;
            return Decision::prefer_recompute;
          }};
}

Policy ops_preset() {
  return save_ops({OpKind::matmul, OpKind::linear, OpKind::attention, OpKind::linear_cross_entropy}, "ops");
}

Policy save_names(const std::vector<std::string>& names) {
  return {"save_names", [names](const PolicyContext& ctx) {
            for (const auto& n : names)
              if (!ctx.tag.empty() && n == ctx.tag) return Decision::must_save;
            return Decision::prefer_recompute;
          }};
}

Policy recompute_names(const std::vector<std::string>& names) {
  return {"recompute_names", [names](const PolicyContext& ctx) {
            for (const auto& n : names)
              if (!ctx.tag.empty() && n == ctx.tag) return Decision::must_recompute;
            return Decision::prefer_save;
          }};
}

CheckpointOptions CheckpointOptions::parse(const std::map<std::string, std::string>& options) {
  CheckpointOptions out;
  for (const auto& [key, value] : options) {
    if (key == "debug") {
      REMAT_CHECK(value == "true" || value == "false" || value == "1" || value == "0",
                  "checkpoint option debug: expected true, false, 1 or 0, got '", value, "'");
      out.debug = value == "true" || value == "1";
    } else if (key == "name") {
      out.name = value;
    } else if (key == "policy") {
      if (value == "save_nothing" || value == "full") out.policy = save_nothing();
      else if (value == "save_all") out.policy = save_all();
      else if (value == "ops") out.policy = ops_preset();
      else REMAT_FAIL("checkpoint option policy: expected save_nothing (= full), save_all or ops, got '", value, "'");
    } else {
      REMAT_FAIL("unknown checkpoint option '", key, "': expected one of debug, name, policy");
    }
  }
  return out;
}

}  // namespace remat
