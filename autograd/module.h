// Module: a tree of named children with registered parameters (stable dotted names), train/eval
// mode, a checkpoint level, and forward hooks. Concrete layers live in models/nn.
//
// A module's forward begins with `auto guard = enter();`: pre-hooks run there, post-hooks when the
// guard leaves scope, also when forward throws. That works for any forward signature.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../runtime/tensor.h"

namespace remat {

class Module;

struct ForwardHook {
  std::string kind;                                 // who placed it ("checkpoint", "level", ...)
  std::function<void(Module&)> pre;                 // before forward
  std::function<void(Module&, bool threw)> post;    // after forward, also when it threw
};

class Module {
 public:
  explicit Module(std::string type_name) : type_name_(std::move(type_name)) {}
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  const std::string& type_name() const { return type_name_; }

  // Children keep registration order; names must be unique among siblings.
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> child) {
    add_child(name, child);
    return child;
  }
  // Registers a leaf tensor as a parameter: counted as parameter memory, requires grad.
  Tensor register_parameter(const std::string& name, Tensor value);
  // Registers a constant the forward reads (no gradient, not saved with the weights); moves with to().
  Tensor register_buffer(const std::string& name, Tensor value);
  // Every buffer below this module.
  std::vector<Tensor> buffers() const;

  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }
  const std::vector<std::pair<std::string, Tensor>>& own_parameters() const { return parameters_; }
  // All parameters below this module, named by their dotted path ("blocks.0.attn.qkv.weight").
  std::vector<std::pair<std::string, Tensor>> named_parameters() const;
  std::vector<Tensor> parameters() const;
  // Every module below (and including) this one, with its dotted path ("" for this one).
  std::vector<std::pair<std::string, Module*>> named_modules();
  Module* find(const std::string& path);  // nullptr when absent

  void train(bool on = true);  // recursive
  void eval() { train(false); }
  // Moves every parameter and buffer below this module to `device`, in place (the layers'
  // handles follow); gradients are dropped.
  void to(Device device);
  bool is_training() const { return training_; }

  // 0: never checkpointed by level; 1 single layers ... 5 whole encoders (see docs/policies.md).
  int checkpoint_level() const { return checkpoint_level_; }
  void set_checkpoint_level_of_module(int level);

  int add_forward_hook(ForwardHook hook);  // returns an id for remove_forward_hook
  void remove_forward_hook(int id);
  bool has_hook(const std::string& kind) const;
  void remove_hooks(const std::string& kind);

  class ForwardGuard {
   public:
    explicit ForwardGuard(Module& m);
    ~ForwardGuard() noexcept(false);
    ForwardGuard(const ForwardGuard&) = delete;
    ForwardGuard& operator=(const ForwardGuard&) = delete;

   private:
    Module& module_;
    size_t pre_done_ = 0;
    int uncaught_;
  };
  [[nodiscard]] ForwardGuard enter() { return ForwardGuard(*this); }

 private:
  void add_child(const std::string& name, std::shared_ptr<Module> child);
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Tensor>>& out) const;

  std::string type_name_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  std::vector<std::pair<std::string, Tensor>> parameters_;
  std::vector<std::pair<std::string, Tensor>> buffers_;
  std::vector<std::pair<int, ForwardHook>> hooks_;
  int next_hook_id_ = 0;
  bool training_ = true;
  int checkpoint_level_ = 0;
};

}  // namespace remat
