// remat-bench outputs: the stdout table, JSON (schema in docs/bench.md), CSV, a Chrome trace and an SVG plot.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "autograd/trace.h"
#include "bench_policies.h"

namespace remat::bench {

nlohmann::json machine_info();  // CPU model, threads, compiler, flags, git commit
void print_table(const std::vector<PolicyResult>& results, const std::string& item_name);
// For each budget policy: measured vs budget, and the fastest fixed policy of the run that fits.
void print_budgets(const std::vector<PolicyResult>& results);
// --profile: per policy, the `rows` ops and phases that took longest in the traced step.
void print_profiles(const std::vector<PolicyResult>& results, int rows, bool gpu);
// Every run by activation peak with its step times, peak and minimum time as ratios to none, and
// the Pareto front (peak against minimum step time).
void print_pareto(const std::vector<PolicyResult>& results);
void write_json(const std::string& path, const nlohmann::json& machine, const nlohmann::json& run,
                const std::vector<PolicyResult>& results);
void write_csv(const std::string& path, const std::vector<PolicyResult>& results);
// One process per policy: op spans (forward, replay, backward) and a memory counter by category.
void write_trace(const std::string& path, const std::vector<std::pair<std::string, Tracer>>& traces,
                 const std::vector<std::vector<MemoryEvent>>& memory);
// Left: activation peak against step time per policy. Right: activation memory over one step.
void write_plot(const std::string& path, const std::vector<PolicyResult>& results, const std::string& title);

}  // namespace remat::bench
