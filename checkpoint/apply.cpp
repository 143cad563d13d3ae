// Hook placement for every application API, and policy-string parsing.
#include "checkpoint/apply.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "autograd/grad_mode.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/schedule.h"

namespace remat {

const std::vector<std::string> kBlockContainerNames = {
    "blocks", "double_blocks", "single_blocks", "transformer_blocks", "temporal_transformer_blocks",
    "transformer_double_blocks", "transformer_single_blocks", "text_transformer_blocks", "visual_transformer_blocks"};

namespace {

constexpr const char* kCheckpointHook = "checkpoint";
constexpr const char* kLevelHook = "checkpoint_level";

// A hook pair that opens a region before forward and closes it after (also when forward threw).
// The open scopes are kept per thread: a module called from two threads opens a region in each.
ForwardHook region_hook(const std::string& kind, CheckpointOptions options, bool training_only) {
  uint64_t key = next_scope_key();
  ForwardHook hook;
  hook.kind = kind;
  hook.pre = [key, options, training_only](Module& m) {
    bool active = !training_only || m.is_training();
    thread_scopes(key).push_back(active ? std::make_unique<CheckpointScope>(options) : nullptr);
  };
  hook.post = [key](Module&, bool threw) { close_thread_scope(key, threw); };
  return hook;
}

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + names[i];
  return s;
}

std::mutex g_names_mutex;
std::vector<std::string>& added_names() {
  static std::vector<std::string> names;
  return names;
}

void collect_containers(Module& m, const std::string& prefix, std::vector<std::pair<std::string, Module*>>& out) {
  for (auto& [name, child] : m.children()) {
    std::string path = prefix.empty() ? name : prefix + "." + name;
    if (is_block_container(name, *child)) out.emplace_back(path, child.get());
    else collect_containers(*child, path, out);
  }
}

}  // namespace

void add_block_container_name(const std::string& name) {
  REMAT_CHECK(!name.empty() && name.find('.') == std::string::npos,
              "add_block_container_name: expected a child name without dots, got '", name, "'");
  std::lock_guard lock(g_names_mutex);
  auto& names = added_names();
  if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
}

std::vector<std::string> block_container_names() {
  std::vector<std::string> out = kBlockContainerNames;
  std::lock_guard lock(g_names_mutex);
  for (const auto& n : added_names())
    if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(n);
  return out;
}

bool is_block_container(const std::string& child_name, const Module& child) {
  if (child.is_block_container()) return true;
  std::vector<std::string> names = block_container_names();
  return std::find(names.begin(), names.end(), child_name) != names.end();
}

std::vector<std::pair<std::string, Module*>> find_named_block_containers(Module& model) {
  std::vector<std::pair<std::string, Module*>> out;
  collect_containers(model, "", out);
  return out;
}

std::vector<Module*> find_block_containers(Module& model, const std::string& who) {
  std::vector<Module*> out;
  for (auto& [path, m] : find_named_block_containers(model)) out.push_back(m);
  REMAT_CHECK(!out.empty(), who, ": no block container found in ", model.type_name(), "; searched for children named ",
              join(block_container_names()), " and modules marked with set_block_container");
  return out;
}

void checkpoint(Module& module, const CheckpointOptions& options) {
  REMAT_CHECK(!module.has_hook(kCheckpointHook), "checkpoint: ", module.type_name(),
              " is already checkpointed; applying checkpoint twice to one module is an error");
  CheckpointOptions o = options;
  if (o.name.empty()) o.name = module.type_name();
  module.add_forward_hook(region_hook(kCheckpointHook, std::move(o), false));
}

void checkpoint(Module& module, const std::map<std::string, std::string>& options) {
  checkpoint(module, CheckpointOptions::parse(options));
}

bool is_checkpointed(const Module& module) { return module.has_hook(kCheckpointHook); }

int apply_activation_checkpointing(Module& model, const std::function<bool(Module&)>& check_fn,
                                   const CheckpointOptions& options) {
  int count = 0;
  for (auto& [path, m] : model.named_modules()) {
    if (m == &model || is_checkpointed(*m) || !check_fn(*m)) continue;
    CheckpointOptions o = options;
    if (o.name.empty()) o.name = path;
    checkpoint(*m, o);
    ++count;
  }
  return count;
}

int apply_activation_checkpointing(Module& model, const std::string& type, int n_layer) {
  REMAT_CHECK(type == "full" || type == "ops" || type == "block_skip", "apply_activation_checkpointing: unknown type '",
              type, "': expected one of full, ops, block_skip");
  REMAT_CHECK(n_layer > 0, "apply_activation_checkpointing: expected n_layer >= 1, got ", n_layer);
  if (type == "ops") {
    CheckpointOptions o;
    o.policy = ops_preset();
    o.name = model.type_name() + " (ops)";
    checkpoint(model, o);
    return 1;
  }
  std::vector<Module*> containers = find_block_containers(model, "apply_activation_checkpointing");
  int step = type == "full" ? 1 : n_layer;
  int count = 0;
  for (Module* container : containers) {
    int index = 0;
    for (auto& [name, block] : container->children()) {
      if (index++ % step != 0 || is_checkpointed(*block)) continue;
      CheckpointOptions o;
      o.name = block->type_name() + "[" + name + "]";
      checkpoint(*block, o);
      ++count;
    }
  }
  return count;
}

void set_checkpoint_level(Module& model, int level) {
  REMAT_CHECK(level >= 0 && level <= 5, "set_checkpoint_level: expected a level in 0..5, got ", level);
  for (auto& [path, m] : model.named_modules()) {
    m->remove_hooks(kLevelHook);
    int k = m->checkpoint_level();
    if (k < 1 || k > level) continue;
    CheckpointOptions o;
    o.name = (path.empty() ? m->type_name() : path) + " (level " + std::to_string(k) + ")";
    m->add_forward_hook(region_hook(kLevelHook, std::move(o), /*training_only=*/true));
  }
}

void remove_checkpointing(Module& model) {
  for (auto& [path, m] : model.named_modules()) {
    m->remove_hooks(kCheckpointHook);
    m->remove_hooks(kLevelHook);
    m->remove_hooks("checkpoint_chain");
  }
}

PolicySpec parse_policy(const std::string& text) {
  PolicySpec spec;
  spec.text = text;
  auto number_after = [&](const std::string& prefix, int lo, int hi) {
    std::string rest = text.substr(prefix.size());
    int64_t n = 0;
    auto [end, error] = std::from_chars(rest.data(), rest.data() + rest.size(), n);
    REMAT_CHECK(!rest.empty() && rest.find_first_not_of("0123456789") == std::string::npos, "policy '", text,
                "': expected ", prefix, "<integer>");
    REMAT_CHECK(error == std::errc() && end == rest.data() + rest.size() && n >= lo && n <= hi, "policy '", text,
                "': expected ", prefix, "N with ", lo, " <= N <= ", hi);
    return static_cast<int>(n);
  };
  if (text == "none") spec.kind = PolicySpec::Kind::none;
  else if (text == "full") spec.kind = PolicySpec::Kind::full;
  else if (text == "ops") spec.kind = PolicySpec::Kind::ops;
  else if (text.rfind("block_skip:", 0) == 0) {
    spec.kind = PolicySpec::Kind::block_skip;
    spec.n = number_after("block_skip:", 1, 1 << 20);
  } else if (text.rfind("level:", 0) == 0) {
    spec.kind = PolicySpec::Kind::level;
    spec.n = number_after("level:", 0, 5);
  } else if (text.rfind("sac:", 0) == 0) {
    spec.kind = PolicySpec::Kind::sac;
    std::string list = text.substr(4);
    REMAT_CHECK(!list.empty(), "policy '", text, "': expected sac:<op>,<op>... with at least one op");
    size_t start = 0;
    while (start <= list.size()) {
      size_t comma = list.find(',', start);
      std::string name = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      spec.ops.push_back(parse_op(name));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  } else if (text == "sqrt") {
    spec.kind = PolicySpec::Kind::sqrt;
  } else if (text.rfind("revolve:", 0) == 0) {
    spec.kind = PolicySpec::Kind::revolve;
    spec.n = number_after("revolve:", 1, 64);
  } else if (text.rfind("budget:", 0) == 0) {
    spec.kind = PolicySpec::Kind::budget;
    std::string rest = text.substr(7);
    for (auto [prefix, scope] : {std::pair{"act:", BudgetScope::activations}, std::pair{"total:", BudgetScope::total}})
      if (rest.rfind(prefix, 0) == 0) {
        spec.budget_scope = scope;
        rest = rest.substr(std::string(prefix).size());
        break;
      }
    bool percent = !rest.empty() && rest.back() == '%';
    if (percent) rest.pop_back();
    char* end = nullptr;
    double value = rest.empty() ? 0 : std::strtod(rest.c_str(), &end);
    bool number = !rest.empty() && end && end != rest.c_str() && std::isfinite(value);
    double scale = 0;  // stays 0 for an unknown unit
    if (number && !percent)
      for (auto [unit, factor] : {std::pair{"", 1.0}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}, {"KiB", 1024.0},
                                  {"MiB", 1048576.0}, {"GiB", 1073741824.0}, {"TiB", 1099511627776.0}})
        if (std::string(end) == unit) scale = factor;
    bool plain = number && (percent ? *end == 0 : scale > 0);
    // Bytes: a whole number from 1 to 2^62 (so that it converts exactly); percent: (0, 100].
    constexpr double kMaxBytes = 4611686018427387904.0;
    double bytes = value * scale;
    bool fits = percent ? value > 0 && value <= 100 : bytes >= 1 && bytes <= kMaxBytes && bytes == std::floor(bytes);
    REMAT_CHECK(plain && fits, "policy '", text, "': expected budget:[act:|total:]<bytes> with a whole number of bytes ",
                "from 1 to 2^62 (a unit K, M, G, T, KiB, MiB, GiB or TiB may follow the number), or ",
                "budget:[act:|total:]<percent>% with 0 < percent <= 100");
    if (percent) spec.budget_percent = value;
    else spec.budget_bytes = static_cast<int64_t>(bytes);
  } else {
    REMAT_FAIL("unknown policy '", text, "': expected none, full, ops, block_skip:N, level:L (0..5), sac:<op>,<op>..., "
               "sqrt, revolve:S or budget:[act:|total:]<bytes|percent%>");
  }
  return spec;
}

void apply_policy(Module& model, const PolicySpec& spec) {
  remove_checkpointing(model);
  switch (spec.kind) {
    case PolicySpec::Kind::none: return;
    case PolicySpec::Kind::full: apply_activation_checkpointing(model, "full"); return;
    case PolicySpec::Kind::ops: apply_activation_checkpointing(model, "ops"); return;
    case PolicySpec::Kind::block_skip: apply_activation_checkpointing(model, "block_skip", spec.n); return;
    case PolicySpec::Kind::level: set_checkpoint_level(model, spec.n); return;
    case PolicySpec::Kind::sqrt:
    case PolicySpec::Kind::revolve: {
      std::vector<Module*> containers = find_block_containers(model, "policy " + spec.text);
      for (Module* c : containers) {
        int n = static_cast<int>(c->children().size());
        if (n == 0) continue;
        apply_chain_schedule(*c, spec.kind == PolicySpec::Kind::sqrt ? sqrt_schedule(n) : revolve_schedule(n, spec.n));
      }
      return;
    }
    case PolicySpec::Kind::budget:
      REMAT_FAIL("policy ", spec.text, ": a budget needs one recorded step; use BudgetPlanner (remat train and remat-bench do)");
    case PolicySpec::Kind::sac: {
      CheckpointOptions o;
      o.policy = save_ops(spec.ops);
      o.name = model.type_name() + " (" + spec.text + ")";
      checkpoint(model, o);
      return;
    }
  }
}

}  // namespace remat
