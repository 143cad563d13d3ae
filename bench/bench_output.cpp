// Writers for the bench results.
#include "bench_output.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <sstream>

#include "kernels/cpu/attention_heads.h"
#include "kernels/cpu/gemm.h"
#include "models/safetensors.h"  // write_file_atomically
#include "version.h"

#ifndef REMAT_BUILD_FLAGS
#define REMAT_BUILD_FLAGS "unknown"
#endif

namespace remat::bench {

namespace {
double mib(int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); }
}  // namespace

nlohmann::json machine_info() {
  std::string cpu = "unknown";
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);)
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  return {{"cpu", cpu},
          {"threads", omp_get_max_threads()},
          {"cpu_gemm", cpu::gemm_library()},
          {"cpu_attention", cpu::attention_path()},
          {"compiler", std::string("g++ ") + __VERSION__},
          {"flags", REMAT_BUILD_FLAGS},
          {"git_commit", REMAT_GIT_COMMIT}};
}

void print_table(const std::vector<PolicyResult>& results, const std::string& item_name) {
  const char* rate = item_name == "images" ? "img/s" : "tok/s";
  fmt::print("{:<14} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8} {:>9} {:>8} {:>6} {:>8}\n", "policy", "median ms",
             "min ms", "replay ms", "act MiB", "floor MiB", "total MiB", "replayed", rate, "TFLOP/s", "MFU",
             "bitwise");
  for (const auto& r : results)
    fmt::print("{:<14} {:>9.1f} {:>9.1f} {:>9.1f} {:>10.2f} {:>10} {:>10.2f} {:>8} {:>9.0f} {:>8} {:>6} {:>8}\n",
               r.policy, r.median_step_ms, r.min_step_ms, r.median_replay_ms, mib(r.activation_peak_bytes),
               r.activation_floor_bytes < 0 ? std::string("n/a") : fmt::format("{:.2f}", mib(r.activation_floor_bytes)),
               mib(r.peak_bytes), r.ops_replayed, r.tokens_per_s,
               r.model_tflops < 0 ? std::string("n/a") : fmt::format("{:.3f}", r.model_tflops),
               r.mfu < 0 ? std::string("n/a") : fmt::format("{:.1f}%", 100 * r.mfu),
               r.grads_bitwise_equal ? "yes" : "NO");
}

void print_budgets(const std::vector<PolicyResult>& results) {
  for (const auto& r : results) {
    if (r.budget_bytes < 0) continue;
    const PolicyResult* best = nullptr;
    for (const auto& f : results)
      if (f.budget_bytes < 0 && f.activation_peak_bytes <= r.budget_bytes && (!best || f.median_step_ms < best->median_step_ms))
        best = &f;
    fmt::print("{}: budget {:.2f} MiB, predicted {:.2f} MiB (at {}), measured {:.2f} MiB; checkpoints {}; recompute "
               "predicted {:.1f} ms, replayed {:.1f} ms; {:.1f} ms",
               r.policy, mib(r.budget_bytes), mib(r.predicted_peak_bytes), r.predicted_peak_at,
               mib(r.activation_peak_bytes),
               r.planned_blocks, r.predicted_recompute_ms, r.median_replay_ms, r.median_step_ms);
    if (r.predicted_offloaded_bytes > 0)
      fmt::print(" (offload {:.2f} MiB, {:.2f} MiB measured, transfer not hidden {:.1f} ms predicted)",
                 mib(r.predicted_offloaded_bytes), mib(r.offloaded_bytes), r.predicted_transfer_ms);
    if (best)
      fmt::print(" vs {:.1f} ms for {} (fastest fixed policy within the budget)\n", best->median_step_ms, best->policy);
    else
      fmt::print("; no fixed policy of this run fits the budget\n");
  }
}

nlohmann::json profile_json(const std::vector<OpTime>& profile) {
  nlohmann::json rows = nlohmann::json::array();
  for (const OpTime& t : profile)
    rows.push_back({{"op", t.name}, {"phase", t.phase}, {"calls", t.calls}, {"ms", t.total_us / 1000}});
  return rows;
}

void print_profiles(const std::vector<PolicyResult>& results, int rows, bool gpu) {
  fmt::print("\nwhere one traced step's time goes, per op and phase ({}; an op's backward includes the ops its "
             "node runs, a replay inside it counts under replay)\n",
             gpu ? "GPU time between CUDA events around each op on the compute stream, idle gaps included"
                 : "host time");
  for (const auto& r : results) {
    double covered = 0;
    for (const OpTime& t : r.profile) covered += t.total_us;
    fmt::print("{}: step {:.1f} ms (host), ops {:.1f} ms\n", r.policy, r.timeline_step_us / 1000, covered / 1000);
    fmt::print("  {:<9} {:<22} {:>6} {:>9} {:>7}\n", "phase", "op", "calls", "ms", "share");
    int shown = 0;
    for (const OpTime& t : r.profile) {
      if (shown++ == rows) break;
      fmt::print("  {:<9} {:<22} {:>6} {:>9.2f} {:>6.1f}%\n", t.phase, t.name, t.calls, t.total_us / 1000,
                 covered > 0 ? 100 * t.total_us / covered : 0.0);
    }
  }
}

void print_pareto(const std::vector<PolicyResult>& results) {
  const PolicyResult* none = nullptr;
  for (const auto& r : results)
    if (r.policy == "none") none = &r;
  std::vector<const PolicyResult*> rows;
  for (const auto& r : results) rows.push_back(&r);
  std::sort(rows.begin(), rows.end(), [](auto* a, auto* b) { return a->activation_peak_bytes < b->activation_peak_bytes; });
  // Minimum step times: on a machine whose speed drifts, the least disturbed step of each policy
  // is the steadier figure (medians of identical runs differ by several percent here).
  fmt::print("\nstep time against activation peak, lowest peak first (front: no other run is as low in peak and in "
             "minimum step time and lower in one)\n");
  fmt::print("{:<22} {:>10} {:>7} {:>10} {:>9} {:>7} {:>6}  {}\n", "policy", "act MiB", "x none", "median ms", "min ms",
             "x none", "front", "planned (budgets)");
  for (const PolicyResult* r : rows) {
    bool dominated = std::any_of(rows.begin(), rows.end(), [&](const PolicyResult* o) {
      return o != r && o->activation_peak_bytes <= r->activation_peak_bytes && o->min_step_ms <= r->min_step_ms &&
             (o->activation_peak_bytes < r->activation_peak_bytes || o->min_step_ms < r->min_step_ms);
    });
    auto ratio = [&](double a, double b) { return none && b > 0 ? fmt::format("{:.2f}", a / b) : std::string("n/a"); };
    fmt::print("{:<22} {:>10.2f} {:>7} {:>10.1f} {:>9.1f} {:>7} {:>6}  {}\n", r->policy, mib(r->activation_peak_bytes),
               ratio(static_cast<double>(r->activation_peak_bytes), none ? static_cast<double>(none->activation_peak_bytes) : 0),
               r->median_step_ms, r->min_step_ms, ratio(r->min_step_ms, none ? none->min_step_ms : 0),
               dominated ? "" : "yes", r->planned_blocks);
  }
}

void write_json(const std::string& path, const nlohmann::json& machine, const nlohmann::json& run,
                const std::vector<PolicyResult>& results) {
  nlohmann::json policies = nlohmann::json::array();
  for (const auto& r : results) {
    policies.push_back({{"policy", r.policy},
                        {"median_step_ms", r.median_step_ms},
                        {"min_step_ms", r.min_step_ms},
                        {"median_replay_ms", r.median_replay_ms},
                        {"peak_bytes", r.peak_bytes},
                        {"activation_peak_bytes", r.activation_peak_bytes},
                        {"activation_floor_bytes", r.activation_floor_bytes < 0 ? nlohmann::json(nullptr)
                                                                                : nlohmann::json(r.activation_floor_bytes)},
                        {"saved_bytes_by_op", r.saved_bytes_by_op},
                        {"recomputed_bytes_by_op", r.recomputed_bytes_by_op},
                        {"heap_step_peak_bytes", r.heap_step_peak_bytes < 0 ? nlohmann::json(nullptr)
                                                                            : nlohmann::json(r.heap_step_peak_bytes)},
                        {"ops_replayed", r.ops_replayed},
                        {"offloaded_bytes", r.offloaded_bytes},
                        {"tokens_per_s", r.tokens_per_s},
                        {"model_tflops", r.model_tflops < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.model_tflops)},
                        {"mfu", r.mfu < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.mfu)},
                        {"host_syncs_per_step", r.host_syncs_per_step < 0 ? nlohmann::json(nullptr)
                                                                          : nlohmann::json(r.host_syncs_per_step)},
                        {"grads_bitwise_equal", r.grads_bitwise_equal},
                        {"grads_max_abs_diff", r.grads_max_abs_diff},
                        {"budget_bytes", r.budget_bytes < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.budget_bytes)},
                        {"predicted_peak_bytes", r.predicted_peak_bytes < 0 ? nlohmann::json(nullptr)
                                                                            : nlohmann::json(r.predicted_peak_bytes)},
                        {"predicted_recompute_ms", r.predicted_recompute_ms < 0
                                                       ? nlohmann::json(nullptr)
                                                       : nlohmann::json(r.predicted_recompute_ms)},
                        {"planned_blocks", r.planned_blocks},
                        {"predicted_peak_at", r.predicted_peak_at},
                        {"predicted_offloaded_bytes", r.predicted_offloaded_bytes < 0
                                                          ? nlohmann::json(nullptr)
                                                          : nlohmann::json(r.predicted_offloaded_bytes)},
                        {"predicted_transfer_ms", r.predicted_offloaded_bytes < 0
                                                      ? nlohmann::json(nullptr)
                                                      : nlohmann::json(r.predicted_transfer_ms)},
                        {"profile", profile_json(r.profile)}});
  }
  nlohmann::json doc = {{"schema", "remat-bench/1"}, {"machine", machine}, {"run", run}, {"policies", policies}};
  write_file_atomically(path, doc.dump(2) + "\n");
}

void write_csv(const std::string& path, const std::vector<PolicyResult>& results) {
  std::ostringstream out;
  out << "policy,median_step_ms,min_step_ms,median_replay_ms,peak_bytes,activation_peak_bytes,"
         "activation_floor_bytes,ops_replayed,tokens_per_s,grads_bitwise_equal,grads_max_abs_diff\n";
  for (const auto& r : results)
    out << r.policy << "," << r.median_step_ms << "," << r.min_step_ms << "," << r.median_replay_ms << ","
        << r.peak_bytes << "," << r.activation_peak_bytes << ","
        << (r.activation_floor_bytes < 0 ? std::string() : std::to_string(r.activation_floor_bytes)) << ","
        << r.ops_replayed << "," << r.tokens_per_s << "," << (r.grads_bitwise_equal ? "true" : "false") << ","
        << r.grads_max_abs_diff << "\n";
  write_file_atomically(path, out.str());
}

void write_trace(const std::string& path, const std::vector<std::pair<std::string, Tracer>>& traces,
                 const std::vector<std::vector<MemoryEvent>>& memory) {
  nlohmann::json events = nlohmann::json::array();
  for (size_t pid = 0; pid < traces.size(); ++pid) {
    const auto& [policy, tracer] = traces[pid];
    events.push_back({{"ph", "M"}, {"pid", pid}, {"name", "process_name"}, {"args", {{"name", "policy " + policy}}}});
    const std::array<std::string, 3> phases = {"forward", "replay", "backward"};
    for (size_t tid = 0; tid < phases.size(); ++tid)
      events.push_back({{"ph", "M"}, {"pid", pid}, {"tid", tid}, {"name", "thread_name"}, {"args", {{"name", phases[tid]}}}});
    for (const TraceEvent& e : tracer.events()) {
      size_t tid = std::find(phases.begin(), phases.end(), e.phase) - phases.begin();
      nlohmann::json span = {{"ph", "X"}, {"pid", pid}, {"tid", tid}, {"name", e.name}, {"cat", e.phase},
                             {"ts", e.start_us}, {"dur", e.duration_us}};
      if (e.gpu_us >= 0) span["args"] = {{"gpu_us", e.gpu_us}};  // with --profile on a GPU
      events.push_back(std::move(span));
    }
    // Memory counters by category, in MiB.
    std::array<int64_t, kMemoryCategoryCount> current{};
    for (const MemoryEvent& m : memory[pid]) {
      current[static_cast<int>(m.category)] += m.bytes;
      nlohmann::json args;
      for (int c = 0; c < kMemoryCategoryCount; ++c)
        args[category_name(static_cast<MemoryCategory>(c))] = mib(current[c]);
      events.push_back({{"ph", "C"}, {"pid", pid}, {"name", "memory (MiB, relative to step start)"},
                        {"ts", m.time_us}, {"args", args}});
    }
  }
  write_file_atomically(path, nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() + "\n");
}

void write_plot(const std::string& path, const std::vector<PolicyResult>& results, const std::string& title) {
  const std::array<const char*, 8> colors = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
  const double W = 1000, H = 440, panel = 420, top = 50, plot_h = 320;
  std::ostringstream svg;
  svg << fmt::format(R"svg(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">)svg", W, H)
      << "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg << fmt::format(R"svg(<text x="{}" y="22" font-size="15" text-anchor="middle">remat-bench: {} — activation memory vs step time, and over one step</text>)svg", W / 2, title)
      << "\n";
  // Left panel: scatter of (median step ms, activation peak MiB).
  double max_t = 0, max_m = 0;
  for (const auto& r : results) {
    max_t = std::max(max_t, r.median_step_ms);
    max_m = std::max(max_m, mib(r.activation_peak_bytes));
  }
  max_t *= 1.15, max_m *= 1.15;
  const double x0 = 70, y0 = top + plot_h;
  auto px = [&](double t) { return x0 + (panel - 90) * t / max_t; };
  auto py = [&](double m) { return y0 - plot_h * m / max_m; };
  svg << fmt::format(R"svg(<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="black"/><line x1="{0}" y1="{1}" x2="{0}" y2="{3}" stroke="black"/>)svg",
                     x0, y0, x0 + panel - 90, top)
      << "\n";
  for (int i = 0; i <= 4; ++i) {
    double t = max_t * i / 4, m = max_m * i / 4;
    svg << fmt::format(R"svg(<text x="{}" y="{}" text-anchor="middle">{:.0f}</text>)svg", px(t), y0 + 16, t)
        << fmt::format(R"svg(<text x="{}" y="{}" text-anchor="end">{:.0f}</text>)svg", x0 - 6, py(m) + 4, m) << "\n";
  }
  svg << fmt::format(R"svg(<text x="{}" y="{}" text-anchor="middle">median step time (ms)</text>)svg", x0 + (panel - 90) / 2, y0 + 34)
      << fmt::format(R"svg(<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">activation peak (MiB)</text>)svg", top + plot_h / 2)
      << "\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    double cx = px(r.median_step_ms), cy = py(mib(r.activation_peak_bytes));
    svg << fmt::format(R"svg(<circle cx="{}" cy="{}" r="5" fill="{}"/><text x="{}" y="{}">{}</text>)svg", cx, cy,
                       colors[i % colors.size()], cx + 8, cy - 6, r.policy)
        << "\n";
  }
  // Right panel: activation memory over one traced step, time normalised to the step length.
  const double rx0 = panel + 110, rw = W - rx0 - 30;
  double max_a = 0;
  std::vector<std::vector<std::pair<double, double>>> lines;
  for (const auto& r : results) {
    std::vector<std::pair<double, double>> pts{{0, 0}};
    int64_t current = 0;
    for (const MemoryEvent& e : r.timeline) {
      if (e.category != MemoryCategory::activation) continue;
      current += e.bytes;
      double t = r.timeline_step_us > 0 ? std::clamp(e.time_us / r.timeline_step_us, 0.0, 1.0) : 0;
      pts.push_back({t, mib(current)});
      max_a = std::max(max_a, mib(current));
    }
    lines.push_back(std::move(pts));
  }
  max_a = std::max(max_a * 1.1, 1e-6);
  auto qx = [&](double t) { return rx0 + rw * t; };
  auto qy = [&](double m) { return y0 - plot_h * m / max_a; };
  svg << fmt::format(R"svg(<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="black"/><line x1="{0}" y1="{1}" x2="{0}" y2="{3}" stroke="black"/>)svg",
                     rx0, y0, rx0 + rw, top)
      << "\n";
  for (int i = 0; i <= 4; ++i)
    svg << fmt::format(R"svg(<text x="{}" y="{}" text-anchor="middle">{:.2f}</text>)svg", qx(i / 4.0), y0 + 16, i / 4.0)
        << fmt::format(R"svg(<text x="{}" y="{}" text-anchor="end">{:.0f}</text>)svg", rx0 - 6, qy(max_a * i / 4) + 4, max_a * i / 4) << "\n";
  svg << fmt::format(R"svg(<text x="{}" y="{}" text-anchor="middle">fraction of one step (forward, then backward)</text>)svg", rx0 + rw / 2, y0 + 34)
      << fmt::format(R"svg(<text transform="translate({},{}) rotate(-90)" text-anchor="middle">activation memory (MiB)</text>)svg", rx0 - 45, top + plot_h / 2)
      << "\n";
  for (size_t i = 0; i < lines.size(); ++i) {
    std::string points;
    double prev = 0;
    for (auto [t, m] : lines[i]) {  // steps: hold the previous value until the event
      points += fmt::format("{:.1f},{:.1f} {:.1f},{:.1f} ", qx(t), qy(prev), qx(t), qy(m));
      prev = m;
    }
    svg << fmt::format(R"svg(<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>)svg", colors[i % colors.size()], points)
        << fmt::format(R"svg(<text x="{}" y="{}" fill="{}">{}</text>)svg", rx0 + rw - 90, top + 14 * (i + 1), colors[i % colors.size()],
                       results[i].policy)
        << "\n";
  }
  svg << "</svg>\n";
  write_file_atomically(path, svg.str());
}

}  // namespace remat::bench
