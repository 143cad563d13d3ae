// Placing regions on a module tree without changing module types or parameter names: hook-style,
// wrapper-style, FastVideo types (full / ops / block_skip), level-based, and the policy string
// shared by the CLI and the bench.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "../autograd/module.h"
#include "options.h"

namespace remat {

// Hook-style (PyTorch composable checkpoint): the module's forward becomes a region. Applying it
// twice to one module is an error.
void checkpoint(Module& module, const CheckpointOptions& options = {});
void checkpoint(Module& module, const std::map<std::string, std::string>& options);
bool is_checkpointed(const Module& module);

// Wrapper-style: every non-root submodule for which check_fn is true, skipping modules already
// checkpointed (never twice). Returns how many modules were newly checkpointed.
int apply_activation_checkpointing(Module& model, const std::function<bool(Module&)>& check_fn,
                                   const CheckpointOptions& options = {});

// FastVideo: type "full", "ops" or "block_skip". Block containers are found at any depth, not
// looking inside a container once found (see is_block_container). Returns the number of regions placed.
int apply_activation_checkpointing(Module& model, const std::string& type, int n_layer = 1);

// Block containers (what full, block_skip, sqrt, revolve and the budget planner place regions on,
// one per child): a child named as in FastVideo's nine kBlockContainerNames or in a name a program
// added, or any module marked with Module::set_block_container.
extern const std::vector<std::string> kBlockContainerNames;
void add_block_container_name(const std::string& name);  // process-wide, e.g. "h" or "layers"
std::vector<std::string> block_container_names();        // FastVideo's nine, then the added ones
bool is_block_container(const std::string& child_name, const Module& child);
// Every block container below `model`, in tree order; throws naming the model and what was looked
// for when there is none.
std::vector<Module*> find_block_containers(Module& model, const std::string& who);
// The same with the dotted path of each container.
std::vector<std::pair<std::string, Module*>> find_named_block_containers(Module& model);

// Level-based: every module with 1 <= checkpoint_level <= level becomes a region in training mode.
// Level 0 removes level regions. Calling it again replaces the previous level.
void set_checkpoint_level(Module& model, int level);

// Removes every region hook placed by the functions above.
void remove_checkpointing(Module& model);

// The policy string: none, full, ops, block_skip:N, level:L, sac:<op>,<op>..., sqrt, revolve:S,
// budget:[act:|total:]<bytes|percent%> (bytes optionally with K, M, G, T, KiB, MiB, GiB or TiB;
// act, the default, budgets the activations, total every byte of the device).
struct PolicySpec {
  enum class Kind { none, full, ops, block_skip, level, sac, sqrt, revolve, budget } kind = Kind::none;
  int n = 0;                 // N of block_skip, L of level, S of revolve
  std::vector<OpKind> ops;   // sac
  int64_t budget_bytes = 0;  // budget:<bytes>
  double budget_percent = 0; // budget:<percent>%
  BudgetScope budget_scope = BudgetScope::activations;
  std::string text;
};
PolicySpec parse_policy(const std::string& text);
// Places the policy's regions. Budget policies need a recorded step: use BudgetPlanner (the CLI
// and the bench do); apply_policy throws for them.
void apply_policy(Module& model, const PolicySpec& spec);

}  // namespace remat
