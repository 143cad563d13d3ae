// Backend selection by device, op-name parsing, the methods a backend may override (cross-entropy
// from its rows, linear's parameter gradients, clipping, AdamW over many tensors), and sums of
// squares over tensors on any devices.
#include "kernels/backend.h"

#include <algorithm>
#include <utility>

#include "kernels/cpu/cpu_backend.h"
#include "runtime/cuda/module.h"

namespace remat {

OpKind parse_op(const std::string& name) {
  std::string known;
  for (int i = 0; i < kOpCount; ++i) {
    if (name == kOpInfo[i].name) return static_cast<OpKind>(i);
    known += (i ? ", " : "") + std::string(kOpInfo[i].name);
  }
  REMAT_FAIL("unknown op '", name, "': expected one of ", known);
}

std::vector<Tensor> Backend::cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const CrossEntropyRows options{.ignore_index = ignore_index, .first_row = 0, .batch_targets = {}};
  std::vector<Tensor> rows = cross_entropy_rows(logits, targets, options);
  return {cross_entropy_mean(rows[0], targets, logits.size(1), ignore_index), rows[1]};
}

std::pair<Tensor, Tensor> Backend::linear_weight_bias_grads(const Tensor& dy, const Tensor& x) {
  const int64_t out = dy.size(1);
  Tensor dw = Tensor::empty({out, x.size(1)}, DType::f32, dy.device());
  matmul_into(dw, dy, x, true, false, false);
  return {dw, reduce_sum_accumulated(dy, {0}).view({out}, {1}, 0)};
}

bool Backend::clip_by_total_norm(const std::vector<Tensor>&, double, Tensor&) { return false; }

void Backend::adamw_update_all(const std::vector<AdamWTensors>& items) {
  for (const AdamWTensors& t : items) {
    adamw_update(*t.param, *t.grad, *t.m, *t.v, t.step);
    if (t.compute_copy) t.compute_copy->copy_(cast(*t.param, t.compute_copy->dtype()));
  }
}

void adamw_update_by_device(const std::vector<Backend::AdamWTensors>& items) {
  std::vector<bool> done(items.size(), false);
  for (size_t first = 0; first < items.size(); ++first) {
    if (done[first]) continue;
    const Device device = items[first].param->device();
    std::vector<Backend::AdamWTensors> on_device;
    for (size_t i = first; i < items.size(); ++i)
      if (!done[i] && items[i].param->device() == device) {
        on_device.push_back(items[i]);
        done[i] = true;
      }
    backend_for(device).adamw_update_all(on_device);
  }
}

Backend* cuda_kernels() {
  static auto* backend = static_cast<Backend*>(cuda_part_entry("kernels"));
  return backend;
}

Backend& backend_for(Device device) {
  static CpuBackend cpu;
  if (device.is_cpu()) return cpu;
  Backend* cuda = cuda_kernels();
  REMAT_CHECK(cuda, "no kernels for ", device.str(), ": ", cuda_part_problem());
  return *cuda;
}

std::vector<double> sum_squares_by_device(const std::vector<Tensor>& xs) {
  std::vector<double> squares(xs.size(), 0.0);
  // The tensors by device, in order; each device's sums come back in one read.
  std::vector<std::pair<Device, std::vector<size_t>>> by_device;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!xs[i].defined()) continue;
    const Device d = xs[i].device();
    auto at = std::find_if(by_device.begin(), by_device.end(), [&](const auto& e) { return e.first == d; });
    if (at == by_device.end()) at = by_device.insert(by_device.end(), {d, {}});
    at->second.push_back(i);
  }
  for (const auto& [device, members] : by_device) {
    std::vector<Tensor> tensors;
    for (size_t i : members) tensors.push_back(xs[i]);
    std::vector<double> sums = backend_for(device).sum_squares(tensors);
    for (size_t j = 0; j < members.size(); ++j) squares[members[j]] = sums[j];
  }
  return squares;
}

Backend& backend_for(OpKind op, Device device) {
  Backend& backend = backend_for(device);
  REMAT_CHECK(backend.supports(op), "the ", backend.name(), " backend has no kernel for op ", op_name(op));
  return backend;
}

}  // namespace remat
