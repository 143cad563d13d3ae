// remat::dist on two MPI ranks: collectives, their errors, and data parallel training of gpt tiny
// against one process with the whole batch. Run as `mpirun -np 2 test_dist` (tools/run_tests.py
// does); exits 77 (skipped) without MPI or as one process. Rank 0 reports; another rank's report
// is printed only when it failed.
#define CATCH_CONFIG_RUNNER
#include <catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <unistd.h>

#include "checkpoint/apply.h"
#include "dist/data_parallel.h"
#include "dist/sharded_adamw.h"
#include "models/data.h"
#include "models/cli/data_parallel_group.h"
#include "models/gpt.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "models/train.h"
#include "remat.h"

using namespace remat;
using namespace remat::dist;
using Catch::Matchers::Contains;

namespace {

ProcessGroup& world() { return ProcessGroup::world(); }

GptConfig tiny_config() {
  GptConfig c = gpt_config("tiny");
  c.dropout = 0;  // each rank draws its own masks; the comparison with one process needs none
  return c;
}

// Rows [from, from + n) of a batch, as a tensor of its own.
Tensor rows(const Tensor& t, int64_t from, int64_t n) {
  std::vector<int64_t> v = t.to_vector<int64_t>();
  int64_t width = t.shape()[1];
  return Tensor::from_vector(std::vector<int64_t>(v.begin() + from * width, v.begin() + (from + n) * width), {n, width});
}

std::vector<std::vector<float>> grads_of(Module& m) {
  std::vector<std::vector<float>> out;
  for (auto& [name, p] : m.named_parameters()) out.push_back(p.grad().as_contiguous().to_vector<float>());
  return out;
}

// One data parallel step of gpt tiny under `policy`: this rank's half of a batch of 2b rows.
std::vector<std::vector<float>> dp_grads(const std::string& policy, int64_t b) {
  manual_seed(7 + static_cast<uint64_t>(world().rank()));  // rank 0's weights must win the broadcast
  GptConfig c = tiny_config();
  Gpt model(c);
  apply_policy(model, parse_policy(policy));
  DataParallel dp(model.named_parameters());
  AdditionTask data(c.vocab, 11);
  auto [x, y] = data.batch(2 * b, c.seq_len);
  int64_t from = world().rank() * b;
  reset_checkpoint_counters();
  backward(model.loss(rows(x, from, b), rows(y, from, b)));
  if (policy != "none") {
    CHECK(checkpoint_counters().replays > 0);
    CHECK(checkpoint_counters().bytes_dropped > 0);
  }
  dp.average_gradients();
  return grads_of(model);
}

}  // namespace

TEST_CASE("all_reduce sums in rank order, broadcast and all_gather copy, on every rank", "[dist]") {
  int r = world().rank(), n = world().size();
  Tensor t = Tensor::from_vector(std::vector<float>{1.0f + r, 0.1f * r, -2.0f}, {3});
  world().all_reduce_sum(t);
  std::vector<float> expected(3, 0.0f);
  for (int k = 0; k < n; ++k) {
    expected[0] += 1.0f + k;
    expected[1] += 0.1f * k;
    expected[2] += -2.0f;
  }
  CHECK(t.to_vector<float>() == expected);  // the same additions in the same order: bitwise
  Tensor d = Tensor::from_vector(std::vector<double>{static_cast<double>(r) + 0.5}, {1});
  world().all_reduce_sum(d);
  CHECK(d.to_vector<double>()[0] == Approx(n * (n - 1) / 2.0 + 0.5 * n));

  Tensor b = Tensor::from_vector(std::vector<float>{static_cast<float>(r), 7.0f}, {2});
  world().broadcast(b, 1);
  CHECK(b.to_vector<float>() == std::vector<float>{1.0f, 7.0f});

  Tensor g = world().all_gather(Tensor::from_vector(std::vector<float>{static_cast<float>(10 * r)}, {1}));
  CHECK(g.shape() == Shape{n, 1});
  CHECK(g.to_vector<float>()[1] == 10.0f);
  world().barrier();
}

TEST_CASE("host sums of any length, several in flight, finished in any order, add in rank order", "[dist]") {
  // Every element is summed by the rank owning its chunk: lengths below, at and past the number
  // of ranks, uneven chunks, f32 and f64; the sums start together and finish last-first, so the
  // later ones wait for the chunks of the earlier ones to travel first (any world size).
  int r = world().rank(), n = world().size();
  // Every rank's values, computed once into one table (the tensors and the expected sums read the
  // same bits): sums of them round, so the order of the additions shows.
  auto table = [n](int64_t len) {
    std::vector<std::vector<double>> v(static_cast<size_t>(n), std::vector<double>(static_cast<size_t>(len)));
    for (int k = 0; k < n; ++k)
      for (int64_t i = 0; i < len; ++i) v[k][static_cast<size_t>(i)] = std::sqrt(0.37 * (k + 1) + 1e-3 * static_cast<double>(i));
    return v;
  };
  std::vector<Tensor> tensors;
  std::vector<std::vector<std::vector<double>>> tables;
  std::vector<ProcessGroup::PendingSum> pending;
  for (int64_t len : {0, 1, 2, 3, 5, 1000, 1001}) {
    for (DType dtype : {DType::f32, DType::f64}) {
      tables.push_back(table(len));
      tensors.push_back(Tensor::from_vector(tables.back()[static_cast<size_t>(r)], {len}).to(dtype));
      pending.push_back(world().start_all_reduce_sum(tensors.back()));
    }
  }
  for (auto& p : pending) p.poll();
  for (size_t k = pending.size(); k-- > 0;) pending[k].finish();
  for (size_t j = 0; j < tensors.size(); ++j) {
    const Tensor& t = tensors[j];
    bool same = true;
    for (int64_t i = 0; i < t.numel(); ++i) {
      auto at = [&](int k) { return tables[j][static_cast<size_t>(k)][static_cast<size_t>(i)]; };
      if (t.dtype() == DType::f32) {
        float expected = static_cast<float>(at(0));
        for (int k = 1; k < n; ++k) expected += static_cast<float>(at(k));
        same = same && t.data<float>()[i] == expected;
      } else {
        double expected = at(0);
        for (int k = 1; k < n; ++k) expected += at(k);
        same = same && t.data<double>()[i] == expected;
      }
    }
    INFO(t.meta_str() << " on " << n << " ranks");
    CHECK(same);
  }
}

TEST_CASE("reduce-scatter gives each rank the rank-order sum of its chunk, all_gather_chunks shares them back",
          "[dist][zero]") {
  // Uneven chunks, one of them empty; a reduce-scatter in flight between two all-reduces (the
  // three finish in any order), then the chunks gathered back (any world size).
  const int r = world().rank(), n = world().size();
  std::vector<int64_t> counts;
  for (int k = 0; k < n; ++k) counts.push_back(k == 0 ? 0 : 3 * k + 1);
  int64_t total = 0, from = 0;
  for (int k = 0; k < n; ++k) {
    if (k < r) from += counts[static_cast<size_t>(k)];
    total += counts[static_cast<size_t>(k)];
  }
  auto value = [](int rank, int64_t i) {
    return static_cast<float>(std::sqrt(0.3 * (rank + 1) + 0.01 * static_cast<double>(i)));
  };
  std::vector<float> mine;
  for (int64_t i = 0; i < total; ++i) mine.push_back(value(r, i));
  Tensor before = Tensor::ones({5}), scattered = Tensor::from_vector(mine, {total}), after = Tensor::ones({7});
  auto p1 = world().start_all_reduce_sum(before);
  auto p2 = world().start_reduce_scatter_sum(scattered, counts);
  auto p3 = world().start_all_reduce_sum(after);
  p3.finish();
  p1.finish();
  p2.finish();
  CHECK(before.to_vector<float>() == std::vector<float>(5, static_cast<float>(n)));
  CHECK(after.to_vector<float>() == std::vector<float>(7, static_cast<float>(n)));
  auto sum_at = [&](int64_t i) {
    float s = value(0, i);
    for (int k = 1; k < n; ++k) s += value(k, i);
    return s;
  };
  bool same = true;
  for (int64_t i = from; i < from + counts[static_cast<size_t>(r)]; ++i)
    same = same && scattered.data<float>()[i] == sum_at(i);
  CHECK(same);
  world().all_gather_chunks(scattered, counts);
  std::vector<float> expected;
  for (int64_t i = 0; i < total; ++i) expected.push_back(sum_at(i));
  CHECK(scattered.to_vector<float>() == expected);
  std::vector<int64_t> one_too_many = counts;
  one_too_many.push_back(0);
  CHECK_THROWS_WITH(world().start_reduce_scatter_sum(scattered, one_too_many),
                    Contains("reduce_scatter: expected one chunk size per rank"));
  std::vector<int64_t> short_counts(static_cast<size_t>(n), 0);
  CHECK_THROWS_WITH(world().all_gather_chunks(scattered, short_counts),
                    Contains("all_gather: the chunks hold 0 elements, the tensor " + std::to_string(total)));
  if (n > 1) {  // the same tensor split differently on each rank: an error on every rank, not a hang
    std::vector<int64_t> mine_first(static_cast<size_t>(n), 0);
    mine_first[static_cast<size_t>(r)] = total;
    CHECK_THROWS_WITH(world().start_reduce_scatter_sum(scattered, mine_first),
                      Contains("reduce_scatter: expected the same shape and dtype in the same chunks on every rank"));
    world().all_gather_chunks(scattered, counts);  // and the group goes on
    CHECK(scattered.to_vector<float>() == expected);
  }
}

TEST_CASE("tensors that differ across ranks are a clear error on every rank, and the group stays usable",
          "[dist][errors]") {
  Tensor t = Tensor::zeros({world().rank() == 0 ? 4 : 5});
  CHECK_THROWS_WITH(world().all_reduce_sum(t), Contains("expected the same shape and dtype on every rank") &&
                                                   Contains("rank 0 has f32[4]") && Contains("rank 1 has f32[5]"));
  Tensor i = Tensor::zeros({2}, DType::i64);
  CHECK_THROWS_WITH(world().all_reduce_sum(i), Contains("expected f32 or f64"));
  CHECK_THROWS_WITH(world().broadcast(t, 5), Contains("expected a root rank from 0 to 1, got 5"));
  Tensor ok = Tensor::ones({2});
  world().all_reduce_sum(ok);
  CHECK(ok.to_vector<float>() == std::vector<float>{2.0f, 2.0f});
}

TEST_CASE("2 ranks x batch b give 1 rank x batch 2b's gradients, the same bits on every run and under every policy",
          "[dist][data_parallel]") {
  const int64_t b = 3;
  auto dp = dp_grads("none", b);
  // Every rank ends with the same gradients, bit for bit.
  for (const auto& g : dp) {
    Tensor mine = Tensor::from_vector(g, {static_cast<int64_t>(g.size())});
    Tensor all = world().all_gather(mine);
    std::vector<float> v = all.to_vector<float>();
    CHECK(std::equal(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(g.size()), v.begin() + static_cast<std::ptrdiff_t>(g.size())));
  }
  // One process, the whole batch, rank 0's weights: the same gradients up to f32 summation order
  // (the mean over 2b rows is summed in one pass there, as two means of b rows here).
  manual_seed(7);
  GptConfig c = tiny_config();
  Gpt whole(c);
  AdditionTask data(c.vocab, 11);
  auto [x, y] = data.batch(2 * b, c.seq_len);
  backward(whole.loss(x, y));
  auto one = grads_of(whole);
  REQUIRE(one.size() == dp.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < one.size(); ++i)
    for (size_t k = 0; k < one[i].size(); ++k) {
      worst = std::max(worst, static_cast<double>(std::abs(one[i][k] - dp[i][k])));
      scale = std::max(scale, static_cast<double>(std::abs(one[i][k])));
    }
  INFO("max abs difference " << worst << " for gradients up to " << scale);
  CHECK(worst <= 1e-5 * scale);
  // A second run: the same bits. Checkpointing policies under data parallel: none's bits.
  CHECK(dp_grads("none", b) == dp);
  for (const char* policy : {"full", "ops", "block_skip:2"}) {
    INFO(policy);
    CHECK(dp_grads(policy, b) == dp);
  }
}

TEST_CASE("gradients leave in buckets while backward goes on, with the bits of backward then average_gradients",
          "[dist][data_parallel][overlap]") {
  const int64_t b = 2;
  GptConfig c = tiny_config();
  AdditionTask data(c.vocab, 17);
  auto [x, y] = data.batch(2 * b, c.seq_len);
  Tensor xs = rows(x, world().rank() * b, b), ys = rows(y, world().rank() * b, b);
  for (const char* policy : {"none", "full"}) {
    INFO(policy);
    auto run = [&](bool overlapped) {
      manual_seed(7 + static_cast<uint64_t>(world().rank()));
      Gpt model(c);
      apply_policy(model, parse_policy(policy));
      DataParallel dp(model.named_parameters(), world(), 4096);  // small buckets: many of them
      int64_t sent = 0;
      if (overlapped) {
        dp.backward(model.loss(xs, ys));
        sent = dp.buckets_sent_during_backward();
        CHECK(dp.buckets() > 3);
        CHECK(sent >= dp.buckets() - 1);  // all but possibly the embeddings', read by the first node
        CHECK_THROWS_WITH(dp.backward(model.loss(xs, ys)), Contains("has a gradient already; zero the gradients first"));
      } else {
        backward(model.loss(xs, ys));
        dp.average_gradients();
      }
      return grads_of(model);
    };
    CHECK(run(true) == run(false));
  }
}

TEST_CASE("ZeRO-1: gradients reduce-scattered and moments sharded over the ranks give plain data parallel's "
          "parameters and clipping norms, bit for bit",
          "[dist][zero]") {
  const int64_t b = 2, bucket = 16 << 10;  // small buckets: several, each split between the ranks
  GptConfig c = tiny_config();
  AdditionTask data(c.vocab, 13);
  std::vector<std::pair<Tensor, Tensor>> batches;
  for (int step = 0; step < 3; ++step) {
    auto [x, y] = data.batch(2 * b, c.seq_len);
    int64_t from = world().rank() * b;
    batches.emplace_back(rows(x, from, b), rows(y, from, b));
  }
  auto train = [&](bool sharded, int64_t* state_bytes, std::vector<double>* norms) {
    manual_seed(7 + static_cast<uint64_t>(world().rank()));
    Gpt model(c);
    DataParallel dp(model.named_parameters(), world(), bucket, /*zero1=*/sharded);
    AdamW plain(model.named_parameters());
    // Buckets of its own (one, the default size): the owners are the DataParallel's all the same.
    ShardedAdamW zero(model.named_parameters());
    for (auto& [x, y] : batches) {
      dp.backward(model.loss(x, y));
      if (sharded) {
        // Only this rank's parameters have their (averaged) gradient.
        bool owned_only = true;
        for (size_t i = 0; i < model.parameters().size(); ++i)
          owned_only = owned_only && model.parameters()[i].grad().defined() == (zero.owner(i) == world().rank());
        CHECK(owned_only);
        norms->push_back(zero.clip_grad_norm(0.05));
        zero.step(1e-2);
      } else {
        norms->push_back(clip_grad_norm(model.parameters(), 0.05));
        plain.step(1e-2);
      }
      for (Tensor& p : model.parameters()) p.zero_grad();
    }
    *state_bytes = zero.state_bytes();
    std::vector<std::vector<float>> out;
    for (auto& [name, p] : model.named_parameters()) out.push_back(p.as_contiguous().to_vector<float>());
    return out;
  };
  int64_t unused = 0, mine = 0;
  std::vector<double> plain_norms, zero_norms;
  auto plain = train(false, &unused, &plain_norms);
  auto zero = train(true, &mine, &zero_norms);
  CHECK(zero == plain);
  CHECK(zero_norms == plain_norms);
  CHECK(plain_norms.front() > 0.05);  // the clipping scaled the gradients
  // Each rank holds its share of the moments: together exactly AdamW's, apart about half each.
  int64_t param_bytes = 0;
  for (const auto& p : plain) param_bytes += static_cast<int64_t>(p.size() * sizeof(float));
  Tensor shares = world().all_gather(Tensor::from_vector(std::vector<double>{static_cast<double>(mine)}, {1}));
  std::vector<double> v = shares.to_vector<double>();
  CHECK(v[0] + v[1] == static_cast<double>(2 * param_bytes));
  CHECK(static_cast<double>(mine) < 0.6 * static_cast<double>(2 * param_bytes));
}

// A folder every rank names alike (rank 0's process id), removed at the end.
struct SharedTempDir {
  std::string path;
  SharedTempDir() {
    Tensor pid = Tensor::from_vector(std::vector<double>{static_cast<double>(::getpid())}, {1});
    world().broadcast(pid, 0);
    path = (std::filesystem::temp_directory_path() / fmt::format("remat_test_dist_train_{}", static_cast<int64_t>(pid.item()))).string();
    if (world().rank() == 0) std::filesystem::create_directories(path);
    world().barrier();
  }
  ~SharedTempDir() {
    // Leaving on a failure: the other rank must not wait for this one in a collective.
    if (std::uncaught_exceptions() > 0) world().report_failure("a check failed on this rank");
    else world().barrier();
    std::error_code ec;
    if (world().rank() == 0) std::filesystem::remove_all(path, ec);
  }
};

// Every parameter of a run's model.safetensors, in order (read on every rank after rank 0 wrote it).
std::vector<std::vector<float>> weights_in(const std::string& dir) {
  world().barrier();
  SafetensorsFile f = load_safetensors(dir + "/model.safetensors");
  std::vector<std::vector<float>> out;
  for (auto& [name, t] : f.tensors) out.push_back(t.to_vector<float>());
  return out;
}

TEST_CASE("remat train on 2 ranks x batch b: one process's losses with 2b (dropout too), the same bits on every "
          "run, with ZeRO-1 and under full checkpointing",
          "[dist][train]") {
  SharedTempDir tmp;
  auto run = [&](const std::string& name, TrainGroup* group, int64_t batch, const std::string& policy,
                 int64_t micro_batches = 1) {
    TrainOptions o;
    o.config = "tiny";
    o.micro_batches = micro_batches;
    o.overrides = {{"batch", static_cast<double>(batch)}, {"dropout", 0.1}};
    o.steps = 12, o.warmup = 2, o.seed = 5, o.policy = policy;
    o.out = tmp.path + "/" + name;
    o.group = group;
    return train(o);
  };
  const int64_t b = 4;
  DataParallelGroup plain(0), zero(1);
  TrainResult dp = run("dp", &plain, b, "none");
  TrainResult again = run("again", &plain, b, "none");
  TrainResult sharded = run("zero", &zero, b, "none");
  reset_checkpoint_counters();
  TrainResult full = run("full", &plain, b, "full");
  CHECK(checkpoint_counters().replays > 0);
  CHECK(checkpoint_counters().bytes_dropped > 0);
  std::vector<std::vector<float>> weights = weights_in(tmp.path + "/dp");
  CHECK(weights_in(tmp.path + "/again") == weights);
  CHECK(weights_in(tmp.path + "/zero") == weights);
  CHECK(weights_in(tmp.path + "/full") == weights);
  REQUIRE(dp.steps.size() == 12);
  for (size_t i = 0; i < dp.steps.size(); ++i) {
    CHECK(again.steps[i].loss == dp.steps[i].loss);
    CHECK(sharded.steps[i].loss == dp.steps[i].loss);
    CHECK(full.steps[i].loss == dp.steps[i].loss);
  }
  // One process with the whole batch of 2b rows sees the same data and dropout masks; only the
  // order of the f32 additions differs (two means of b rows averaged, against one mean of 2b), so
  // the losses and weights agree to f32 rounding over the steps, not bitwise.
  if (world().rank() == 0) {
    TrainResult one = run("one", nullptr, 2 * b, "none");
    std::vector<std::vector<float>> single;
    for (auto& [name, t] : load_safetensors(tmp.path + "/one/model.safetensors").tensors)
      single.push_back(t.to_vector<float>());
    for (size_t i = 0; i < dp.steps.size(); ++i) CHECK(std::abs(one.steps[i].loss - dp.steps[i].loss) < 1e-5);
    double largest = 0, worst = 0;
    for (size_t i = 0; i < weights.size(); ++i)
      for (size_t j = 0; j < weights[i].size(); ++j) {
        largest = std::max(largest, std::abs(static_cast<double>(single[i][j])));
        worst = std::max(worst, std::abs(static_cast<double>(single[i][j]) - weights[i][j]));
      }
    CHECK(worst <= 1e-4 * largest);
  }
  // Each rank in two micro-batches, the gradients averaged over ranks once after both (plain and
  // ZeRO-1): the same data and masks, so the losses of one pass within rounding, and the two
  // optimizers the same bits.
  TrainResult micro = run("micro", &plain, b, "none", 2), micro_sharded = run("micro_zero", &zero, b, "none", 2);
  for (size_t i = 0; i < dp.steps.size(); ++i) {
    CHECK(std::abs(micro.steps[i].loss - dp.steps[i].loss) < 1e-5);
    CHECK(micro_sharded.steps[i].loss == micro.steps[i].loss);
  }
  CHECK(weights_in(tmp.path + "/micro_zero") == weights_in(tmp.path + "/micro"));
}

TEST_CASE("a rank that fails makes the others fail with its message", "[.rank-failure]") {
  // Run by tests/scripts/test_dist_failure.sh: rank 1 fails in the middle of a step; rank 0,
  // waiting in the gradient all-reduce, gets rank 1's message instead of hanging.
  world().set_timeout(60);
  Tensor t = Tensor::ones({4});
  if (world().rank() == 1) {
    try {
      REMAT_FAIL("out of memory on cpu: 1 GiB requested (a simulated failure in forward)");
    } catch (const Error& e) {
      world().report_failure(e.what());
      throw;
    }
  }
  world().all_reduce_sum(t);
}

TEST_CASE("a rank that never arrives makes the others give up at the timeout", "[.rank-stuck]") {
  // Run by tests/scripts/test_dist_failure.sh: rank 1 is stuck (it sleeps); rank 0 gives up after 2 s.
  world().set_timeout(2);
  Tensor t = Tensor::ones({4});
  if (world().rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(20));
  world().all_reduce_sum(t);
}

int main(int argc, char** argv) {
  ProcessGroup& group = world();
  bool listing = false;  // tools/run_tests.py counts the cases of a skipped binary
  for (int i = 1; i < argc; ++i) listing = listing || std::string(argv[i]).rfind("--list", 0) == 0;
  if (!listing && (!mpi_built() || group.size() < 2)) {
    std::printf("test_dist: %s; skipping\n", mpi_built() ? "one process (run it under mpirun -np 2)" : "built without MPI");
    return 77;
  }
  Catch::Session session;
  int rc = session.applyCommandLine(argc, argv);
  if (rc != 0) return rc;
  std::string report = (std::filesystem::temp_directory_path() /
                        ("remat_test_dist_" + std::to_string(::getpid()) + "_rank" + std::to_string(group.rank()) + ".txt"))
                           .string();
  if (group.rank() != 0) session.configData().outputFilename = report;  // rank 0 reports
  rc = session.run();
  if (group.rank() != 0 && rc != 0) {
    std::ifstream in(report);
    std::fprintf(stderr, "rank %d:\n%s\n", group.rank(), std::string(std::istreambuf_iterator<char>(in), {}).c_str());
  }
  if (group.rank() != 0) std::remove(report.c_str());
  return rc;
}
