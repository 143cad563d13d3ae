// Options of a checkpoint region, as a struct or parsed from name=value pairs (hook-style API, CLI).
#pragma once

#include <map>
#include <string>

#include "policy.h"

namespace remat {

struct CheckpointOptions {
  Policy policy = save_nothing();  // what to keep; default: full checkpointing
  bool debug = false;              // record forward and replay op sequences for error messages
  std::string name;                // shown in errors, reports and traces

  // Known keys: policy (a policy name, see parse_region_policy), debug (true/false/1/0), name.
  // Unknown keys and bad values are errors that list what is accepted.
  static CheckpointOptions parse(const std::map<std::string, std::string>& options);
};

}  // namespace remat
