// The soak run: gpt trained with AdamW for many steps per policy; allocator counters and RSS
// sampled at fixed steps, at the same point of the step (after the optimizer, before the next batch).
#include "bench_soak.h"

#include <fmt/format.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "models/data.h"
#include "models/gpt.h"
#include "models/optim.h"
#include "remat.h"

namespace remat::bench {

namespace {

int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<int64_t>(sysconf(_SC_PAGE_SIZE));
}

}  // namespace

int run_soak(const SoakOptions& o) {
  REMAT_CHECK(o.steps >= 10 && o.samples >= 2, "soak: expected --steps >= 10 and --samples >= 2");
  nlohmann::json results = nlohmann::json::array();
  bool flat = true;
  fmt::print("remat-bench soak: gpt {}, {} steps per policy (AdamW), live bytes and RSS sampled {} times\n", o.config,
             o.steps, o.samples);
  for (const std::string& policy : o.policies) {
    manual_seed(0);
    GptConfig c = gpt_config(o.config);
    Gpt model(c);
    apply_policy(model, parse_policy(policy));
    AdamW opt(model.named_parameters());
    AdditionTask data(c.vocab, 1);
    reset_peak_memory();  // each policy's own peak, not the largest so far in this process
    std::vector<int64_t> at;
    for (int i = 0; i < o.samples; ++i) at.push_back(10 + (o.steps - 10) * i / (o.samples - 1));
    nlohmann::json rows = nlohmann::json::array();
    fmt::print("{:<14} {:>8} {:>14} {:>14} {:>12}\n", policy, "step", "live bytes", "peak bytes", "RSS MiB");
    size_t next = 0;
    int64_t live_10 = 0, live_last = 0, peak_10 = 0, peak_last = 0;
    for (int64_t step = 1; step <= o.steps; ++step) {
      {
        auto [x, y] = data.batch(c.batch, c.seq_len);
        backward(model.loss(x, y));
      }
      opt.step(1e-3);
      opt.zero_grad();
      if (next < at.size() && step == at[next]) {
        MemoryStats s = memory_stats();
        int64_t rss = resident_bytes();
        fmt::print("{:<14} {:>8} {:>14} {:>14} {:>12.1f}\n", "", step, s.total.current, s.total.peak, rss / 1048576.0);
        rows.push_back({{"step", step}, {"live_bytes", s.total.current}, {"peak_bytes", s.total.peak}, {"rss_bytes", rss}});
        if (next == 0) live_10 = s.total.current, peak_10 = s.total.peak;
        live_last = s.total.current;
        peak_last = s.total.peak;
        ++next;
      }
    }
    bool this_flat = live_last == live_10 && peak_last == peak_10;
    flat = flat && this_flat;
    fmt::print("{:<14} after step {}: live {}, peak {} (after step 10: {}, {}): {}\n", "", o.steps, live_last, peak_last,
               live_10, peak_10, this_flat ? "flat" : "GROWING");
    results.push_back({{"policy", policy}, {"flat", this_flat}, {"samples", rows}});
  }
  if (!o.json_path.empty()) {
    nlohmann::json doc = {{"schema", "remat-bench-soak/1"}, {"config", o.config}, {"steps", o.steps}, {"policies", results}};
    std::ofstream(o.json_path) << doc.dump(2) << "\n";
  }
  return flat ? 0 : 1;
}

}  // namespace remat::bench
