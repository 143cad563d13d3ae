// What the runtime asks of the CUDA backend; answered by runtime/cuda/ or, without CUDA, by cuda_absent.cpp.
#pragma once

#include <cstddef>
#include <string>

#include "runtime/allocator.h"

namespace remat {

bool cuda_built();           // true when remat was compiled with the CUDA backend
int cuda_device_count();     // 0 without a GPU or without CUDA; never throws
std::string cuda_device_name(int index);
Allocator* cuda_allocator(int index);
void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n);
void cuda_memset_zero(void* dst, Device device, size_t n);
void cuda_synchronize(int index);    // waits for all work queued on the device
void cuda_empty_cache(int index);    // returns the allocator's wholly free segments to the driver
int64_t cuda_segment_count(int index);  // segments the caching allocator holds from the driver

}  // namespace remat
