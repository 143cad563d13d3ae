// remat-bench: measures remat. `remat-bench ops` times the kernels; policy runs arrive with the bench issue.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "bench_ops.h"
#include "runtime/error.h"

int main(int argc, char** argv) {
  CLI::App app{"remat-bench: kernel throughput, and peak memory and time per model x checkpoint policy"};
  app.require_subcommand(1);
  remat::bench::OpsOptions ops;
  CLI::App* ops_cmd = app.add_subcommand("ops", "GFLOP/s of matmul/linear and times of the fused ops");
  ops_cmd->add_option("--device", ops.device, "cpu or cuda:N")->capture_default_str();
  ops_cmd->add_option("--repeats", ops.repeats, "timed repeats per op (median reported)")->check(CLI::PositiveNumber)->capture_default_str();
  ops_cmd->add_option("--json", ops.json_path, "also write the figures as JSON to this file");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    if (*ops_cmd) return remat::bench::run_ops(ops);
  } catch (const remat::Error& e) {
    std::fprintf(stderr, "remat-bench: %s\n", e.message().c_str());
    return 2;
  }
  return 0;
}
