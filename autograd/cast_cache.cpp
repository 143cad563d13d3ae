// Autocast's cache of parameters' compute-dtype copies (see cast_cache.h and autocast.h).
#include "autograd/cast_cache.h"

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "autograd/autocast.h"
#include "runtime/env_switch.h"

namespace remat {

namespace {

EnvSwitch g_enabled{"REMAT_AUTOCAST_CACHE", true};
std::atomic<int64_t> g_hits{0}, g_casts{0}, g_refreshes{0};

// Guards every storage's kept copy (Storage leaves the locking to its one user, this file) and
// the list of storages that hold one, which clear and the statistics walk.
std::mutex& cache_mutex() {
  static std::mutex* mutex = new std::mutex;  // never destroyed: safe from other statics' destructors
  return *mutex;
}
std::vector<std::weak_ptr<Storage>>& holders() {
  static auto* list = new std::vector<std::weak_ptr<Storage>>;
  return *list;
}

void remember_holder(const std::shared_ptr<Storage>& storage) {
  auto& list = holders();
  std::erase_if(list, [](const std::weak_ptr<Storage>& w) { return w.expired(); });
  for (const auto& w : list)
    if (w.lock() == storage) return;
  list.push_back(storage);
}

// Whether `param` covers all of its storage, contiguously from its start.
bool covers_storage(const Tensor& param) {
  return param.is_contiguous() && param.offset() == 0 && param.nbytes() == param.storage()->bytes();
}

}  // namespace

void set_autocast_cache_enabled(bool enabled) {
  g_enabled.set(enabled);
  if (!enabled) clear_autocast_cache();
}

bool autocast_cache_enabled() { return g_enabled.get(); }

void clear_autocast_cache() {
  std::lock_guard lock(cache_mutex());
  for (const auto& w : holders())
    if (auto storage = w.lock()) storage->drop_converted_copy();
  holders().clear();
}

AutocastCacheStats autocast_cache_stats() {
  AutocastCacheStats stats;
  {
    std::lock_guard lock(cache_mutex());
    for (const auto& w : holders()) {
      auto storage = w.lock();
      if (!storage || !storage->converted_copy()) continue;
      ++stats.copies;
      stats.bytes += static_cast<int64_t>(storage->converted_copy()->bytes());
    }
  }
  stats.hits = g_hits.load();
  stats.casts = g_casts.load();
  stats.refreshes = g_refreshes.load();
  return stats;
}

namespace detail {

bool caches_compute_copy(const Tensor& t) {
  return t.defined() && t.is_leaf() && t.requires_grad() && t.dtype() == DType::f32 && t.is_contiguous() &&
         t.storage() != nullptr;
}

Tensor compute_copy(Backend& backend, const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  if (!autocast_cache_enabled()) return backend.cast(t, dtype);
  const std::shared_ptr<Storage>& storage = t.storage();
  std::lock_guard lock(cache_mutex());
  if (storage->converted_copy_current(dtype)) {
    g_hits.fetch_add(1, std::memory_order_relaxed);
    return Tensor::over(storage->converted_copy()).view(t.shape(), t.strides(), t.offset());
  }
  storage->drop_converted_copy();  // stale: its bytes go before the new copy's come
  // The whole storage, so that every view of it (a parameter split in parts) finds its copy.
  Tensor copy;
  {
    MemoryCategoryScope scope(MemoryCategory::parameter);  // a parameter's other form, kept as long
    copy = backend.cast(Tensor::over(storage), dtype);
  }
  storage->keep_converted_copy(copy.storage());
  remember_holder(storage);
  g_casts.fetch_add(1, std::memory_order_relaxed);
  return copy.view(t.shape(), t.strides(), t.offset());
}

Tensor compute_copy_for_update(const Tensor& param) {
  if (!param.defined() || !param.storage()) return Tensor();
  Storage& storage = *param.storage();
  std::lock_guard lock(cache_mutex());
  const std::shared_ptr<Storage>& copy = storage.converted_copy();
  if (!copy) return Tensor();
  // use_count 1: no op holds the copy now, so rewriting it changes nothing anyone reads.
  if (!autocast_cache_enabled() || !storage.converted_copy_current(copy->dtype()) || copy.use_count() != 1 ||
      !covers_storage(param) || param.dtype() != DType::f32 || copy->dtype() != DType::bf16) {
    storage.drop_converted_copy();
    return Tensor();
  }
  return Tensor::over(copy).view(param.shape(), param.strides(), 0);
}

void compute_copy_updated(const Tensor& param) {
  std::lock_guard lock(cache_mutex());
  if (!param.storage() || !param.storage()->converted_copy()) return;
  param.storage()->mark_converted_copy_current();
  g_refreshes.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace detail
}  // namespace remat
