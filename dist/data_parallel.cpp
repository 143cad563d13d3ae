// Data parallel: parameters from rank 0, gradients averaged in buckets after backward.
#include "dist/data_parallel.h"

#include <cstring>

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "kernels/backend.h"
#include "runtime/cuda_backend.h"
#include "runtime/allocator.h"
#include "runtime/error.h"

namespace remat::dist {

DataParallel::DataParallel(std::vector<std::pair<std::string, Tensor>> params, ProcessGroup& group,
                           int64_t bucket_bytes, bool zero1)
    : params_(std::move(params)), group_(group), layout_(params_, bucket_bytes, group.size()), zero1_(zero1) {
  NoGradGuard no_grad;
  // The same parameters in the same order on every rank: their names and shapes are compared
  // through the broadcast's own check, one parameter at a time. Every rank then computes the same
  // bucket layout from them, so the buckets' own collectives skip the per-call exchange of shapes.
  for (auto& [name, p] : params_) {
    REMAT_CHECK(p.device() == params_.front().second.device(), "DataParallel: parameter ", name, " is on ",
                p.device().str(), ", the first on ", params_.front().second.device().str(),
                "; expected every parameter on one device");
    group_.broadcast(p, 0);
  }
  for (size_t i = 0; i < params_.size(); ++i) index_of_[params_[i].second.autograd_meta_ptr().get()] = i;
}

Tensor DataParallel::pack(size_t bucket, const std::vector<Tensor>& grads) const {
  const Tensor& first = params_[layout_.members[bucket].front()].second;
  const Device device = first.device();
  Tensor flat = Tensor::empty({layout_.numel[bucket]}, first.dtype(), device);
  size_t offset = 0;
  for (size_t i : layout_.members[bucket]) {
    size_t bytes = params_[i].second.nbytes();
    char* to = static_cast<char*>(flat.raw_data()) + offset;
    if (grads[i].defined()) {
      Tensor c = grads[i].as_contiguous();
      copy_bytes(to, device, c.raw_data(), device, bytes);
    } else if (device.is_cuda()) {
      cuda_memset_zero(to, device, bytes);
    } else {
      std::memset(to, 0, bytes);
    }
    offset += bytes;
  }
  return flat;
}

ProcessGroup::PendingSum DataParallel::start(size_t bucket, Tensor& sum) {
  if (zero1_) return group_.start_reduce_scatter_sum(sum, layout_.owned[bucket], /*shapes_checked=*/true);
  return group_.start_all_reduce_sum(sum, /*shapes_checked=*/true);
}

void DataParallel::set_means(size_t bucket, const Tensor& sum) {
  // The mean: a sum in rank order, then one multiplication, identical on every rank; in place, and
  // each gradient is a view of the bucket (no copy; the bucket lives as long as its gradients).
  // With zero1, only this rank's chunk holds sums: only its parameters get a gradient.
  const double scale = 1.0 / group_.size();
  int64_t from = 0, n = sum.numel();
  if (zero1_) {
    for (int r = 0; r < group_.rank(); ++r) from += layout_.owned[bucket][static_cast<size_t>(r)];
    n = layout_.owned[bucket][static_cast<size_t>(group_.rank())];
  }
  Tensor mean = sum;
  if (sum.device().is_cuda()) {
    mean = backend_for(sum.device()).unary(UnaryFn::mul_scalar, sum, scale);
  } else if (sum.dtype() == DType::f64) {
    double* d = static_cast<double*>(sum.raw_data()) + from;
    for (int64_t k = 0; k < n; ++k) d[k] *= scale;
  } else {
    float* d = static_cast<float*>(sum.raw_data()) + from;
    const float f = static_cast<float>(scale);
    for (int64_t k = 0; k < n; ++k) d[k] *= f;
  }
  sum.storage()->bump_version();
  for (size_t i : layout_.members[bucket]) {
    Tensor& p = params_[i].second;
    if (zero1_ && layout_.owner[i] != group_.rank()) p.zero_grad();
    else p.set_grad(mean.view(p.shape(), contiguous_strides(p.shape()), mean.offset() + layout_.offset[i]));
  }
}

void DataParallel::backward(const Tensor& loss) {
  for (auto& [name, p] : params_)
    REMAT_CHECK(!p.grad().defined(), "DataParallel::backward: parameter ", name, " has a gradient already; zero ",
                "the gradients first (to accumulate over micro-batches, call remat::backward on each and ",
                "average_gradients() once)");
  const size_t buckets = layout_.size();
  std::vector<Tensor> local(params_.size()), sums(buckets);
  std::vector<size_t> missing(buckets);
  for (size_t b = 0; b < buckets; ++b) missing[b] = layout_.members[b].size();
  std::vector<ProcessGroup::PendingSum> pending(buckets);
  auto send = [&](size_t b) {
    MemoryCategoryScope category(MemoryCategory::gradient);
    sums[b] = pack(b, local);
    pending[b] = start(b, sums[b]);
  };
  sent_during_backward_ = 0;
  size_t next = buckets;  // buckets [next, end) are sent
  {
    LeafGradReadyScope ready([&](const AutogradMeta* leaf, const Tensor& grad) {
      auto found = index_of_.find(leaf);
      if (found == index_of_.end()) return;
      size_t i = found->second;
      local[i] = grad;
      --missing[layout_.bucket_of[i]];
      // Buckets go in one order on every rank (collectives must match): last first, as backward
      // finishes the last parameters first; a bucket waits for those after it.
      while (next > 0 && missing[next - 1] == 0) {
        send(--next);
        ++sent_during_backward_;
      }
      for (auto& p : pending)  // MPI moves data only inside its calls
        if (p.started()) p.poll();
    });
    remat::backward(loss);
  }
  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::gradient);
  while (next > 0) send(--next);  // parameters this backward did not reach count as zeros
  for (size_t b = buckets; b-- > 0;) {
    pending[b].finish();
    set_means(b, sums[b]);
  }
}

void DataParallel::average_gradients() {
  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::gradient);
  std::vector<Tensor> grads;
  for (auto& [name, p] : params_) grads.push_back(p.grad());
  for (size_t b = 0; b < layout_.size(); ++b) {
    Tensor sum = pack(b, grads);
    start(b, sum).finish();
    set_means(b, sum);
  }
}

}  // namespace remat::dist
