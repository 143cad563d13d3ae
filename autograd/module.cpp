// Module tree, parameter naming, modes and forward hooks.
#include "autograd/module.h"

#include <algorithm>
#include <exception>

namespace remat {

void Module::add_child(const std::string& name, std::shared_ptr<Module> child) {
  REMAT_CHECK(child != nullptr, type_name_, ": register_module('", name, "') got a null module");
  REMAT_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name_,
              ": expected a child name without dots, got '", name, "'");
  for (const auto& [n, c] : children_) REMAT_CHECK(n != name, type_name_, ": a child named '", name, "' exists already");
  children_.emplace_back(name, std::move(child));
}

Tensor Module::register_parameter(const std::string& name, Tensor value) {
  REMAT_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name_,
              ": expected a parameter name without dots, got '", name, "'");
  for (const auto& [n, p] : parameters_)
    REMAT_CHECK(n != name, type_name_, ": a parameter named '", name, "' exists already");
  REMAT_CHECK(value.defined() && is_floating(value.dtype()), type_name_, ": parameter '", name,
              "' must be a floating tensor, got ", value.meta_str());
  if (value.storage() && value.storage()->category() != MemoryCategory::parameter) {
    MemoryCategoryScope scope(MemoryCategory::parameter);
    value = value.clone();
  }
  value = value.detach();
  value.set_requires_grad(true);
  parameters_.emplace_back(name, value);
  return value;
}

void Module::collect(const std::string& prefix, std::vector<std::pair<std::string, Tensor>>& out) const {
  for (const auto& [name, p] : parameters_) out.emplace_back(prefix + name, p);
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<std::pair<std::string, Tensor>> Module::named_parameters() const {
  std::vector<std::pair<std::string, Tensor>> out;
  collect("", out);
  return out;
}

std::vector<Tensor> Module::parameters() const {
  std::vector<Tensor> out;
  for (auto& [name, p] : named_parameters()) out.push_back(p);
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

Tensor Module::register_buffer(const std::string& name, Tensor value) {
  REMAT_CHECK(value.defined(), type_name(), ": buffer ", name, " is undefined");
  buffers_.emplace_back(name, value);
  return value;
}

std::vector<Tensor> Module::buffers() const {
  std::vector<Tensor> out;
  for (const auto& [name, b] : buffers_) out.push_back(b);
  for (const auto& [name, child] : children_)
    for (Tensor& b : child->buffers()) out.push_back(b);
  return out;
}

void Module::to(Device device) {
  for (Tensor& p : parameters()) {
    p.zero_grad();
    p.storage()->move_to(device);
  }
  for (Tensor& b : buffers()) b.storage()->move_to(device);
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
  for (auto& [id, hook] : module_.hooks_) {
    if (hook.pre) hook.pre(module_);
    ++pre_done_;
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
