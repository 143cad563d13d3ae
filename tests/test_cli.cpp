// The `remat` command run as a user would: bad input gives one line on stderr and exit status 2.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#ifndef REMAT_CLI
#error "REMAT_CLI (path of the built remat binary) must be defined by the build"
#endif

namespace {

struct Run {
  int status;
  std::string err;
  std::string out;
};

// Runs remat with args; env (e.g. "NAME=value") is set for that command only.
Run run(const std::string& args, const std::string& env = "") {
  std::string err_path = std::filesystem::temp_directory_path() / ("remat_cli_err_" + std::to_string(::getpid()));
  std::string cmd = (env.empty() ? "" : env + " ") + std::string(REMAT_CLI) + " " + args + " 2>" + err_path;
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
  int status = pclose(pipe);
  std::ifstream in(err_path);
  std::string err((std::istreambuf_iterator<char>(in)), {});
  std::filesystem::remove(err_path);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, err, out};
}

void check_one_line_error(const Run& r, const std::string& contains) {
  INFO("stderr: " << r.err);
  CHECK(r.status == 2);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(r.err.find(contains) != std::string::npos);
}

}  // namespace

TEST_CASE("remat --help, --version and remat ops work", "[cli]") {
  Run help = run("--help");
  CHECK(help.status == 0);
  CHECK(help.out.find("train") != std::string::npos);
  Run version = run("--version");
  CHECK(version.status == 0);
  CHECK(version.out.rfind("remat 0.2.0 (", 0) == 0);
  Run ops = run("ops");
  CHECK(ops.status == 0);
  CHECK(ops.out.find("attention") != std::string::npos);
  CHECK(ops.out.find("cross_entropy") != std::string::npos);
}

TEST_CASE("remat train on the tiny config writes metrics and weights", "[cli]") {
  auto dir = std::filesystem::temp_directory_path() / ("remat_cli_run_" + std::to_string(::getpid()));
  Run r = run("train --config tiny --steps 5 --policy block_skip:2 --out " + dir.string());
  INFO(r.err);
  CHECK(r.status == 0);
  CHECK(r.out.find("final loss") != std::string::npos);
  CHECK(std::filesystem::exists(dir / "model.safetensors"));
  CHECK(std::filesystem::exists(dir / "state.safetensors"));
  std::ifstream metrics(dir / "metrics.jsonl");
  std::string first;
  std::getline(metrics, first);
  CHECK(first.find("\"activation_peak_bytes\"") != std::string::npos);
  CHECK(first.find("\"step\":1") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("remat sample writes the PNG and scores its shapes against the labels", "[cli][diffusion]") {
  auto dir = std::filesystem::temp_directory_path() / ("remat_cli_sample_" + std::to_string(::getpid()));
  Run trained = run("train --model dit --config tiny --steps 2 --out " + dir.string());
  INFO(trained.err);
  REQUIRE(trained.status == 0);
  Run r = run("sample --weights " + (dir / "model.safetensors").string() + " --n 16 --steps 2 --out " +
              (dir / "s.png").string());
  INFO(r.err);
  CHECK(r.status == 0);
  CHECK(std::filesystem::exists(dir / "s.png"));
  // A two-step tiny model draws no shapes; the line still reports every class it was asked for.
  CHECK(r.out.find("shapes: ") != std::string::npos);
  CHECK(r.out.find("fit their label's outline best") != std::string::npos);
  CHECK(r.out.find(" (disc ") != std::string::npos);
  CHECK(r.out.find(", cross ") != std::string::npos);
  CHECK(r.out.find("/16 fit") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("every bad input exits with status 2 and one line", "[cli][errors]") {
  check_one_line_error(run("train --model resnet --steps 1"), "unknown model 'resnet': expected gpt, dit or unet");
  check_one_line_error(run("train --config huge --steps 1"), "unknown gpt config 'huge'");
  check_one_line_error(run("train --config tiny --policy sometimes --steps 1"), "unknown policy 'sometimes'");
  check_one_line_error(run("train --config tiny --steps many"), "--steps");
  check_one_line_error(run("train --config tiny --steps 0"), "expected --steps >= 1");
  check_one_line_error(run("train --config tiny --steps 1", "REMAT_CPU_GEMM=fastest"),
                       "REMAT_CPU_GEMM: expected auto, avx512, openblas or eigen, got 'fastest'");
  check_one_line_error(run("train --config tiny --steps 1", "REMAT_CPU_ATTENTION=fastest"),
                       "REMAT_CPU_ATTENTION: expected auto or eigen, got 'fastest'");
  check_one_line_error(run("train --config tiny --steps 1 --ema 1"), "expected --ema 0 (off) or a decay in (0, 1), got 1");
  check_one_line_error(run("train --config tiny --steps 1 --out /proc/remat_cannot_write"), "--out /proc/remat_cannot_write");
  check_one_line_error(run("train --config tiny --steps 1 --device tpu"), "unknown device 'tpu'");
  check_one_line_error(run("train --config tiny --steps 1 --restart"), "--restart starts the schedule again at a resumed step");
  check_one_line_error(run("train --config tiny --steps 1 --dtype bf16"), "--dtype bf16 computes on cuda only");
  check_one_line_error(run("train --config tiny --steps 1 --tf32"),
                       "--tf32 applies to f32 GEMMs on cuda; this run is on cpu");
  check_one_line_error(run("train --config tiny --steps 1 --dtype f16"), "--dtype: expected f32 or bf16, got 'f16'");
  check_one_line_error(run("train --config tiny --steps 1 --micro-batches 3"),
                       "expected a number of micro-batches that divides the batch of 2 rows, got 3");
  check_one_line_error(run("train --model dit --config tiny --steps 1 --fused-loss"),
                       "--fused-loss: only gpt has a language model's head to fuse with its loss");
  check_one_line_error(run("frobnicate"), "frobnicate");
  auto dir = std::filesystem::temp_directory_path() / ("remat_cli_bad_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const char header_only[] = "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":";  // claims 16 header bytes, has 5
  std::ofstream(dir / "state.safetensors", std::ios::binary).write(header_only, sizeof header_only - 1);
  check_one_line_error(run("train --resume " + dir.string() + " --steps 3"), "truncated");
  std::filesystem::remove_all(dir);
  check_one_line_error(run("train --resume /nonexistent/run --steps 3"), "no training state");
  check_one_line_error(run("sample --weights /nonexistent/model.safetensors"), "cannot open");
  check_one_line_error(run("sample"), "--weights");
}

TEST_CASE("numbers and paths from the command line are checked before anything runs or is created", "[cli][errors]") {
  check_one_line_error(run("train --config tiny --steps 2 --save-every 0"), "expected --save-every >= 1");
  check_one_line_error(run("train --config tiny --steps 2 --batch 0"), "config field batch: expected a whole number");
  check_one_line_error(run("train --config tiny --steps 2 --layers 0"), "config field layers: expected a whole number");
  check_one_line_error(run("train --config tiny --steps 2 --heads 0"), "config field heads: expected a whole number");
  check_one_line_error(run("train --config tiny --steps 2 --heads 3"), "expected channels (32) divisible by heads (3)");
  check_one_line_error(run("train --config tiny --steps 99999999999999999999"), "--steps");
  check_one_line_error(run("train --config tiny --steps 2000000000"), "expected --steps <= 1000000000");
  check_one_line_error(run("train --config tiny --steps 2 --seed -1"), "--seed");
  check_one_line_error(run("train --config tiny --steps 2 --clip 0"), "expected --clip > 0");
  for (const char* budget : {"budget:inf", "budget:nan", "budget:1e19", "budget:1e400", "budget:.5", "budget:12x"})
    check_one_line_error(run(std::string("train --config tiny --steps 2 --policy ") + budget),
                         "with a whole number of bytes from 1 to 2^62");
  // gpt tiny's parameters and AdamW's moments dwarf its activations: with every category counted at
  // its peak, the floor of a total budget lies above the peak measured without checkpointing.
  check_one_line_error(run("train --config tiny --steps 2 --policy budget:total:100%"),
                       "did not coincide: budget the activations alone (budget:act:...)");
  check_one_line_error(run("train --config tiny --steps 2 --policy block_skip:99999999999"),
                       "expected block_skip:N with 1 <= N");
  check_one_line_error(run("train --config tiny --steps 2 --channels 30000"), "for the weights alone, more than the");
  check_one_line_error(run("train --config tiny --steps 2 --max-memory 64K"), "for the weights alone");
  check_one_line_error(run("train --config tiny --steps 2 --max-memory 200K"), "out of memory on cpu");
  check_one_line_error(run("train --config tiny --steps 2 --max-memory 12Q"), "byte count '12Q': unknown unit 'Q'");

  auto base = std::filesystem::temp_directory_path() / ("remat_cli_checks_" + std::to_string(::getpid()));
  std::filesystem::remove_all(base);
  std::filesystem::create_directories(base);
  // A failed check leaves no run folder behind.
  check_one_line_error(run("train --config tiny --steps 2 --batch 0 --out " + (base / "new").string()), "batch");
  CHECK_FALSE(std::filesystem::exists(base / "new"));
  // A folder holding a run is not overwritten without --overwrite.
  Run first = run("train --config tiny --steps 2 --out " + (base / "run").string());
  REQUIRE(first.status == 0);
  check_one_line_error(run("train --config tiny --steps 2 --out " + (base / "run").string()), "holds a run already");
  CHECK(run("train --config tiny --steps 2 --overwrite --out " + (base / "run").string()).status == 0);
  // Two runs into one folder: the second is refused while the first holds the lock.
  int fd = ::open((base / "run" / ".lock").c_str(), O_CREAT | O_RDWR, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
  check_one_line_error(run("train --resume " + (base / "run").string() + " --steps 4"), "another remat train is writing");
  ::close(fd);
  // sample says a bad --out before it samples.
  check_one_line_error(run("sample --weights " + (base / "run" / "model.safetensors").string() + " --out " + base.string()),
                       "is a folder");
  std::filesystem::remove_all(base);
}

TEST_CASE("training on the CPU never loads the CUDA part, under any policy", "[cli]") {
  // Loading it maps CUDA's libraries (about 150 MiB of RSS); a full-policy backward once did, to
  // poll for offload copies that a CPU run never makes. LD_DEBUG=files names every library loaded.
  auto base = std::filesystem::temp_directory_path() / ("remat_cli_cpu_only_" + std::to_string(::getpid()));
  std::filesystem::remove_all(base);
  std::filesystem::create_directories(base);
  for (const char* policy : {"none", "full", "ops", "block_skip:2", "level:3", "sqrt"}) {
    INFO("policy " << policy);
    Run r = run(std::string("train --config tiny --steps 2 --device cpu --policy ") + policy + " --out " +
                (base / "run").string() + " --overwrite", "LD_DEBUG=files");
    REQUIRE(r.status == 0);
    CHECK(r.err.find("file=") != std::string::npos);  // the loader did report
    CHECK(r.err.find("libremat_cuda") == std::string::npos);
  }
  std::filesystem::remove_all(base);
}
