// The bucket layout and ZeRO-1 ownership shared by DataParallel and ShardedAdamW.
#include "dist/buckets.h"

#include <algorithm>

#include "runtime/error.h"

namespace remat::dist {

Buckets::Buckets(const std::vector<std::pair<std::string, Tensor>>& params, int64_t bucket_bytes, int ranks) {
  REMAT_CHECK(bucket_bytes > 0, "data parallel: expected bucket_bytes > 0, got ", bucket_bytes);
  REMAT_CHECK(ranks >= 1, "data parallel: expected at least one rank, got ", ranks);
  int64_t filled = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i].second;
    const bool fits = !members.empty() && filled + static_cast<int64_t>(p.nbytes()) <= bucket_bytes &&
                      params[members.back().front()].second.dtype() == p.dtype();
    if (!fits) {
      members.emplace_back();
      numel.push_back(0);
      filled = 0;
    }
    members.back().push_back(i);
    bucket_of.push_back(members.size() - 1);
    offset.push_back(numel.back());
    numel.back() += p.numel();
    filled += static_cast<int64_t>(p.nbytes());
  }
  // Owners by position in all the parameters' bytes, in order: each parameter goes to the rank
  // whose equal share [r T / P, (r + 1) T / P) of the T bytes holds its middle. Non-decreasing
  // along the parameters, so each rank's parameters in a bucket are contiguous and in rank order,
  // and the shares differ by at most one parameter's bytes (a bucket may go to one rank whole).
  int64_t total = 0, at = 0;
  for (const auto& [name, p] : params) total += static_cast<int64_t>(p.nbytes());
  owner.resize(params.size());
  for (size_t b = 0; b < members.size(); ++b) owned.emplace_back(static_cast<size_t>(ranks), 0);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t bytes = static_cast<int64_t>(params[i].second.nbytes());
    const int64_t middle2 = 2 * at + bytes;  // twice the middle, in bytes
    owner[i] = static_cast<int>(std::min<int64_t>(ranks - 1, middle2 * ranks / (2 * std::max<int64_t>(1, total))));
    owned[bucket_of[i]][static_cast<size_t>(owner[i])] += params[i].second.numel();
    at += bytes;
  }
}

}  // namespace remat::dist
