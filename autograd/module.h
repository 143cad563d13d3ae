// Module: a tree of named children with registered parameters (stable dotted names), train/eval
// mode, a checkpoint level, and forward hooks. Concrete layers live in models/nn.
//
// A module's forward begins with `auto guard = enter();`: pre-hooks run there, post-hooks when the
// guard leaves scope, also when forward throws. That works for any forward signature.
#pragma once

#include <deque>
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
  // Parameters. A layer registers the member that holds one, so that the module always reads the
  // member: replacing it (`lin.weight = t`) is what named_parameters() and state_dict() see, and
  // to(dtype) converts it. The tensor becomes a parameter: parameter memory, requires grad.
  void register_parameter(const std::string& name, Tensor* member);
  // A parameter the module holds itself; returns it (replace it with set_parameter).
  Tensor register_parameter(const std::string& name, Tensor value);
  // Replaces this module's parameter `name` by `value` (made a parameter as above).
  void set_parameter(const std::string& name, Tensor value);
  // Buffers: constants the forward reads (no gradient), moved and converted with the module;
  // persistent ones are part of state_dict().
  void register_buffer(const std::string& name, Tensor* member, bool persistent = true);
  Tensor register_buffer(const std::string& name, Tensor value, bool persistent = true);

  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }
  // All parameters below this module, named by their dotted path ("blocks.0.attn.qkv.weight").
  std::vector<std::pair<std::string, Tensor>> named_parameters() const;
  std::vector<Tensor> parameters() const;
  std::vector<std::pair<std::string, Tensor>> named_buffers() const;  // every buffer below, dotted names
  std::vector<Tensor> buffers() const;
  // Every module below (and including) this one, with its dotted path ("" for this one).
  std::vector<std::pair<std::string, Module*>> named_modules();
  Module* find(const std::string& path);  // nullptr when absent

  // What a checkpoint holds: the parameters, then the persistent buffers, by dotted name. The
  // tensors are the module's own (not copies).
  std::vector<std::pair<std::string, Tensor>> state_dict() const;
  // Copies `state` into the parameters and persistent buffers of the same names (values converted
  // to each tensor's dtype and device; identities unchanged). strict: every name must match both
  // ways; otherwise names absent on either side are skipped. Shapes must match. Throws before
  // changing anything when something does not fit.
  void load_state_dict(const std::vector<std::pair<std::string, Tensor>>& state, bool strict = true);

  void train(bool on = true);  // recursive
  void eval() { train(false); }
  // Moves every parameter and buffer below this module to `device`, in place: every handle of
  // them (the layers', an optimizer's, yours) follows. Gradients are dropped. Between steps only.
  void to(Device device);
  // Converts every floating parameter and buffer below this module to `dtype` in place, with the
  // same identity guarantee; gradients are dropped. Optimizer state made before is not converted.
  void to(DType dtype);
  bool is_training() const { return training_; }

  // A block container: every child is a block that block-wise policies (full, block_skip, sqrt,
  // revolve, budget) may make a region, whatever the container's name (checkpoint/apply.h).
  void set_block_container(bool on = true) { block_container_ = on; }
  bool is_block_container() const { return block_container_; }

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
  // A registered tensor: the member (or an entry of owned_) that holds it.
  struct Slot {
    std::string name;
    Tensor* tensor;
    bool persistent;
  };
  void add_child(const std::string& name, std::shared_ptr<Module> child);
  void check_new_name(const std::string& name, const char* what) const;
  void collect(const std::string& prefix, bool buffers, bool persistent_only,
               std::vector<std::pair<std::string, Tensor>>& out) const;

  std::string type_name_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  std::vector<Slot> parameters_, buffers_;
  std::deque<Tensor> owned_;  // tensors registered by value (a deque: their addresses stay put)
  std::vector<std::pair<int, ForwardHook>> hooks_;
  int next_hook_id_ = 0;
  bool training_ = true;
  bool block_container_ = false;
  int checkpoint_level_ = 0;
};

}  // namespace remat
