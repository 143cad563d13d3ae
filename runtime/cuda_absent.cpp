// The CUDA entry points of a build without CUDA: zero devices, and a clear error on use.
#include "runtime/cuda_backend.h"
#include "runtime/error.h"

namespace remat {

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { return ""; }

Allocator* cuda_allocator(int index) {
  REMAT_FAIL("cuda:", index, " requested, but remat was built without CUDA (meson option -Dcuda)");
}

void cuda_copy_bytes(void*, Device dst, const void*, Device src, size_t) {
  REMAT_FAIL("copy from ", src.str(), " to ", dst.str(), ": remat was built without CUDA");
}

void cuda_memset_zero(void*, Device device, size_t) { REMAT_FAIL(device.str(), ": remat was built without CUDA"); }
void cuda_synchronize(int index) { REMAT_FAIL("cuda:", index, ": remat was built without CUDA"); }
void cuda_empty_cache(int index) { REMAT_FAIL("cuda:", index, ": remat was built without CUDA"); }
int64_t cuda_segment_count(int index) { REMAT_FAIL("cuda:", index, ": remat was built without CUDA"); }
Allocator* cuda_pinned_allocator() { REMAT_FAIL("pinned host memory: remat was built without CUDA"); }
CopyTicket cuda_copy_async(void*, const void*, size_t, int index, bool, std::shared_ptr<const void>) {
  REMAT_FAIL("cuda:", index, ": remat was built without CUDA");
}
void cuda_wait(const CopyTicket&) {}
int cuda_poll_copies() { return 0; }

}  // namespace remat
