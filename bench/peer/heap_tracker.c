// LD_PRELOAD heap tracker: counts live heap bytes (malloc_usable_size of every block) and their
// peak, so remat and PyTorch are measured by the same allocator-level yardstick. Query it from
// the process with heap_tracker_current / heap_tracker_peak / heap_tracker_reset_peak.
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void __libc_free(void*);

static _Atomic long long current_bytes = 0;
static _Atomic long long peak_bytes = 0;

static void count(void* p, int sign) {
  if (!p) return;
  long long n = (long long)malloc_usable_size(p) * sign;
  long long now = atomic_fetch_add(&current_bytes, n) + n;
  long long seen = atomic_load(&peak_bytes);
  while (now > seen && !atomic_compare_exchange_weak(&peak_bytes, &seen, now)) {
  }
}

long long heap_tracker_current(void) { return atomic_load(&current_bytes); }
long long heap_tracker_peak(void) { return atomic_load(&peak_bytes); }
void heap_tracker_reset_peak(void) { atomic_store(&peak_bytes, atomic_load(&current_bytes)); }

void* malloc(size_t n) {
  void* p = __libc_malloc(n);
  count(p, 1);
  return p;
}
void* calloc(size_t a, size_t b) {
  void* p = __libc_calloc(a, b);
  count(p, 1);
  return p;
}
void* realloc(void* old, size_t n) {
  count(old, -1);
  void* p = __libc_realloc(old, n);
  if (p) count(p, 1);
  else count(old, 1);  // failed: the old block stays
  return p;
}
void free(void* p) {
  count(p, -1);
  __libc_free(p);
}
void* memalign(size_t align, size_t n) {
  void* p = __libc_memalign(align, n);
  count(p, 1);
  return p;
}
void* aligned_alloc(size_t align, size_t n) { return memalign(align, n); }
int posix_memalign(void** out, size_t align, size_t n) {
  void* p = memalign(align, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void* valloc(size_t n) { return memalign(4096, n); }
