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
                           int64_t bucket_bytes)
    : params_(std::move(params)), group_(group) {
  REMAT_CHECK(bucket_bytes > 0, "DataParallel: expected bucket_bytes > 0, got ", bucket_bytes);
  NoGradGuard no_grad;
  // The same parameters in the same order on every rank: their names and shapes are compared
  // through the broadcast's own check, one parameter at a time.
  for (auto& [name, p] : params_) {
    REMAT_CHECK(p.device() == params_.front().second.device(), "DataParallel: parameter ", name, " is on ",
                p.device().str(), ", the first on ", params_.front().second.device().str(),
                "; expected every parameter on one device");
    group_.broadcast(p, 0);
  }
  // Buckets: consecutive parameters of one dtype, up to bucket_bytes each (one parameter may exceed it).
  // Every rank computes the same layout from the parameters just checked, so the buckets' own
  // collectives skip the per-call exchange of shapes.
  int64_t filled = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i].second;
    bool fits = !buckets_.empty() && filled + static_cast<int64_t>(p.nbytes()) <= bucket_bytes &&
                params_[buckets_.back().front()].second.dtype() == p.dtype();
    if (!fits) {
      buckets_.emplace_back();
      filled = 0;
    }
    buckets_.back().push_back(i);
    bucket_of_.push_back(buckets_.size() - 1);
    index_of_[p.autograd_meta_ptr().get()] = i;
    filled += static_cast<int64_t>(p.nbytes());
  }
}

Tensor DataParallel::pack(size_t bucket, const std::vector<Tensor>& grads) const {
  const Tensor& first = params_[buckets_[bucket].front()].second;
  const Device device = first.device();
  int64_t n = 0;
  for (size_t i : buckets_[bucket]) n += params_[i].second.numel();
  Tensor flat = Tensor::empty({n}, first.dtype(), device);
  size_t offset = 0;
  for (size_t i : buckets_[bucket]) {
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

void DataParallel::set_means(size_t bucket, const Tensor& sum) {
  // The mean: a sum in rank order, then one multiplication, identical on every rank; in place, and
  // each gradient is a view of the bucket (no copy; the bucket lives as long as its gradients).
  const double scale = 1.0 / group_.size();
  const int64_t n = sum.numel();
  Tensor mean = sum;
  if (sum.device().is_cuda()) {
    mean = backend_for(sum.device()).unary(UnaryFn::mul_scalar, sum, scale);
  } else if (sum.dtype() == DType::f64) {
    double* d = static_cast<double*>(sum.raw_data());
    for (int64_t k = 0; k < n; ++k) d[k] *= scale;
  } else {
    float* d = static_cast<float*>(sum.raw_data());
    const float f = static_cast<float>(scale);
    for (int64_t k = 0; k < n; ++k) d[k] *= f;
  }
  sum.storage()->bump_version();
  int64_t offset = 0;
  for (size_t i : buckets_[bucket]) {
    Tensor& p = params_[i].second;
    p.set_grad(mean.view(p.shape(), contiguous_strides(p.shape()), offset));
    offset += p.numel();
  }
}

void DataParallel::backward(const Tensor& loss) {
  for (auto& [name, p] : params_)
    REMAT_CHECK(!p.grad().defined(), "DataParallel::backward: parameter ", name, " has a gradient already; zero ",
                "the gradients first (to accumulate over micro-batches, call remat::backward on each and ",
                "average_gradients() once)");
  std::vector<Tensor> local(params_.size()), sums(buckets_.size());
  std::vector<size_t> missing(buckets_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) missing[b] = buckets_[b].size();
  std::vector<ProcessGroup::PendingSum> pending(buckets_.size());
  auto send = [&](size_t b) {
    MemoryCategoryScope category(MemoryCategory::gradient);
    sums[b] = pack(b, local);
    pending[b] = group_.start_all_reduce_sum(sums[b], /*shapes_checked=*/true);
  };
  sent_during_backward_ = 0;
  size_t next = buckets_.size();  // buckets [next, end) are sent
  {
    LeafGradReadyScope ready([&](const AutogradMeta* leaf, const Tensor& grad) {
      auto found = index_of_.find(leaf);
      if (found == index_of_.end()) return;
      size_t i = found->second;
      local[i] = grad;
      --missing[bucket_of_[i]];
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
  for (size_t b = buckets_.size(); b-- > 0;) {
    pending[b].finish();
    set_means(b, sums[b]);
  }
}

void DataParallel::average_gradients() {
  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::gradient);
  std::vector<Tensor> grads;
  for (auto& [name, p] : params_) grads.push_back(p.grad());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    Tensor sum = pack(b, grads);
    group_.start_all_reduce_sum(sum, /*shapes_checked=*/true).finish();
    set_means(b, sum);
  }
}

}  // namespace remat::dist
