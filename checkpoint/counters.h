// What checkpointing did: ops recorded and replayed, bytes dropped, rebuilt and offloaded, replay
// time. Per region (Region::counters) and as totals over this thread's regions since the last reset.
#pragma once

#include <array>
#include <cstdint>

#include "../kernels/op_list.h"

namespace remat {

struct RegionCounters {
  int64_t ops_forward = 0;    // nodes recorded while the region was open (nested ones included)
  int64_t ops_replayed = 0;   // nodes re-executed by this region's replays
  int64_t bytes_dropped = 0;  // bytes of distinct values whose slots the region dropped
  int64_t bytes_rebuilt = 0;  // bytes of the outputs its replays produced
  int64_t replays = 0;        // region replays: each region counts once per backward that replays it
  int64_t replay_passes = 0;  // the passes they took (one per backward node that read a dropped slot)
  int64_t replay_ns = 0;      // wall time spent replaying
  int64_t bytes_offloaded = 0;  // bytes of saved outputs moved to host memory (GPU values only)
  // Bytes of saved outputs let go during backward once no replay still to come could read them
  // (e.g. the residual stream's increments, once the stream is rebuilt and held).
  int64_t bytes_released_early = 0;
  std::array<int64_t, kOpCount> replayed_by_op{};  // ops_replayed split by op kind
};

// Totals over every region of this thread since the last reset (for tests and the bench).
RegionCounters checkpoint_counters();
void reset_checkpoint_counters();

}  // namespace remat
