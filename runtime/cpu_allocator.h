// The CPU allocator, and its cache of freed blocks.
#pragma once

#include <cstdint>

#include "allocator.h"

namespace remat {

// allocator_for(Device::cpu()): 64-byte aligned blocks. Freed blocks of 64 KiB and more are kept and
// handed out again for requests of their size, at most as many bytes as were ever live at once; the
// counters count live bytes, `reserved` live and cached ones.
Allocator& cpu_allocator();

// Whether freed blocks are cached: on by default, off in builds with AddressSanitizer (which then
// sees each freed block freed); the environment variable REMAT_CPU_CACHING=1|0 gives the default.
// Turning it off gives the cache back (empty_cache).
void set_cpu_caching(bool enabled);
bool cpu_caching();  // throws on a bad REMAT_CPU_CACHING, naming what it accepts
int64_t cpu_cached_bytes();

}  // namespace remat
