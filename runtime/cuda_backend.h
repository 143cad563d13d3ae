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

}  // namespace remat
