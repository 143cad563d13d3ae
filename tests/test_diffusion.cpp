// The diffusion reference models: exact gradients under every applicable policy, placement over
// both DiT containers, patchify, the shape data, and a short overfit.
#include <catch.hpp>

#include "models/dit.h"
#include "models/images.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "models/sample.h"
#include "models/tasks.h"
#include "models/unet.h"
#include "models_for_tests.h"

using namespace remat;
using namespace remat::testing;

namespace {

DitConfig tiny_dit() {
  DitConfig c = dit_config("tiny");
  c.ada_zero = false;  // non-zero gates, so every block's parameters get a gradient to compare
  return c;
}

template <typename Model>
std::function<Tensor()> flow_loss(Model& model, const Tensor& x0, const Tensor& labels) {
  return [&model, x0, labels] {
    set_rng_state({99, 0});  // the same noise and times every call
    return rectified_flow_loss([&](const Tensor& x, const Tensor& t, const Tensor& y) { return model.forward(x, t, y); },
                               x0, labels);
  };
}

// The budget planner at each percentage: its plan fits, one step's measured activation peak stays
// within the budget, checkpointing happened, and the gradients are `plain`'s bit for bit.
void check_budgets(Module& model, const std::function<Tensor()>& loss, const std::vector<std::vector<char>>& plain,
                   const std::vector<double>& percents) {
  for (double percent : percents) {
    BudgetPlanner planner(model, 0, percent);
    const BudgetPlan& plan = planner.plan(loss);
    INFO(percent << "%: " << plan.to_string());
    CHECK(plan.floor_bytes < plan.budget_bytes);
    CHECK(plan.predicted_peak_bytes <= plan.budget_bytes);
    for (Tensor& p : model.parameters()) p.zero_grad();
    reset_peak_memory();
    reset_checkpoint_counters();
    int64_t base = memory_stats()[MemoryCategory::activation].current;
    backward(loss());
    CHECK(memory_stats()[MemoryCategory::activation].peak - base <= plan.budget_bytes);
    CHECK(checkpoint_counters().replays > 0);
    CHECK(run_grads(model.parameters(), loss) == plain);
  }
}

}  // namespace

TEST_CASE("dit tiny gradients under full, ops, block_skip:2, levels and budgets are bitwise equal to none", "[diffusion][dit]") {
  manual_seed(51);
  Dit model(tiny_dit());
  ShapesTask data(8, 3);
  auto [x0, labels] = data.batch(3);
  auto loss = flow_loss(model, x0, labels);
  auto plain = run_grads(model.parameters(), loss);
  for (const auto& g : plain) CHECK_FALSE(g.empty());
  for (const char* policy : {"full", "ops", "block_skip:2", "level:3", "level:5", "sqrt", "revolve:1"}) {
    apply_policy(model, parse_policy(policy));
    reset_checkpoint_counters();
    INFO(policy);
    CHECK(run_grads(model.parameters(), loss) == plain);
    CHECK(checkpoint_counters().replays > 0);
  }
  // The planner on two streams: joint attention's working set is most of a block's memory, and the
  // measured peak stays within the budget (the simulation counts it).
  check_budgets(model, loss, plain, {80.0, 60.0, 45.0});
  remove_checkpointing(model);
}

TEST_CASE("block_skip on dit places regions in both double_blocks and single_blocks", "[diffusion][dit][policy]") {
  manual_seed(52);
  DitConfig c = tiny_dit();
  c.double_blocks = 3;
  c.single_blocks = 4;
  Dit model(c);
  CHECK(apply_activation_checkpointing(model, "block_skip", 2) == 2 + 2);
  auto placed = [](const nn::ModuleList& list) {
    std::vector<bool> out;
    for (auto& [name, child] : list.children()) out.push_back(is_checkpointed(*child));
    return out;
  };
  CHECK(placed(*model.double_blocks) == std::vector<bool>{true, false, true});
  CHECK(placed(*model.single_blocks) == std::vector<bool>{true, false, true, false});
}

TEST_CASE("unet tiny gradients under level:1..5 are bitwise equal to none; levels nest", "[diffusion][unet]") {
  manual_seed(53);
  Unet model(unet_config("tiny"));
  ShapesTask data(8, 4);
  auto [x0, labels] = data.batch(2);
  auto loss = flow_loss(model, x0, labels);
  auto plain = run_grads(model.parameters(), loss);
  for (int level = 1; level <= 5; ++level) {
    set_checkpoint_level(model, level);
    reset_checkpoint_counters();
    INFO("level " << level);
    CHECK(run_grads(model.parameters(), loss) == plain);
    CHECK(checkpoint_counters().replays > 0);
  }
  set_checkpoint_level(model, 5);
  Tensor l = loss();
  const auto& regions = RegionManager::of(*static_cast<Graph*>(l.autograd_meta_ptr()->graph.get())).regions();
  int deepest = 0;
  for (const auto& r : regions) deepest = std::max(deepest, r.depth);
  CHECK(deepest == 4);  // network > path > level > block > conv unit
  model.eval();
  reset_checkpoint_counters();
  flow_loss(model, x0, labels)();
  CHECK(checkpoint_counters().ops_forward == 0);  // levels apply in training mode only
}

TEST_CASE("unet's resolutions are blocks: full, block_skip, chain schedules and budgets keep gradients exact",
          "[diffusion][unet][policy]") {
  manual_seed(54);
  Unet model(unet_config("tiny"));
  ShapesTask data(8, 5);
  auto [x0, labels] = data.batch(2);
  auto loss = flow_loss(model, x0, labels);
  auto plain = run_grads(model.parameters(), loss);
  CHECK(apply_activation_checkpointing(model, "full") == 4);  // two resolutions down, two up
  for (const char* policy : {"full", "block_skip:2", "sqrt", "revolve:1"}) {
    apply_policy(model, parse_policy(policy));
    reset_checkpoint_counters();
    INFO(policy);
    CHECK(run_grads(model.parameters(), loss) == plain);
    CHECK(checkpoint_counters().replays > 0);
    CHECK(checkpoint_counters().bytes_dropped > 0);
  }
  check_budgets(model, loss, plain, {80.0, 60.0});  // the floor is 55% here
  remove_checkpointing(model);
}

TEST_CASE("patchify and unpatchify are inverse; the shape data is well formed", "[diffusion]") {
  Tensor img = Tensor::arange(2 * 3 * 4 * 4).to(DType::f32);
  img = Tensor::from_vector(img.to_vector<float>(), {2, 3, 4, 4});
  Tensor tokens = patchify(img, 2);
  CHECK(tokens.shape() == Shape{2, 4, 12});
  CHECK(contiguous(unpatchify(tokens, 2, 3, 4)).to_vector<float>() == img.to_vector<float>());
  // Token 1 of image 0 is the top-right 2x2 patch: channel 0 pixels (0,2),(0,3),(1,2),(1,3).
  auto t = contiguous(tokens).to_vector<float>();
  CHECK(t[12 + 0] == 2);
  CHECK(t[12 + 3] == 7);
  ShapesTask data(16, 7);
  auto [x, y] = data.batch(32);
  auto px = x.to_vector<float>();
  CHECK(*std::min_element(px.begin(), px.end()) >= -1.0f);
  CHECK(*std::max_element(px.begin(), px.end()) <= 1.0f);
  std::vector<int> seen(ShapesTask::kClasses, 0);
  for (int64_t label : y.to_vector<int64_t>()) seen.at(label)++;
  for (int n : seen) CHECK(n > 0);
}

TEST_CASE("a few AdamW steps on one batch lower the rectified-flow loss of dit and unet", "[diffusion][train]") {
  manual_seed(54);
  Dit dit(dit_config("tiny"));
  Unet unet(unet_config("tiny"));
  ShapesTask data(8, 5);
  auto [x0, labels] = data.batch(4);
  auto fit = [&](Module& model, const std::function<Tensor()>& loss) {
    AdamW opt(model.parameters(), {.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.0});
    double first = 0, last = 0;
    for (int step = 0; step < 30; ++step) {
      Tensor l = loss();
      (step == 0 ? first : last) = l.item();
      backward(l);
      opt.step(3e-3);
      opt.zero_grad();
    }
    INFO(model.type_name() << ": first " << first << ", last " << last);
    CHECK(last < 0.8 * first);
  };
  fit(dit, flow_loss(dit, x0, labels));
  fit(unet, flow_loss(unet, x0, labels));
}

#include <filesystem>
#include <fstream>

#include "models/train.h"

TEST_CASE("remat train --model dit then sampling writes a PNG grid of the requested size", "[diffusion][sample]") {
  auto dir = std::filesystem::temp_directory_path() / ("remat_sample_" + std::to_string(::getpid()));
  for (const char* model : {"dit", "unet"}) {
    TrainOptions o;
    o.model = model;
    o.config = "tiny";
    o.steps = 3;
    o.policy = std::string(model) == "dit" ? "block_skip:2" : "level:2";
    o.out = dir.string();
    o.overwrite = true;  // the unet run replaces the dit run in the same folder
    TrainResult r = train(o);
    REQUIRE(r.steps.size() == 3);
    SampleOptions s;
    s.weights = (dir / "model.safetensors").string();
    s.out = (dir / "grid.png").string();
    s.n = 5;
    s.steps = 3;
    Tensor images = sample_images(s);
    CHECK(images.shape() == Shape{5, 3, 8, 8});
    for (float v : images.to_vector<float>()) CHECK(std::isfinite(v));
    std::ifstream png(s.out, std::ios::binary);
    char signature[8] = {};
    png.read(signature, 8);
    CHECK(std::memcmp(signature, "\x89PNG\r\n\x1a\n", 8) == 0);
    // 3 columns of 8-pixel images with 2-pixel gaps: 3 * 10 + 2 = 32 wide, 2 * 10 + 2 = 22 high.
    png.seekg(16);
    unsigned char ihdr[8];
    png.read(reinterpret_cast<char*>(ihdr), 8);
    CHECK((ihdr[0] << 24 | ihdr[1] << 16 | ihdr[2] << 8 | ihdr[3]) == 32);
    CHECK((ihdr[4] << 24 | ihdr[5] << 16 | ihdr[6] << 8 | ihdr[7]) == 22);
  }
  std::filesystem::remove_all(dir);
  CHECK_THROWS_WITH(write_png_grid("/tmp/x.png", Tensor::zeros({2, 4, 4}), 1),
                    Catch::Matchers::Contains("expected images [N, 3, S, S]"));
}

TEST_CASE("class_embedding: the no-label label embeds as zeros and sends no gradient to any row", "[diffusion]") {
  manual_seed(3);
  nn::Embedding table(4, 6);
  Tensor labels = Tensor::from_vector(std::vector<int64_t>{0, 4, 2, 4}, {4});
  Tensor rows = class_embedding(table, labels, 4);
  REQUIRE(rows.shape() == Shape{4, 6});
  auto r = rows.to_vector<float>(), w = table.weight.to_vector<float>();
  for (int c = 0; c < 6; ++c) {
    CHECK(r[0 * 6 + c] == w[0 * 6 + c]);
    CHECK(r[1 * 6 + c] == 0.0f);
    CHECK(r[2 * 6 + c] == w[2 * 6 + c]);
    CHECK(r[3 * 6 + c] == 0.0f);
  }
  backward(sum(rows));
  auto g = table.weight.grad().to_vector<float>();
  for (int c = 0; c < 6; ++c) {
    CHECK(g[0 * 6 + c] == 1.0f);  // only image 0's label: the dropped labels looked up row 0 but count zero
    CHECK(g[1 * 6 + c] == 0.0f);
    CHECK(g[2 * 6 + c] == 1.0f);
  }
  // Without a dropped label it is the plain embedding.
  Tensor plain = Tensor::from_vector(std::vector<int64_t>{3, 1}, {2});
  CHECK(class_embedding(table, plain, 4).to_vector<float>() == embedding(plain, table.weight).to_vector<float>());
  CHECK_THROWS_WITH(class_embedding(table, Tensor::from_vector(std::vector<int64_t>{5}, {1}), 4),
                    Catch::Matchers::Contains("expected labels in [0, 4]"));
  CHECK_THROWS_WITH(class_embedding(table, Tensor::from_vector(std::vector<int64_t>{-1}, {1}), 4),
                    Catch::Matchers::Contains("got -1"));
}

TEST_CASE("label dropout replaces labels by the no-label label at its rate; 0 keeps the data stream", "[diffusion]") {
  ShapesTask a(8, 11), b(8, 11);
  auto [xa, ya] = a.batch(16);
  auto [xb, yb] = b.batch(16, 0.0);
  CHECK(xa.to_vector<float>() == xb.to_vector<float>());
  CHECK(ya.to_vector<int64_t>() == yb.to_vector<int64_t>());
  ShapesTask c(8, 12);
  auto [x, y] = c.batch(800, 0.25);
  int dropped = 0;
  for (int64_t label : y.to_vector<int64_t>()) dropped += label == ShapesTask::kNoLabel;
  INFO(dropped << " of 800 dropped");
  CHECK(dropped > 150);  // 200 expected; a binomial sd of 12
  CHECK(dropped < 250);
  CHECK_THROWS_WITH(c.batch(2, 1.0), Catch::Matchers::Contains("expected a label dropout in [0, 1)"));
}

TEST_CASE("sample --guidance: v_u + g (v_c - v_u), only for weights trained with --label-dropout", "[diffusion][sample]") {
  auto dir = std::filesystem::temp_directory_path() / ("remat_guidance_" + std::to_string(::getpid()));
  TrainOptions o;
  o.model = "dit";
  o.config = "tiny";
  o.steps = 8;
  o.lr = 3e-3;
  o.out = dir.string();
  train(o);
  SampleOptions s;
  s.weights = (dir / "model.safetensors").string();
  s.out = (dir / "grid.png").string();
  s.n = 4;
  s.steps = 1;  // one Euler step: the image is the noise minus the guided velocity, affine in the scale
  s.guidance = 2.0;
  CHECK_THROWS_WITH(sample_images(s), Catch::Matchers::Contains("needs weights trained with --label-dropout"));

  o.resume = dir.string();
  o.steps = 16;
  o.label_dropout = 0.5;
  TrainResult r = train(o);
  CHECK(r.schedule_note.find("label_dropout 0 -> 0.5") != std::string::npos);
  std::vector<std::vector<float>> images;
  for (double g : {0.0, 1.0, 2.0}) {
    s.guidance = g;
    images.push_back(sample_images(s).to_vector<float>());
  }
  double curvature = 0, spread = 0;
  for (size_t i = 0; i < images[0].size(); ++i) {
    curvature = std::max(curvature, std::abs(double(images[2][i]) - 2.0 * images[1][i] + images[0][i]));
    spread = std::max(spread, std::abs(double(images[2][i]) - images[0][i]));
  }
  INFO("curvature " << curvature << ", spread " << spread);
  CHECK(spread > 1e-5);             // the label changes the velocity
  CHECK(curvature < 1e-3 * spread);  // and the guided velocity is affine in the scale
  s.guidance = -1;
  CHECK_THROWS_WITH(sample_images(s), Catch::Matchers::Contains("expected --guidance >= 0"));
  std::filesystem::remove_all(dir);

  TrainOptions gpt;
  gpt.config = "tiny";
  gpt.steps = 1;
  gpt.label_dropout = 0.1;
  CHECK_THROWS_WITH(train(gpt), Catch::Matchers::Contains("this model has no class labels"));
}

TEST_CASE("time sampling: logit-normal draws t = sigmoid(N(0, 1)), uniform U(0, 1); train records it", "[diffusion]") {
  Tensor x0 = Tensor::zeros({4000, 3, 2, 2}), labels = Tensor::zeros({4000}, DType::i64);
  auto times_of = [&](TimeSampling sampling) {
    std::vector<float> times;
    auto record = [&](const Tensor& x, const Tensor& t, const Tensor&) {
      times = t.to_vector<float>();
      return x;
    };
    set_rng_state({5, 0});
    rectified_flow_loss(record, x0, labels, sampling);
    return times;
  };
  auto middle_share = [](const std::vector<float>& times) {  // the share of t in [0.25, 0.75]
    int inside = 0;
    for (float t : times) {
      REQUIRE(t > 0.0f);
      REQUIRE(t < 1.0f);
      inside += t >= 0.25f && t <= 0.75f;
    }
    return inside / static_cast<double>(times.size());
  };
  // Expected: 0.5 uniform; P(|z| <= logit(0.75) = 1.0986) = 0.7275 logit-normal. Binomial sd < 0.008.
  CHECK(middle_share(times_of(TimeSampling::uniform)) == Approx(0.5).margin(0.03));
  CHECK(middle_share(times_of(TimeSampling::logit_normal)) == Approx(0.7275).margin(0.03));
  CHECK(parse_time_sampling("logit-normal") == TimeSampling::logit_normal);
  CHECK_THROWS_WITH(parse_time_sampling("lognorm"), Catch::Matchers::Contains("expected uniform or logit-normal"));

  auto dir = std::filesystem::temp_directory_path() / ("remat_times_" + std::to_string(::getpid()));
  TrainOptions o;
  o.model = "dit";
  o.config = "tiny";
  o.steps = 2;
  o.out = dir.string();
  o.time_sampling = "logit-normal";
  train(o);
  o = TrainOptions{};
  o.resume = dir.string();
  o.steps = 3;
  TrainResult kept = train(o);  // the run's own sampling unless told otherwise
  CHECK(kept.schedule_note.find("time_sampling") == std::string::npos);
  o.steps = 4;
  o.time_sampling = "uniform";
  TrainResult changed = train(o);
  CHECK(changed.schedule_note.find("time_sampling logit-normal -> uniform") != std::string::npos);
  std::filesystem::remove_all(dir);

  TrainOptions gpt;
  gpt.config = "tiny";
  gpt.steps = 1;
  gpt.time_sampling = "logit-normal";
  CHECK_THROWS_WITH(train(gpt), Catch::Matchers::Contains("not a diffusion model"));
}

TEST_CASE("flow_sampler_step: eta 0 is the Euler step; eta 1 keeps the marginals of an exact model", "[diffusion][sample]") {
  // Data concentrated at x0 = c: the exact velocity is v = (x_t - c) / t, and x_t = (1 - t) c + t z.
  const int64_t n = 20000;
  const double c = 0.7, t = 0.6, s = 0.35;
  manual_seed(3);
  Tensor z = Tensor::randn({n});
  Tensor x_t = add_scalar(mul_scalar(z, t), (1 - t) * c);
  Tensor v = mul_scalar(add_scalar(x_t, -c), 1.0 / t);
  auto euler = sub(x_t, mul_scalar(v, t - s)).to_vector<float>();
  auto step0 = flow_sampler_step(x_t, v, t, s, 0.0).to_vector<float>();
  CHECK(step0 == euler);
  for (double eta : {0.5, 1.0}) {
    // Whatever eta, x_s must again be (1 - s) c + s z' with z' ~ N(0, 1).
    auto x_s = flow_sampler_step(x_t, v, t, s, eta).to_vector<float>();
    double mean = 0, sq = 0;
    for (float x : x_s) {
      double zs = (x - (1 - s) * c) / s;
      mean += zs / n, sq += zs * zs / n;
    }
    INFO("eta " << eta << ": mean " << mean << ", var " << sq - mean * mean);
    CHECK(std::abs(mean) < 0.03);                         // sd of the mean 0.007
    CHECK(std::abs(sq - mean * mean - 1.0) < 0.04);        // sd of the variance 0.01
    CHECK(x_s != step0);                                   // fresh noise was added
  }
  // The last step lands on the predicted x0 whatever eta.
  auto last = flow_sampler_step(x_t, v, t, 0.0, 1.0).to_vector<float>();
  for (float x : last) REQUIRE(x == Approx(c).margin(1e-5));
  CHECK_THROWS_WITH(flow_sampler_step(x_t, v, t, s, 1.5), Catch::Matchers::Contains("expected --eta in [0, 1]"));
  CHECK_THROWS_WITH(flow_sampler_step(x_t, v, s, t, 1.0), Catch::Matchers::Contains("expected 0 <= s < t <= 1"));
}

TEST_CASE("flow_loss_by_time: the loss at bin centres on fixed images; zero velocity scores the same at every t", "[diffusion]") {
  // A freshly built dit has a zero output layer (adaLN-Zero), so it predicts zero velocity and its
  // loss at any t is mean((x1 - x0)^2) over the very images and noise flow_loss_by_time draws.
  auto dir = std::filesystem::temp_directory_path() / ("remat_flow_loss_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto task = make_task("dit", "tiny", {}, 0);
  std::string weights = (dir / "model.safetensors").string();
  save_safetensors(weights, task->model().named_parameters(),
                   {{"format", "remat"}, {"model", "dit"}, {"config", task->config().dump()}});
  const int64_t n = 6;
  const uint64_t seed = 9;
  auto rows = flow_loss_by_time(weights, n, 4, seed);
  ShapesTask data(task->image_size(), seed);
  Tensor x0 = data.batch(n).first;
  manual_seed(seed);
  Tensor diff = sub(Tensor::randn(x0.shape()), x0);
  double expected = mean(mul(diff, diff)).to_vector<float>()[0];
  REQUIRE(rows.size() == 4);
  for (size_t i = 0; i < rows.size(); ++i) {
    CHECK(rows[i].t == Approx((i + 0.5) / 4));
    CHECK(rows[i].loss == Approx(expected).epsilon(1e-5));
  }
  CHECK_THROWS_WITH(flow_loss_by_time(weights, 0), Catch::Matchers::Contains("expected --n >= 1"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("fit_shapes: training images are recognised as their label; others are not", "[diffusion][sample]") {
  ShapesTask data(32, 5);
  auto [images, label_tensor] = data.batch(64);
  std::vector<int64_t> labels = label_tensor.to_vector<int64_t>();
  std::vector<ShapeFit> fits = fit_shapes(images);
  double worst_own = 1, least_margin = 1;
  for (size_t i = 0; i < fits.size(); ++i) {
    INFO("image " << i << " of class " << labels[i]);
    CHECK(fits[i].best_class == labels[i]);
    worst_own = std::min(worst_own, fits[i].iou[labels[i]]);
    for (int c = 0; c < ShapesTask::kClasses; ++c)
      if (c != labels[i]) least_margin = std::min(least_margin, fits[i].iou[labels[i]] - fits[i].iou[c]);
  }
  // The search finds a drawn shape up to the pixel grid, and every other class's best outline is
  // clearly worse (the closest pair is disc and square: a square covers a disc at IoU 0.87 or so).
  UNSCOPED_INFO("own class IoU >= " << worst_own << ", ahead of any other class by >= " << least_margin);
  CHECK(worst_own >= 0.95);
  CHECK(least_margin >= 0.05);
  ShapeScore score = score_shapes(images, labels);
  CHECK(score.recognised == 64);
  CHECK(score.classified == 64);
  CHECK(score.mean_iou >= 0.9);
  // Every label moved to the next class: nothing is recognised.
  std::vector<int64_t> wrong = labels;
  for (int64_t& l : wrong) l = (l + 1) % ShapesTask::kClasses;
  ShapeScore wrong_score = score_shapes(images, wrong);
  CHECK(wrong_score.recognised == 0);
  CHECK(wrong_score.classified == 0);
  // Blank images and noise are not shapes.
  Tensor blank = Tensor::full({2, 3, 32, 32}, kBackground);
  CHECK(fit_shapes(blank)[0].best_class == -1);
  manual_seed(3);
  CHECK(score_shapes(Tensor::randn({4, 3, 32, 32}), {0, 1, 2, 3}).recognised == 0);
  CHECK_THROWS_WITH(score_shapes(images, {0, 1}), Catch::Matchers::Contains("expected 64 labels, got 2"));
}
