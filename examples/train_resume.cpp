// Example 3: a training loop of your own: gpt tiny with the memory-budget planner (half of the
// no-checkpointing activation peak), AdamW over named parameters, and a checkpoint of weights,
// optimizer state and random streams in safetensors files. A run interrupted and resumed from
// them ends with the same weights, bit for bit, as a run that was not interrupted.
#include <remat/remat.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

using namespace remat;

namespace {

GptConfig config() {
  GptConfig c = gpt_config("tiny");
  c.layers = 4;
  return c;
}

struct Run {
  Gpt model{config()};
  AdamW optimizer{model.named_parameters(), AdamWOptions{}};
  AdditionTask data{config().vocab, 11};
  std::unique_ptr<BudgetPlanner> planner;

  // Steps [from, to) of the schedule; the planner records the first step it sees and retimes its
  // ops from the second.
  void train(int from, int to) {
    model.train();
    for (int step = from; step < to; ++step) {
      auto [x, y] = data.batch(config().batch, config().seq_len);
      optimizer.zero_grad();
      Tensor loss;
      if (!planner) {
        planner = std::make_unique<BudgetPlanner>(model, 0, 50.0);
        planner->plan([&] { return loss = model.loss(x, y); });  // runs backward too
      } else {
        loss = model.loss(x, y);
        backward(loss);
        planner->retime(loss);  // once: the ops' times of a warm step, and the choice made again
      }
      clip_grad_norm(model.parameters(), 1.0);
      optimizer.step(cosine_lr(step, 5, 40, 3e-3, 3e-4));
      if (step % 10 == 0 || step == to - 1) std::printf("  step %2d  loss %.4f\n", step, loss.item());
    }
  }

  void save(const std::string& dir) {
    std::filesystem::create_directories(dir);
    RngState rng = rng_state(), stream = data.state();
    save_safetensors(dir + "/model.safetensors", model.state_dict(),
                     {{"rng_seed", std::to_string(rng.seed)}, {"rng_offset", std::to_string(rng.offset)},
                      {"data_seed", std::to_string(stream.seed)}, {"data_offset", std::to_string(stream.offset)}});
    optimizer.save(dir + "/optimizer.safetensors");
  }

  void load(const std::string& dir) {
    SafetensorsFile weights = load_safetensors(dir + "/model.safetensors");
    model.load_state_dict(weights.tensors);
    optimizer.load(dir + "/optimizer.safetensors");
    auto number = [&](const char* key) { return std::stoull(weights.metadata.at(key)); };
    set_rng_state({number("rng_seed"), number("rng_offset")});
    data.set_state({number("data_seed"), number("data_offset")});
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : "train_resume_run";
  std::printf("uninterrupted, 40 steps:\n");
  manual_seed(7);
  Run straight;
  straight.train(0, 40);
  std::printf("budget plan: %s\n", straight.planner->current().to_string().c_str());

  std::printf("20 steps, saved to %s, then resumed in a new model for 20 more:\n", dir.c_str());
  manual_seed(7);
  {
    Run first;
    first.train(0, 20);
    first.save(dir);
  }
  manual_seed(123);  // whatever the new process draws first is overwritten by the checkpoint
  Run resumed;
  resumed.load(dir);
  resumed.train(20, 40);

  auto a = straight.model.state_dict(), b = resumed.model.state_dict();
  bool same = a.size() == b.size();
  for (size_t i = 0; same && i < a.size(); ++i) same = a[i].second.to_vector<float>() == b[i].second.to_vector<float>();
  std::printf("resumed run %s the uninterrupted one\n", same ? "ends bit for bit equal to" : "DIFFERS from");
  return same ? 0 : 1;
}
