// How data parallel training groups parameters for its collectives: buckets of consecutive
// parameters of one dtype, and, for ZeRO-1, which rank owns (updates) each parameter. Every rank
// computes the same layout from the same parameters; the owners depend on the parameters and the
// number of ranks only, not on the bucket size, so a DataParallel and a ShardedAdamW agree on
// them without talking, whatever bucket sizes each was given.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../runtime/tensor.h"

namespace remat::dist {

// DataParallel's and ShardedAdamW's default bucket size.
inline constexpr int64_t kDefaultBucketBytes = int64_t{25} << 20;

struct Buckets {
  // Consecutive parameters of one dtype, up to bucket_bytes each (one parameter may exceed it).
  // Rank r owns about 1/P of the parameters' bytes, whole parameters, consecutive ones: within
  // each bucket, a contiguous run per rank (maybe empty), the runs in rank order.
  Buckets(const std::vector<std::pair<std::string, Tensor>>& params, int64_t bucket_bytes, int ranks);

  std::vector<std::vector<size_t>> members;  // parameter indices, per bucket
  std::vector<size_t> bucket_of;             // per parameter
  std::vector<int> owner;                    // per parameter
  std::vector<int64_t> numel;                // elements, per bucket
  std::vector<std::vector<int64_t>> owned;   // elements owned by each rank, per bucket (its chunk)
  std::vector<int64_t> offset;               // per parameter: its first element in its bucket

  size_t size() const { return members.size(); }
};

}  // namespace remat::dist
