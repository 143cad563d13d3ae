// The GPT reference model, optimizers, the training loop, resume and safetensors.
#include <catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <omp.h>

#include "kernels/backend.h"
#include "models/data.h"
#include "models/gpt.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "models/train.h"
#include "remat.h"

using namespace remat;
using Catch::Matchers::Contains;

namespace {

std::string temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("remat_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

// Trains gpt tiny for `steps` with a `warmup` into `dir`: a finished run to resume.
void train_tiny_run(const std::string& dir, int64_t steps, int64_t warmup) {
  TrainOptions o;
  o.config = "tiny";
  o.steps = steps;
  o.warmup = warmup;
  o.out = dir;
  train(o);
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_CASE("gpt tiny's loss at initialisation is about ln(vocab)", "[gpt]") {
  manual_seed(0);
  Gpt model(gpt_config("tiny"));
  AdditionTask data(64, 1);
  auto [x, y] = data.batch(2, 16);
  double loss = model.loss(x, y).item();
  CHECK(std::abs(loss - std::log(64.0)) < 0.05);
  CHECK(model.named_parameters().size() == 2 + 2 * 12 + 2);  // wte, wpe; 12 per block; ln_f
}

TEST_CASE("the addition task has the structure its reference loss assumes", "[gpt][data]") {
  AdditionTask data(64, 5);
  auto [x, y] = data.batch(1, 40);
  std::string text = AdditionTask::decode(x);
  // Every complete problem in the window adds up.
  size_t pos = text.find(';');
  REQUIRE(pos != std::string::npos);
  std::string problem = text.substr(pos + 1, 13);
  int a = std::stoi(problem.substr(0, 3)), b = std::stoi(problem.substr(4, 3)), s = std::stoi(problem.substr(8, 4));
  CHECK(problem[3] == '+');
  CHECK(problem[7] == '=');
  CHECK(a + b == s);
  CHECK(AdditionTask::decode(y).substr(0, 39) == text.substr(1));
  CHECK(AdditionTask::reference_loss() == Approx(6 * std::log(10.0) / 13));
}

TEST_CASE("200 steps of gpt tiny learn the task's structure, not just its alphabet", "[gpt][train]") {
  TrainOptions o;
  o.config = "tiny";
  o.overrides["batch"] = 32;  // 512 tokens a step: enough signal in 200 steps
  o.steps = 200;
  o.lr = 3e-3;
  o.warmup = 10;
  TrainResult r = train(o);
  REQUIRE(r.steps.size() == 200);
  double first = r.steps.front().loss;
  double last10 = 0;
  for (size_t i = 190; i < 200; ++i) last10 += r.steps[i].loss / 10;
  INFO("first " << first << ", mean of the last 10 " << last10);
  CHECK(first > 4.0);
  // ln 64 = 4.16 is a uniform guess, ln 13 = 2.56 a uniform guess over the task's 13 symbols;
  // below 2.4 the model predicts the separators from position. The task floor is 1.06.
  CHECK(last10 < 2.4);
}

TEST_CASE("AdamW matches the reference update on a hand-computed example", "[optim]") {
  MemoryCategoryScope params(MemoryCategory::parameter);
  Tensor w = Tensor::from_vector<double>({1.0, -2.0}, {1, 2}).set_requires_grad(true);
  Tensor b = Tensor::from_vector<double>({1.0}, {1}).set_requires_grad(true);
  AdamW opt({w, b}, {.beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01});
  w.set_grad(Tensor::from_vector<double>({0.5, 0.5}, {1, 2}));
  b.set_grad(Tensor::from_vector<double>({0.5}, {1}));
  opt.step(0.1);
  // Step 1 by hand: m = 0.05, v = 0.00025, m_hat = 0.5, v_hat = 0.25;
  // w = 1 - 0.1 * 0.01 * 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.999 - 0.099999998 = 0.899000002.
  CHECK(w.to_vector<double>()[0] == Approx(0.899000002).epsilon(1e-12));
  CHECK(b.to_vector<double>()[0] == Approx(0.900000002).epsilon(1e-12));  // 1-D: no weight decay
  // Step 2 against an independent implementation of the same formulas.
  w.set_grad(Tensor::from_vector<double>({-0.25, 0.125}, {1, 2}));
  opt.step(0.1);
  auto reference = [](double p, std::vector<double> grads) {
    double m = 0, v = 0;
    for (size_t t = 1; t <= grads.size(); ++t) {
      double g = grads[t - 1];
      m = 0.9 * m + 0.1 * g;
      v = 0.999 * v + 0.001 * g * g;
      double m_hat = m / (1 - std::pow(0.9, t)), v_hat = v / (1 - std::pow(0.999, t));
      p = p - 0.1 * 0.01 * p - 0.1 * m_hat / (std::sqrt(v_hat) + 1e-8);
    }
    return p;
  };
  CHECK(w.to_vector<double>()[0] == Approx(reference(1.0, {0.5, -0.25})).epsilon(1e-12));
  CHECK(w.to_vector<double>()[1] == Approx(reference(-2.0, {0.5, 0.125})).epsilon(1e-12));
}

TEST_CASE("SGD with momentum, clipping by global norm and the cosine schedule", "[optim]") {
  Tensor p = Tensor::from_vector<double>({1.0, 1.0}, {2}).set_requires_grad(true);
  Sgd sgd({p}, 0.9);
  p.set_grad(Tensor::from_vector<double>({1.0, 2.0}, {2}));
  sgd.step(0.1);
  sgd.step(0.1);  // v = 1.9 g after two steps
  CHECK(p.to_vector<double>()[0] == Approx(1.0 - 0.1 * 1.0 - 0.1 * 1.9));
  p.set_grad(Tensor::from_vector<double>({3.0, 4.0}, {2}));
  CHECK(clip_grad_norm({p}, 1.0) == Approx(5.0));
  CHECK(p.grad().to_vector<double>()[0] == Approx(0.6).epsilon(1e-6));
  // Clipping's terms: each gradient's f64 sum of squares, 0 without one, in order, any dtype.
  Tensor f = Tensor::from_vector<float>({0.5f, -1.5f, 2.0f}, {3});
  std::vector<double> sums = sum_squares_by_device({Tensor::from_vector<double>({3.0, 4.0}, {2}), Tensor(), f});
  REQUIRE(sums.size() == 3);
  CHECK(sums[0] == 25.0);
  CHECK(sums[1] == 0.0);
  CHECK(sums[2] == 0.25 + 2.25 + 4.0);
  CHECK(sum_squares_by_device({}).empty());
  // A large gradient's sum in pieces of 16384 elements, each in 16 lanes folded pairwise, the pieces
  // in order: the same bits alone or beside others, on one thread or two.
  manual_seed(6);
  Tensor big = Tensor::randn({40000}), small = Tensor::randn({33});
  std::vector<float> v = big.to_vector<float>();
  double want = 0.0;
  for (size_t begin = 0; begin < v.size(); begin += 16384) {
    double lanes[16] = {};
    for (size_t i = begin; i < std::min(v.size(), begin + 16384); ++i)
      lanes[(i - begin) % 16] = std::fma(double(v[i]), double(v[i]), lanes[(i - begin) % 16]);
    for (int w = 8; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    want += lanes[0];
  }
  CHECK(sum_squares_by_device({big})[0] == want);
  CHECK(sum_squares_by_device({small, big, small})[1] == want);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const double one_thread = sum_squares_by_device({big, small})[0];
  omp_set_num_threads(threads);
  CHECK(one_thread == want);
  // clip_grad_norm_ (the norm left unread, as a tensor) gives clip_grad_norm's bits, clipping or not.
  manual_seed(5);
  for (double max_norm : {0.5, 1e3}) {
    std::vector<Tensor> a, b;
    for (Shape shape : {Shape{7, 3}, Shape{0}, Shape{100}}) {
      Tensor g = Tensor::randn(shape);
      a.push_back(Tensor::zeros(shape).set_requires_grad(true));
      b.push_back(Tensor::zeros(shape).set_requires_grad(true));
      a.back().set_grad(g.clone());
      b.back().set_grad(g.clone());
    }
    a.push_back(Tensor::zeros({2}).set_requires_grad(true));  // no gradient
    b.push_back(Tensor::zeros({2}).set_requires_grad(true));
    double norm = clip_grad_norm(a, max_norm);
    Tensor lazy = clip_grad_norm_(b, max_norm);
    CHECK(lazy.dim() == 0);
    CHECK(lazy.dtype() == DType::f64);
    CHECK(lazy.item() == norm);
    for (size_t i = 0; i + 1 < a.size(); ++i) CHECK(a[i].grad().to_vector<float>() == b[i].grad().to_vector<float>());
    CHECK(!b.back().grad().defined());
    if (max_norm < 1) CHECK(norm > max_norm);  // the clipping case clips
  }
  CHECK(cosine_lr(0, 10, 100, 1.0, 0.1) == Approx(0.1));
  CHECK(cosine_lr(9, 10, 100, 1.0, 0.1) == Approx(1.0));
  CHECK(cosine_lr(55, 10, 100, 1.0, 0.1) == Approx(0.55));
  CHECK(cosine_lr(100, 10, 100, 1.0, 0.1) == Approx(0.1));
}

TEST_CASE("resuming after k steps gives bitwise the same weights as an uninterrupted run", "[gpt][train][resume]") {
  std::string a = temp_dir("uninterrupted"), b = temp_dir("interrupted");
  TrainOptions o;
  o.config = "tiny";
  o.steps = 30;
  o.policy = "full";
  o.out = a;
  train(o);
  o.out = b;
  o.stop_at = 12;
  train(o);
  TrainOptions resume;
  resume.resume = b;
  resume.steps = 30;
  TrainResult r = train(resume);
  CHECK(r.steps.front().step == 13);
  auto wa = load_safetensors(a + "/model.safetensors"), wb = load_safetensors(b + "/model.safetensors");
  REQUIRE(wa.tensors.size() == wb.tensors.size());
  for (size_t i = 0; i < wa.tensors.size(); ++i) {
    INFO(wa.tensors[i].first);
    const Tensor &ta = wa.tensors[i].second, &tb = wb.tensors[i].second;
    CHECK(std::memcmp(ta.raw_data(), tb.raw_data(), ta.nbytes()) == 0);
  }
  // The metrics of the resumed run continue the interrupted file: 30 lines, same as uninterrupted.
  CHECK(read_bytes(a + "/metrics.jsonl").size() > 0);
  auto lines = [](const std::string& s) { return std::count(s.begin(), s.end(), '\n'); };
  CHECK(lines(read_bytes(b + "/metrics.jsonl")) == 30);
  std::filesystem::remove_all(a);
  std::filesystem::remove_all(b);
}

TEST_CASE("micro-batches: one pass's losses within rounding, the same bits every run and under checkpointing, "
          "a smaller activation peak, resume bit for bit",
          "[gpt][train][micro-batches]") {
  std::string dirs = temp_dir("micro");
  auto run = [&](const std::string& model, int64_t micro, const std::string& policy, const std::string& name) {
    TrainOptions o;
    o.model = model;
    o.config = "tiny";
    o.overrides = {{"batch", 4.0}};
    if (model == "gpt") o.overrides["dropout"] = 0.1;  // masks drawn per sample, whichever micro-batch
    o.steps = 10, o.warmup = 2, o.seed = 3, o.policy = policy;
    o.micro_batches = micro;
    o.out = dirs + "/" + name;
    return train(o);
  };
  auto weights = [&](const std::string& name) {
    std::vector<std::vector<float>> out;
    for (auto& [key, t] : load_safetensors(dirs + "/" + name + "/model.safetensors").tensors) out.push_back(t.to_vector<float>());
    return out;
  };
  TrainResult one = run("gpt", 1, "none", "one"), two = run("gpt", 2, "none", "two"), again = run("gpt", 2, "none", "again");
  reset_checkpoint_counters();
  TrainResult full = run("gpt", 2, "full", "full");
  CHECK(checkpoint_counters().replays > 0);
  CHECK(checkpoint_counters().bytes_dropped > 0);
  REQUIRE(two.steps.size() == 10);
  for (size_t i = 0; i < two.steps.size(); ++i) {
    INFO("step " << i + 1);
    // The same data and masks as one pass over the 4 rows: only the order of the f32 sums differs
    // (two means of 2 rows, halved and added, against one mean of 4).
    CHECK(std::abs(two.steps[i].loss - one.steps[i].loss) < 1e-5);
    CHECK(again.steps[i].loss == two.steps[i].loss);
    CHECK(full.steps[i].loss == two.steps[i].loss);
  }
  CHECK(weights("again") == weights("two"));
  CHECK(weights("full") == weights("two"));
  CHECK(weights("one") != weights("two"));  // not one pass under another name
  CHECK(two.activation_peak_bytes < one.activation_peak_bytes * 3 / 4);
  // Stopped at step 4 and resumed without --micro-batches: the run's own 2, bit for bit.
  TrainOptions stopped;
  stopped.config = "tiny";
  stopped.overrides = {{"batch", 4.0}, {"dropout", 0.1}};
  stopped.steps = 10, stopped.warmup = 2, stopped.seed = 3, stopped.micro_batches = 2, stopped.stop_at = 4;
  stopped.out = dirs + "/resumed";
  train(stopped);
  TrainOptions resume;
  resume.resume = dirs + "/resumed";
  TrainResult rest = train(resume);
  CHECK(rest.steps.front().step == 5);
  CHECK(rest.final_loss == two.final_loss);
  CHECK(weights("resumed") == weights("two"));
  // dit: the noise and flow times of the whole batch, each micro-batch its rows of them.
  TrainResult dit_one = run("dit", 1, "none", "dit_one"), dit_two = run("dit", 2, "none", "dit_two");
  for (size_t i = 0; i < dit_two.steps.size(); ++i) CHECK(std::abs(dit_two.steps[i].loss - dit_one.steps[i].loss) < 1e-5);
  CHECK_THROWS_WITH(run("gpt", 3, "none", "three"), Contains("divides the batch of 4 rows, got 3"));
  CHECK_THROWS_WITH(run("gpt", 0, "none", "zero"), Contains("divides the batch of 4 rows, got 0"));
  std::filesystem::remove_all(dirs);
}

TEST_CASE("the weight average follows d * average + (1 - d) * weights with a ramped-up decay", "[train][ema]") {
  Tensor p = Tensor::from_vector<double>({1.0, -2.0, 4.0}, {3});
  WeightAverage avg({p}, 0.5);
  CHECK(avg.averages()[0].to_vector<double>() == p.to_vector<double>());  // starts as a copy
  std::vector<double> expected = p.to_vector<double>();
  for (int n = 0; n < 12; ++n) {
    double d = std::min(0.5, (1.0 + n) / (10.0 + n));  // 0.1, 0.18, ... then capped at 0.5
    CHECK(avg.current_decay() == Approx(d));
    p.copy_(Tensor::from_vector<double>({1.0 + n, -2.0 * n, 0.5 * n}, {3}));
    std::vector<double> now = p.to_vector<double>();
    for (size_t i = 0; i < 3; ++i) expected[i] = d * expected[i] + (1 - d) * now[i];
    avg.update();
    auto got = avg.averages()[0].to_vector<double>();
    for (size_t i = 0; i < 3; ++i) CHECK(got[i] == Approx(expected[i]).epsilon(1e-14));
  }
  CHECK(avg.updates() == 12);
  CHECK_THROWS_WITH(WeightAverage({p}, 1.0), Contains("expected a decay in (0, 1), got 1"));
}

TEST_CASE("with --ema, model.safetensors holds the average and resume continues it bit for bit", "[gpt][train][ema][resume]") {
  std::string a = temp_dir("ema_uninterrupted"), b = temp_dir("ema_interrupted");
  TrainOptions o;
  o.config = "tiny";
  o.steps = 16;
  o.ema = 0.9;
  o.out = a;
  train(o);
  o.out = b;
  o.stop_at = 7;
  train(o);
  TrainOptions resume;
  resume.resume = b;  // steps and ema come from the run
  TrainResult r = train(resume);
  CHECK(r.steps.size() == 9);
  CHECK(r.schedule_note.empty());
  auto wa = load_safetensors(a + "/model.safetensors"), wb = load_safetensors(b + "/model.safetensors");
  auto state = load_safetensors(a + "/state.safetensors");
  CHECK_THAT(wa.metadata.at("weights"), Contains("moving average, decay 0.9, 16 updates"));
  REQUIRE(wa.tensors.size() == wb.tensors.size());
  bool any_differs_from_raw = false;
  for (size_t i = 0; i < wa.tensors.size(); ++i) {
    INFO(wa.tensors[i].first);
    const Tensor &ta = wa.tensors[i].second, &tb = wb.tensors[i].second;
    CHECK(std::memcmp(ta.raw_data(), tb.raw_data(), ta.nbytes()) == 0);
    const Tensor& ema = state.at("ema." + wa.tensors[i].first);
    const Tensor& raw = state.at("param." + wa.tensors[i].first);
    CHECK(std::memcmp(ta.raw_data(), ema.raw_data(), ta.nbytes()) == 0);
    any_differs_from_raw |= std::memcmp(ta.raw_data(), raw.raw_data(), ta.nbytes()) != 0;
  }
  CHECK(any_differs_from_raw);  // the file holds the average, not the last weights
  std::filesystem::remove_all(a);
  std::filesystem::remove_all(b);
}

TEST_CASE("resume keeps the run's schedule unless told otherwise; a longer --steps extends it", "[gpt][train][resume]") {
  std::string dir = temp_dir("extend");
  train_tiny_run(dir, 10, 2);
  TrainOptions again;
  again.resume = dir;
  CHECK(train(again).steps.empty());  // the run's own 10 steps are done
  TrainOptions extend;
  extend.resume = dir;
  extend.steps = 20;
  extend.lr = 5e-4;
  std::string told;
  TrainResult r = train(extend, {}, [&](const std::string& note) { told = note; });
  REQUIRE(r.steps.size() == 10);
  CHECK(r.steps.front().step == 11);
  CHECK(r.steps.front().lr == Approx(cosine_lr(10, 2, 20, 5e-4, 1e-4)));
  CHECK(r.schedule_note == "steps 10 -> 20, lr 0.001 -> 0.0005");
  CHECK(told == "schedule changed from step 10: steps 10 -> 20, lr 0.001 -> 0.0005");
  CHECK(train(again).steps.empty());  // the state now records the 20-step schedule
  TrainOptions bad;
  bad.resume = dir;
  bad.ema = 1.5;
  CHECK_THROWS_WITH(train(bad), Contains("expected --ema 0 (off) or a decay in (0, 1), got 1.5"));
  bad.ema = 0.0, bad.min_lr = 1.0;
  CHECK_THROWS_WITH(train(bad), Contains("expected 0 <= --min-lr <= --lr"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("resume --restart starts warmup and cosine again at the resumed step, and keeps them", "[gpt][train][resume]") {
  std::string dir = temp_dir("restart");
  train_tiny_run(dir, 6, 2);
  TrainOptions restart;
  restart.resume = dir;
  restart.restart = true;
  restart.steps = 16;
  restart.lr = 5e-4;
  restart.min_lr = 1e-5;
  restart.stop_at = 10;
  std::string told;
  TrainResult r = train(restart, {}, [&](const std::string& note) { told = note; });
  REQUIRE(r.steps.size() == 4);
  // Step 7 is the first of the new schedule: warmup from 6, then the cosine over steps 6..16.
  CHECK(r.steps[0].lr == Approx(5e-4 / 2));
  CHECK(r.steps[1].lr == Approx(5e-4));
  CHECK(r.steps[3].lr == Approx(cosine_lr(3, 2, 10, 5e-4, 1e-5)));
  CHECK(told == "schedule changed from step 6: steps 6 -> 16, lr 0.001 -> 0.0005, min_lr 0.0001 -> 1e-05, "
                "restarted at step 6");
  // Resumed again without --restart: the restarted schedule is the run's own now.
  TrainOptions again;
  again.resume = dir;
  TrainResult rest = train(again, {}, [&](const std::string& note) { told = "unexpected: " + note; });
  REQUIRE(rest.steps.size() == 6);
  CHECK(rest.steps.front().lr == Approx(cosine_lr(4, 2, 10, 5e-4, 1e-5)));
  CHECK(rest.steps.back().lr == Approx(cosine_lr(9, 2, 10, 5e-4, 1e-5)));
  CHECK(told.find("unexpected") == std::string::npos);
  TrainOptions bad;
  bad.resume = dir;
  bad.restart = true;
  CHECK_THROWS_WITH(train(bad), Contains("--restart at step 16: expected --steps beyond it, got 16"));
  TrainOptions fresh;
  fresh.config = "tiny";
  fresh.restart = true;
  CHECK_THROWS_WITH(train(fresh), Contains("--restart starts the schedule again at a resumed step; it needs --resume"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("safetensors written by remat parse back byte for byte; damaged files fail clearly", "[safetensors]") {
  std::string dir = temp_dir("safetensors");
  std::string path = dir + "/t.safetensors";
  Tensor a = Tensor::arange(6, DType::f32), b = Tensor::from_vector<int64_t>({7, -8}, {2, 1});
  save_safetensors(path, {{"a", a}, {"b", b}}, {{"note", "hello"}});
  SafetensorsFile f = load_safetensors(path);
  REQUIRE(f.tensors.size() == 2);
  CHECK(f.tensors[0].first == "a");
  CHECK(f.at("a").to_vector<float>() == a.to_vector<float>());
  CHECK(f.at("b").to_vector<int64_t>() == std::vector<int64_t>{7, -8});
  CHECK(f.at("b").shape() == Shape{2, 1});
  CHECK(f.metadata.at("note") == "hello");
  CHECK_THROWS_WITH(f.at("c"), Contains("no tensor named 'c'"));
  CHECK_FALSE(std::filesystem::exists(path + ".tmp"));  // written through a temporary, then renamed

  std::string bytes = read_bytes(path);
  std::ofstream(dir + "/truncated.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() - 5);
  CHECK_THROWS_WITH(load_safetensors(dir + "/truncated.safetensors"), Contains("truncated"));
  std::ofstream(dir + "/short.safetensors", std::ios::binary) << bytes.substr(0, 4);
  CHECK_THROWS_WITH(load_safetensors(dir + "/short.safetensors"), Contains("not a safetensors file"));
  std::string garbled = bytes;
  garbled[8] = '#';  // the header's opening brace
  std::ofstream(dir + "/garbled.safetensors", std::ios::binary) << garbled;
  CHECK_THROWS_WITH(load_safetensors(dir + "/garbled.safetensors"), Contains("corrupted header"));
  CHECK_THROWS_WITH(load_safetensors(dir + "/missing.safetensors"), Contains("cannot open"));
  std::filesystem::remove_all(dir);
}
