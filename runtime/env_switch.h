// EnvSwitch: a process-wide on/off setting whose default comes from an environment variable.
#pragma once

#include <atomic>
#include <cstdlib>
#include <string>

#include "runtime/error.h"

namespace remat {

// A process-wide on/off setting whose default an environment variable (0 or 1) gives at its first
// read; set() overrides it from then on.
class EnvSwitch {
 public:
  EnvSwitch(const char* variable, bool fallback) : variable_(variable), fallback_(fallback) {}
  void set(bool enabled) { state_.store(enabled ? 1 : 0); }
  bool get() {
    int enabled = state_.load();
    if (enabled < 0) {
      const char* env = std::getenv(variable_);
      const std::string value = env == nullptr ? "" : env;
      REMAT_CHECK(value.empty() || value == "0" || value == "1", variable_, ": expected 0 or 1, got '", value, "'");
      int expected = -1;
      state_.compare_exchange_strong(expected, value.empty() ? int{fallback_} : int{value == "1"});
      enabled = state_.load();
    }
    return enabled == 1;
  }

 private:
  const char* variable_;
  bool fallback_;
  std::atomic<int> state_{-1};  // -1: not read yet, else 0 or 1
};

}  // namespace remat
