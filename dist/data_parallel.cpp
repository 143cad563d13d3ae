// Data parallel: parameters from rank 0, gradients averaged in buckets after backward.
#include "dist/data_parallel.h"

#include <cstring>

#include "autograd/grad_mode.h"
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
    REMAT_CHECK(p.device().is_cpu(), "DataParallel: parameter ", name, " is on ", p.device().str(),
                "; data parallel over NCCL (CUDA tensors) is not built yet");
    group_.broadcast(p, 0);
  }
  // Buckets: consecutive parameters of one dtype, up to bucket_bytes each (one parameter may exceed it).
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
    filled += static_cast<int64_t>(p.nbytes());
  }
}

void DataParallel::average_gradients() {
  NoGradGuard no_grad;
  MemoryCategoryScope category(MemoryCategory::gradient);
  const double scale = 1.0 / group_.size();
  for (const std::vector<size_t>& bucket : buckets_) {
    DType dtype = params_[bucket.front()].second.dtype();
    int64_t n = 0;
    for (size_t i : bucket) n += params_[i].second.numel();
    Tensor flat = Tensor::zeros({n}, dtype);
    size_t offset = 0;
    for (size_t i : bucket) {
      Tensor g = params_[i].second.grad();
      size_t bytes = params_[i].second.nbytes();
      if (g.defined()) {
        Tensor c = g.as_contiguous();
        std::memcpy(static_cast<char*>(flat.raw_data()) + offset, c.raw_data(), bytes);
      }
      offset += bytes;
    }
    group_.all_reduce_sum(flat);
    // The mean: a sum in rank order, then one multiplication, identical on every rank.
    offset = 0;
    for (size_t i : bucket) {
      Tensor& p = params_[i].second;
      Tensor g = Tensor::empty(p.shape(), dtype);
      const char* src = static_cast<const char*>(flat.raw_data()) + offset;
      int64_t count = p.numel();
      if (dtype == DType::f64) {
        const double* s = reinterpret_cast<const double*>(src);
        double* d = static_cast<double*>(g.raw_data());
        for (int64_t k = 0; k < count; ++k) d[k] = s[k] * scale;
      } else {
        const float* s = reinterpret_cast<const float*>(src);
        float* d = static_cast<float*>(g.raw_data());
        const float f = static_cast<float>(scale);
        for (int64_t k = 0; k < count; ++k) d[k] = s[k] * f;
      }
      p.set_grad(g);
      offset += p.nbytes();
    }
  }
}

}  // namespace remat::dist
