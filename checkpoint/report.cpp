// The saved-tensor report.
#include "checkpoint/report.h"

#include <algorithm>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "autograd/grad_mode.h"
#include "checkpoint/apply.h"
#include "checkpoint/region.h"
#include "runtime/random.h"

namespace remat {

namespace {

SaveReport report_with(Module& model, const std::string& name, const std::function<void()>& apply,
                       const std::function<Tensor()>& forward) {
  SaveReport report;
  report.policy = name;
  bool was_training = model.is_training();
  RngState rng = rng_state();
  model.train(true);
  remove_checkpointing(model);
  apply();
  Tensor out;
  try {
    EnableGradGuard grad;
    out = forward();
  } catch (...) {
    remove_checkpointing(model);
    model.train(was_training);
    set_rng_state(rng);
    throw;
  }
  remove_checkpointing(model);
  model.train(was_training);
  set_rng_state(rng);
  if (!out.defined() || !out.autograd_meta_ptr() || !out.autograd_meta_ptr()->graph) return report;
  // The output's graph and every graph it imports from, directly or not: a forward can span
  // several (under autocast a parameter's cast starts a graph of its own, and the loss's part of
  // the model then records there, apart from the blocks' regions).
  std::vector<Graph*> graphs{static_cast<Graph*>(out.autograd_meta_ptr()->graph.get())};
  std::unordered_set<const Graph*> seen{graphs.front()};
  for (size_t i = 0; i < graphs.size(); ++i)
    for (const ValueInfo& v : graphs[i]->values)
      if (v.source && seen.insert(v.source.get()).second) graphs.push_back(v.source.get());
  for (Graph* g : graphs) {
    if (!g->hooks) continue;
    const Graph& graph = *g;
    const auto& regions = RegionManager::of(*g).regions();
    report.regions += static_cast<int>(regions.size());
    // For every value produced inside a region and read by some slot: kept if any slot keeps it.
    std::unordered_map<int64_t, bool> kept;
    for (const auto& node : graph.nodes)
      for (const SavedSlot& slot : node->saved) kept[slot.value] = kept[slot.value] || slot.state == SlotState::kept;
    for (const Region& r : regions)  // outputs the policy saved, read by replay rather than by backward
      for (const RegionInput& saved : r.saved_outputs) kept[saved.value] = kept[saved.value] || saved.state == SlotState::kept;
    for (const auto& [value, is_kept] : kept) {
      const ValueInfo& v = graph.values[value];
      if (v.producer < 0) continue;
      int region = graph.nodes[v.producer]->region;
      if (region < 0) continue;
      SavedTensorEntry e;
      e.region = regions[region].options.name;
      e.depth = regions[region].depth;
      e.op = graph.nodes[v.producer]->name();
      e.shape = v.shape;
      e.dtype = v.dtype;
      e.bytes = numel_of(v.shape) * static_cast<int64_t>(dtype_size(v.dtype));
      e.saved = is_kept;
      (is_kept ? report.saved_bytes : report.recomputed_bytes) += e.bytes;
      (is_kept ? report.saved_by_op : report.recomputed_by_op)[e.op] += e.bytes;
      report.entries.push_back(std::move(e));
    }
    for (const Region& r : regions)
      for (Decision d : r.decisions) report.offload_decisions += d == Decision::must_offload || d == Decision::prefer_offload;
  }
  if (report.offload_decisions > 0 && out.device().is_cpu())
    report.note = std::to_string(report.offload_decisions) +
                  " offload decision(s) on cpu: offloading moves saved tensors to host memory, where they already are, "
                  "so they are kept (listed as saved)";
  std::sort(report.entries.begin(), report.entries.end(), [](const auto& a, const auto& b) {
    return a.region != b.region ? a.region < b.region : a.op < b.op;
  });
  return report;
}

}  // namespace

SaveReport what_is_saved(Module& model, const std::string& policy, const std::function<Tensor()>& forward) {
  PolicySpec spec = parse_policy(policy);
  return report_with(model, policy, [&] { apply_policy(model, spec); }, forward);
}

SaveReport what_is_saved(Module& model, const CheckpointOptions& options, const std::function<Tensor()>& forward) {
  return report_with(model, options.policy.name, [&] { checkpoint(model, options); }, forward);
}

std::string SaveReport::to_string() const {
  std::ostringstream out;
  out << "policy " << policy << ": " << regions << " region(s)\n";
  out << "region                          op              shape                bytes  kept\n";
  for (const auto& e : entries) {
    char line[256];
    std::snprintf(line, sizeof line, "%-31s %-15s %-18s %8lld  %s\n", e.region.substr(0, 31).c_str(), e.op.c_str(),
                  shape_str(e.shape).c_str(), static_cast<long long>(e.bytes), e.saved ? "saved" : "recomputed");
    out << line;
  }
  out << "saved " << saved_bytes << " bytes, recomputed " << recomputed_bytes << " bytes\n";
  for (const auto& [op, bytes] : saved_by_op) out << "  saved      " << op << ": " << bytes << "\n";
  for (const auto& [op, bytes] : recomputed_by_op) out << "  recomputed " << op << ": " << bytes << "\n";
  if (!note.empty()) out << "note: " << note << "\n";
  return out.str();
}

}  // namespace remat
