// libFuzzer target: policy strings (remat train --policy, remat-bench --policies) and the
// name=value options of hook-style checkpointing, on arbitrary text.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "checkpoint/apply.h"
#include "checkpoint/options.h"
#include "runtime/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  try {
    remat::PolicySpec spec = remat::parse_policy(text);
    // A budget is a positive byte count up to 2^62 or a percentage in (0, 100].
    if (spec.kind == remat::PolicySpec::Kind::budget &&
        (spec.budget_percent == 0 ? spec.budget_bytes < 1 || spec.budget_bytes > (int64_t{1} << 62)
                                  : !(spec.budget_percent > 0 && spec.budget_percent <= 100)))
      __builtin_trap();
  } catch (const remat::Error&) {
  }
  // The same text as "key=value" for CheckpointOptions::parse.
  size_t eq = text.find('=');
  if (eq != std::string::npos) {
    try {
      remat::CheckpointOptions::parse({{text.substr(0, eq), text.substr(eq + 1)}});
    } catch (const remat::Error&) {
    }
  }
  return 0;
}
