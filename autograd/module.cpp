// Module tree, parameter naming, modes and forward hooks.
#include "autograd/module.h"

#include <algorithm>
#include <exception>
#include <map>

#include "autograd/grad_mode.h"

namespace remat {

void Module::add_child(const std::string& name, std::shared_ptr<Module> child) {
  REMAT_CHECK(child != nullptr, type_name_, ": register_module('", name, "') got a null module");
  REMAT_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name_,
              ": expected a child name without dots, got '", name, "'");
  for (const auto& [n, c] : children_) REMAT_CHECK(n != name, type_name_, ": a child named '", name, "' exists already");
  children_.emplace_back(name, std::move(child));
}

void Module::check_new_name(const std::string& name, const char* what) const {
  REMAT_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name_, ": expected a ", what,
              " name without dots, got '", name, "'");
  for (const auto& slots : {&parameters_, &buffers_})
    for (const Slot& s : *slots)
      REMAT_CHECK(s.name != name, type_name_, ": a parameter or buffer named '", name, "' exists already");
}

namespace {

// The tensor as a parameter: a leaf requiring grad, counted as parameter memory.
Tensor as_parameter(const std::string& owner, const std::string& name, Tensor value) {
  REMAT_CHECK(value.defined() && is_floating(value.dtype()), owner, ": parameter '", name,
              "' must be a floating tensor, got ", value.defined() ? value.meta_str() : std::string("an undefined tensor"));
  if (value.storage() && value.storage()->category() != MemoryCategory::parameter) {
    MemoryCategoryScope scope(MemoryCategory::parameter);
    value = value.clone();
  }
  if (!value.is_leaf() || !value.requires_grad()) value = value.detach().set_requires_grad(true);
  return value;
}

}  // namespace

void Module::register_parameter(const std::string& name, Tensor* member) {
  REMAT_CHECK(member != nullptr, type_name_, ": register_parameter('", name, "') got a null member");
  check_new_name(name, "parameter");
  *member = as_parameter(type_name_, name, *member);
  parameters_.push_back({name, member, true});
}

Tensor Module::register_parameter(const std::string& name, Tensor value) {
  check_new_name(name, "parameter");
  owned_.push_back(as_parameter(type_name_, name, std::move(value)));
  parameters_.push_back({name, &owned_.back(), true});
  return owned_.back();
}

void Module::set_parameter(const std::string& name, Tensor value) {
  for (Slot& s : parameters_)
    if (s.name == name) {
      *s.tensor = as_parameter(type_name_, name, std::move(value));
      return;
    }
  REMAT_FAIL(type_name_, ": no parameter named '", name, "' to set");
}

void Module::register_buffer(const std::string& name, Tensor* member, bool persistent) {
  REMAT_CHECK(member != nullptr && member->defined(), type_name_, ": buffer '", name, "' is undefined");
  check_new_name(name, "buffer");
  buffers_.push_back({name, member, persistent});
}

Tensor Module::register_buffer(const std::string& name, Tensor value, bool persistent) {
  REMAT_CHECK(value.defined(), type_name_, ": buffer '", name, "' is undefined");
  check_new_name(name, "buffer");
  owned_.push_back(std::move(value));
  buffers_.push_back({name, &owned_.back(), persistent});
  return owned_.back();
}

void Module::collect(const std::string& prefix, bool buffers, bool persistent_only,
                     std::vector<std::pair<std::string, Tensor>>& out) const {
  for (const Slot& s : buffers ? buffers_ : parameters_)
    if (s.persistent || !persistent_only) out.emplace_back(prefix + s.name, *s.tensor);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", buffers, persistent_only, out);
}

std::vector<std::pair<std::string, Tensor>> Module::named_parameters() const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", false, false, out);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [name, p] : named_parameters()) out.push_back(p);
  return out;
}

std::vector<std::pair<std::string, Tensor>> Module::named_buffers() const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", true, false, out);
  return out;
}

std::vector<Tensor> Module::buffers() const {
  std::vector<Tensor> out;
  for (auto& [name, b] : named_buffers()) out.push_back(b);
  return out;
}

std::vector<std::pair<std::string, Module*>> Module::named_modules() {
  std::vector<std::pair<std::string, Module*>> out{{"", this}};
  for (auto& [name, child] : children_)
    for (auto& [sub, m] : child->named_modules()) out.emplace_back(sub.empty() ? name : name + "." + sub, m);
  return out;
}

Module* Module::find(const std::string& path) {
  for (auto& [name, m] : named_modules())
    if (name == path) return m;
  return nullptr;
}

std::vector<std::pair<std::string, Tensor>> Module::state_dict() const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", false, false, out);
  collect("", true, true, out);
  return out;
}

void Module::load_state_dict(const std::vector<std::pair<std::string, Tensor>>& state, bool strict) {
  std::map<std::string, const Tensor*> by_name;
  for (const auto& [name, t] : state)
    REMAT_CHECK(by_name.emplace(name, &t).second, "load_state_dict: '", name, "' appears twice in the state");
  // Everything is checked before anything is written.
  std::vector<std::pair<Tensor, const Tensor*>> copies;
  std::vector<std::string> missing, unexpected;
  std::map<std::string, const Tensor*> unused = by_name;
  for (const auto& [name, t] : state_dict()) {
    auto found = by_name.find(name);
    if (found == by_name.end()) {
      missing.push_back(name);
      continue;
    }
    const Tensor& src = *found->second;
    REMAT_CHECK(src.defined() && src.shape() == t.shape(), "load_state_dict: '", name, "' has shape ",
                src.defined() ? shape_str(src.shape()) : std::string("(undefined)"), " in the state, ",
                shape_str(t.shape()), " in the ", type_name_);
    REMAT_CHECK(is_floating(src.dtype()) == is_floating(t.dtype()), "load_state_dict: '", name, "' is ",
                dtype_name(src.dtype()), " in the state, ", dtype_name(t.dtype()), " in the ", type_name_);
    copies.emplace_back(t, &src);
    unused.erase(name);
  }
  for (const auto& [name, t] : unused) unexpected.push_back(name);
  auto join = [](const std::vector<std::string>& names) {
    std::string s;
    for (size_t i = 0; i < names.size() && i < 8; ++i) s += (i ? ", " : "") + names[i];
    return names.size() > 8 ? s + ", ... (" + std::to_string(names.size()) + " in all)" : s;
  };
  REMAT_CHECK(!strict || missing.empty(), "load_state_dict: the state lacks ", join(missing), " of the ", type_name_);
  REMAT_CHECK(!strict || unexpected.empty(), "load_state_dict: the ", type_name_, " has nothing named ",
              join(unexpected), " (from the state)");
  NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst.copy_(*src);  // converts dtype, crosses devices
}

void Module::to(Device device) {
  for (Tensor& p : parameters()) {
    p.zero_grad();
    p.storage()->move_to(device);
  }
  for (Tensor& b : buffers()) b.storage()->move_to(device);
}

void Module::to(DType dtype) {
  REMAT_CHECK(is_floating(dtype), type_name_, ".to(", dtype_name(dtype), "): expected a floating dtype");
  std::vector<Tensor> all = parameters();
  for (Tensor& b : buffers()) all.push_back(b);
  for (Tensor& t : all) {
    if (!is_floating(t.dtype()) || t.dtype() == dtype) continue;
    if (t.requires_grad()) t.zero_grad();
    // The whole storage, converted, then swapped in: every view and handle of it follows.
    Storage& storage = *t.storage();
    int64_t n = static_cast<int64_t>(storage.bytes() / dtype_size(storage.dtype()));
    Tensor whole = t.view({n}, {1}, 0).detach();
    MemoryCategoryScope scope(storage.category());
    Tensor converted = whole.to(dtype);
    storage.take_contents(*converted.storage());
  }
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [name, child] : children_) child->train(on);
}

void Module::set_checkpoint_level_of_module(int level) {
  REMAT_CHECK(level >= 0 && level <= 5, type_name_, ": expected a checkpoint level in 0..5, got ", level);
  checkpoint_level_ = level;
}

int Module::add_forward_hook(ForwardHook hook) {
  hooks_.emplace_back(next_hook_id_, std::move(hook));
  return next_hook_id_++;
}

void Module::remove_forward_hook(int id) {
  std::erase_if(hooks_, [id](const auto& h) { return h.first == id; });
}

bool Module::has_hook(const std::string& kind) const {
  return std::any_of(hooks_.begin(), hooks_.end(), [&](const auto& h) { return h.second.kind == kind; });
}

void Module::remove_hooks(const std::string& kind) {
  std::erase_if(hooks_, [&](const auto& h) { return h.second.kind == kind; });
}

Module::ForwardGuard::ForwardGuard(Module& m) : module_(m), uncaught_(std::uncaught_exceptions()) {
  try {
    for (auto& [id, hook] : module_.hooks_) {
      if (hook.pre) hook.pre(module_);
      ++pre_done_;
    }
  } catch (...) {
    // The destructor will not run: the post-hooks of the pre-hooks that ran (regions they opened)
    // run here, as for a forward that threw.
    for (size_t i = pre_done_; i-- > 0;) {
      auto& hook = module_.hooks_[i].second;
      if (!hook.post) continue;
      try {
        hook.post(module_, true);
      } catch (...) {
      }
    }
    throw;
  }
}

Module::ForwardGuard::~ForwardGuard() noexcept(false) {
  bool threw = std::uncaught_exceptions() > uncaught_;
  std::exception_ptr first;
  // Post-hooks in reverse order, only for hooks whose pre-hook ran.
  for (size_t i = pre_done_; i-- > 0;) {
    auto& hook = module_.hooks_[i].second;
    if (!hook.post) continue;
    try {
      hook.post(module_, threw);
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first && !threw) std::rethrow_exception(first);
}

}  // namespace remat
