// CUDA devices as a program sees them: whether remat has its CUDA part, how many GPUs there are,
// waiting for them, and giving cached memory back. Safe to call on any machine.
#pragma once

#include <string>

namespace remat {

bool cuda_built();         // true when remat was compiled with the CUDA backend
int cuda_device_count();   // 0 without a GPU, without CUDA's libraries or without CUDA; never throws
// Why cuda_device_count() is 0 for want of remat's CUDA part ("" when the part is there): it was
// not built, or its module did not load (the loader's message).
std::string cuda_unavailable_reason();
std::string cuda_device_name(int index);
void cuda_synchronize(int index);  // waits for all work queued on the device
void cuda_empty_cache(int index);  // returns the caching allocator's wholly free segments to the driver

}  // namespace remat
