// The library as a program uses it: models in f64, Module::to(dtype) and replaced parameters,
// state_dict with buffers, optimizers keyed by name with groups, block containers by name or mark,
// and the safetensors loader's rejections.
#include <unistd.h>

#include <catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "models/gpt.h"
#include "models/nn/layers.h"
#include "models/optim.h"
#include "models/safetensors.h"
#include "models/data.h"
#include "remat.h"

using namespace remat;
using Catch::Matchers::Contains;

namespace {

std::string temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("remat_lib_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

GptConfig tiny_f64() {
  GptConfig c = gpt_config("tiny");
  c.dtype = DType::f64;
  c.dropout = 0.0;
  c.layers = 1;
  return c;
}

// A layer with a parameter, a persistent buffer (a running count) and a non-persistent one.
class Scaled final : public nn::UnaryModule {
 public:
  Scaled() : UnaryModule("Scaled") {
    scale = Tensor::full({3}, 2.0);
    register_parameter("scale", &scale);
    count = Tensor::zeros({1});
    register_buffer("count", &count);
    ones = Tensor::ones({3});
    register_buffer("ones", &ones, /*persistent=*/false);
  }
  Tensor forward(const Tensor& x) override { return mul(mul(x, scale), ones); }
  Tensor scale, count, ones;
};

// A model whose blocks live in a container named like Hugging Face's GPT-2 ("h").
class HfStyle final : public Module {
 public:
  HfStyle() : Module("HfStyle") {
    h = register_module("h", std::make_shared<nn::ModuleList>());
    for (int i = 0; i < 3; ++i) {
      auto block = std::make_shared<nn::Sequential>();
      block->push_back(std::make_shared<nn::Linear>(4, 4));
      block->push_back(std::make_shared<nn::Gelu>());
      h->push_back(block);
    }
  }
  Tensor forward(const Tensor& x) {
    Tensor y = x;
    for (size_t i = 0; i < h->size(); ++i) y = h->at<nn::Sequential>(i)(y);
    return y;
  }
  std::shared_ptr<nn::ModuleList> h;
};

void write_bytes(const std::string& path, const std::string& header, size_t data_bytes) {
  std::string out;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += header;
  out.append(data_bytes, '\0');
  std::ofstream(path, std::ios::binary) << out;
}

}  // namespace

TEST_CASE("a gpt built in f64 draws f64 parameters and its gradients match finite differences", "[library][f64]") {
  manual_seed(3);
  Gpt model(tiny_f64());
  for (const auto& [name, p] : model.named_parameters()) {
    INFO(name);
    CHECK(p.dtype() == DType::f64);
  }
  AdditionTask data(64, 2);
  auto [x, y] = data.batch(2, 16);
  Tensor loss = model.loss(x, y);
  CHECK(loss.dtype() == DType::f64);
  backward(loss);
  // Central differences on a few elements of three parameters.
  for (const char* name : {"wte.weight", "blocks.0.attn.qkv.weight", "ln_f.bias"}) {
    Tensor p;
    for (const auto& [n, t] : model.named_parameters())
      if (n == name) p = t;
    REQUIRE(p.defined());
    std::vector<double> grad = p.grad().to_vector<double>();
    for (int64_t i : {int64_t{0}, p.numel() / 2, p.numel() - 1}) {
      double* v = p.data<double>() + i;
      const double h = 1e-6, keep = *v;
      NoGradGuard no_grad;
      *v = keep + h;
      double up = model.loss(x, y).item();
      *v = keep - h;
      double down = model.loss(x, y).item();
      *v = keep;
      INFO(name << "[" << i << "]");
      CHECK(grad[i] == Approx((up - down) / (2 * h)).epsilon(1e-6).margin(1e-9));
    }
  }
}

TEST_CASE("Module::to(dtype) converts in place: the optimizer's and the layers' handles follow", "[library][f64]") {
  manual_seed(4);
  GptConfig c = gpt_config("tiny");
  c.dropout = 0.0;
  Gpt model(c);
  std::vector<Tensor> handles = model.parameters();
  std::vector<float> before = model.wte->weight.to_vector<float>();
  model.to(DType::f64);
  for (const Tensor& h : handles) CHECK(h.dtype() == DType::f64);
  CHECK(model.wte->weight.dtype() == DType::f64);
  CHECK(model.wte->weight.storage() == handles.front().storage());  // the same parameter, converted
  std::vector<double> after = model.wte->weight.to_vector<double>();
  CHECK(std::equal(before.begin(), before.end(), after.begin()));  // f32 -> f64 is exact
  AdditionTask data(64, 2);
  auto [x, y] = data.batch(2, 16);
  Tensor loss = model.loss(x, y);
  CHECK(loss.dtype() == DType::f64);
  AdamW opt(model.named_parameters());
  backward(loss);
  opt.step(1e-3);
  CHECK(model.wte->weight.to_vector<double>() != after);
  CHECK_THROWS_WITH(model.to(DType::i64), Contains("expected a floating dtype"));
}

TEST_CASE("a replaced layer weight is what named_parameters, state_dict and optimizers see", "[library]") {
  nn::Linear lin(3, 2);
  Tensor replacement = Tensor::full({2, 3}, 0.5).set_requires_grad(true);
  lin.weight = replacement;
  CHECK(lin.named_parameters()[0].second.storage() == replacement.storage());
  CHECK(lin.state_dict()[0].second.storage() == replacement.storage());
  // A replacement that does not require grad would never be trained: the optimizer says so.
  lin.weight = Tensor::zeros({2, 3});
  CHECK_THROWS_WITH(AdamW(lin.named_parameters()), Contains("parameter 'weight' is not a leaf that requires grad"));
  lin.set_parameter("weight", Tensor::ones({2, 3}));
  CHECK(lin.weight.requires_grad());
  CHECK(lin.weight.to_vector<float>() == std::vector<float>(6, 1.0f));
  AdamW opt(lin.named_parameters());
  backward(sum(lin(Tensor::ones({1, 3}))));
  opt.step(0.1);
  CHECK(lin.weight.to_vector<float>() != std::vector<float>(6, 1.0f));
  CHECK_THROWS_WITH(lin.set_parameter("nope", Tensor::ones({1})), Contains("no parameter named 'nope'"));
}

TEST_CASE("state_dict holds parameters and persistent buffers; load_state_dict round-trips and checks", "[library]") {
  std::string dir = temp_dir("state_dict");
  nn::Sequential model;
  model.push_back(std::make_shared<Scaled>());
  model.push_back(std::make_shared<nn::Linear>(3, 3));
  auto& first = model.children()[0].second;
  static_cast<Scaled&>(*first).count.fill_(41.0);
  std::vector<std::string> names;
  for (const auto& [name, t] : model.state_dict()) names.push_back(name);
  CHECK(names == std::vector<std::string>{"0.scale", "1.weight", "1.bias", "0.count"});
  CHECK(model.named_buffers().size() == 2);  // "0.ones" is a buffer, but not part of the state

  save_safetensors(dir + "/m.safetensors", model.state_dict());
  nn::Sequential fresh;
  fresh.push_back(std::make_shared<Scaled>());
  fresh.push_back(std::make_shared<nn::Linear>(3, 3));
  fresh.load_state_dict(load_safetensors(dir + "/m.safetensors").tensors);
  auto a = model.state_dict(), b = fresh.state_dict();
  for (size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].first);
    CHECK(a[i].second.to_vector<double>() == b[i].second.to_vector<double>());
  }
  CHECK(static_cast<Scaled&>(*fresh.children()[0].second).count.item() == 41.0);

  auto state = model.state_dict();
  state.pop_back();  // no count
  CHECK_THROWS_WITH(fresh.load_state_dict(state), Contains("the state lacks 0.count"));
  fresh.load_state_dict(state, /*strict=*/false);
  auto extra = model.state_dict();
  extra.emplace_back("2.extra", Tensor::zeros({1}));
  CHECK_THROWS_WITH(fresh.load_state_dict(extra), Contains("has nothing named 2.extra"));
  auto wrong = model.state_dict();
  wrong[0].second = Tensor::zeros({4});
  CHECK_THROWS_WITH(fresh.load_state_dict(wrong), Contains("'0.scale' has shape [4] in the state, [3]"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("optimizer state is keyed by parameter name, loads into a rebuilt model, and groups scale it", "[library][optim]") {
  std::string dir = temp_dir("optim");
  manual_seed(5);
  nn::Linear a(3, 2), b(2, 1);
  auto params = [&] {
    return std::vector<std::pair<std::string, Tensor>>{{"a.weight", a.weight}, {"a.bias", a.bias}, {"b.weight", b.weight},
                                                       {"b.bias", b.bias}};
  };
  AdamW opt(params());
  backward(sum(b(a(Tensor::ones({4, 3})))));
  opt.step(0.01);
  opt.save(dir + "/opt.safetensors");
  // The same names in another order: the moments go where their names say.
  auto reversed = params();
  std::reverse(reversed.begin(), reversed.end());
  AdamW again(reversed);
  again.load(dir + "/opt.safetensors");
  CHECK(again.steps() == 1);
  for (const auto& [name, t] : opt.state())
    for (const auto& [other, u] : again.state())
      if (name == other) CHECK(t.to_vector<double>() == u.to_vector<double>());
  Sgd sgd(params());
  CHECK_THROWS_WITH(sgd.load(dir + "/opt.safetensors"), Contains("holds the state of adamw, not of sgd"));
  // A step count that is not a number is an error before any state is loaded (it was "stoll").
  save_safetensors(dir + "/bad.safetensors", opt.state(),
                   {{"format", "remat optimizer"}, {"optimizer", "adamw"}, {"steps", "99999999999999999999"}});
  CHECK_THROWS_WITH(again.load(dir + "/bad.safetensors"), Contains("expected a step count"));
  CHECK(again.steps() == 1);
  CHECK_THROWS_WITH(AdamW(std::vector<std::pair<std::string, Tensor>>{{"x", a.weight}, {"x", b.weight}}),
                    Contains("the parameter name 'x' appears twice"));

  // Groups: a frozen group (lr_scale 0) and one with its own weight decay.
  ParamGroup frozen(std::vector<std::pair<std::string, Tensor>>{{"a.weight", a.weight}, {"a.bias", a.bias}});
  frozen.lr_scale = 0.0;
  ParamGroup decayed(std::vector<std::pair<std::string, Tensor>>{{"b.weight", b.weight}, {"b.bias", b.bias}});
  decayed.weight_decay = 0.5;
  Sgd grouped({frozen, decayed}, /*momentum=*/0.0);
  std::vector<float> a_before = a.weight.to_vector<float>(), b_before = b.bias.to_vector<float>();
  a.weight.zero_grad(), a.bias.zero_grad(), b.weight.zero_grad(), b.bias.zero_grad();
  backward(sum(b(a(Tensor::ones({4, 3})))));
  float g = b.bias.grad().to_vector<float>()[0];
  grouped.step(0.1);
  CHECK(a.weight.to_vector<float>() == a_before);
  CHECK(b.bias.to_vector<float>()[0] == Approx(b_before[0] - 0.1f * (g + 0.5f * b_before[0])));
  std::filesystem::remove_all(dir);
}

TEST_CASE("block containers are found by FastVideo's names, by added names and by a mark", "[library][policy]") {
  HfStyle model;
  CHECK_THROWS_WITH(apply_activation_checkpointing(model, "full"), Contains("no block container found in HfStyle"));
  model.h->set_block_container();
  CHECK(apply_activation_checkpointing(model, "full") == 3);
  remove_checkpointing(model);
  model.h->set_block_container(false);
  add_block_container_name("h");
  CHECK(apply_activation_checkpointing(model, "block_skip", 2) == 2);
  auto names = block_container_names();
  CHECK(names.size() == kBlockContainerNames.size() + 1);
  CHECK(names.back() == "h");
  // Checkpointing them changes nothing in the gradients and replays the blocks.
  Tensor x = Tensor::randn({2, 4});
  remove_checkpointing(model);
  backward(sum(model.forward(x)));
  std::vector<std::vector<float>> plain;
  for (Tensor& p : model.parameters()) plain.push_back(p.grad().to_vector<float>()), p.zero_grad();
  apply_activation_checkpointing(model, "full");
  reset_checkpoint_counters();
  backward(sum(model.forward(x)));
  CHECK(checkpoint_counters().replays == 3);
  auto params = model.parameters();
  for (size_t i = 0; i < params.size(); ++i) CHECK(params[i].grad().to_vector<float>() == plain[i]);
  CHECK_THROWS_WITH(add_block_container_name("a.b"), Contains("without dots"));
}

TEST_CASE("the safetensors loader rejects what the reference implementation rejects", "[library][safetensors]") {
  std::string dir = temp_dir("reject");
  auto check = [&](const std::string& header, size_t data, const std::string& error) {
    std::string path = dir + "/bad.safetensors";
    write_bytes(path, header, data);
    INFO(header);
    CHECK_THROWS_WITH(load_safetensors(path), Contains(error));
  };
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";
  check(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[4,12]}})", 12, "overlaps");
  check(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[12,20]}})", 20, "a gap of 4 bytes");
  check(R"({"a":{)" + f32x2 + R"(,"data_offsets":[8,0]}})", 8, "spans data_offsets [8, 0]");
  check(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"a":{)" + f32x2 + R"(,"data_offsets":[8,16]}})", 16, "names 'a' twice");
  check(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 12, "4 bytes after the last tensor");
  check(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 4, "truncated");
  check(R"({"a":{"dtype":"F64","shape":[2305843009213693952,8],"data_offsets":[0,0]}})", 0, "more elements than");
  check(R"({"a":{"dtype":"F32","shape":[4611686018427387905],"data_offsets":[0,4]}})", 4, "more bytes than");
  check(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, "not a size");
  check(R"(["not", "an", "object"])", 0, "expected a JSON object");
  // What the loader accepts: tensors listed in any order, as long as they tile the data.
  std::string path = dir + "/good.safetensors";
  write_bytes(path, R"({"b":{)" + f32x2 + R"(,"data_offsets":[8,16]},"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", 16);
  SafetensorsFile f = load_safetensors(path);
  CHECK(f.tensors.size() == 2);
  CHECK(f.tensors[0].first == "a");
  std::filesystem::remove_all(dir);
}

TEST_CASE("tensor sizes that overflow 64 bits are errors, not wrapped counts", "[library][runtime]") {
  CHECK_THROWS_WITH(Tensor::zeros({int64_t(1) << 61, 8}, DType::f64), Contains("more elements than a 64-bit count holds"));
  CHECK_THROWS_WITH(Tensor::zeros({int64_t(1) << 32, int64_t(1) << 32}), Contains("more elements than"));
  CHECK_THROWS_WITH(Tensor::empty({int64_t(1) << 62}, DType::f32), Contains("more bytes than a 64-bit size holds"));
  CHECK(Tensor::zeros({0, int64_t(1) << 40, int64_t(1) << 40}).numel() == 0);
  CHECK_THROWS_WITH(Tensor::zeros({2, -3}), Contains("expected non-negative sizes"));
}

TEST_CASE("the library says its version", "[library]") {
  CHECK(std::string(version()) == REMAT_VERSION_STRING);
  CHECK(REMAT_VERSION_MAJOR == 0);
}
