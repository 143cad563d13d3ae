// Tensor handles, storage, factories, copies and dtype conversion.
#include "runtime/tensor.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/philox.h"
#include "runtime/cuda_backend.h"
#include "runtime/half.h"
#include "runtime/random.h"

namespace remat {

Storage::Storage(size_t bytes, Device device, MemoryCategory category, DType dtype)
    : Storage(bytes, device, category, dtype, allocator_for(device)) {}

namespace {
std::atomic<uint64_t> g_storage_serial{0};
}  // namespace

uint64_t next_storage_serial() { return g_storage_serial.load(); }

Storage::Storage(size_t bytes, Device device, MemoryCategory category, DType dtype, Allocator& allocator)
    : bytes_(bytes), device_(device), allocator_(&allocator), category_(category), dtype_(dtype) {
  data_ = allocator_->allocate(bytes, category);
  serial_ = g_storage_serial.fetch_add(1, std::memory_order_relaxed);
}

void Storage::take_contents(Storage& other) {
  std::swap(data_, other.data_);
  std::swap(bytes_, other.bytes_);
  std::swap(device_, other.device_);
  std::swap(allocator_, other.allocator_);
  std::swap(category_, other.category_);
  std::swap(dtype_, other.dtype_);
  bump_version();
  drop_converted_copy();
}

bool Storage::converted_copy_current(DType dtype) const {
  return converted_ && converted_version_ == version_ && converted_->dtype() == dtype &&
         converted_->device() == device_;
}

void Storage::keep_converted_copy(std::shared_ptr<Storage> copy) {
  converted_ = std::move(copy);
  converted_version_ = version_;
}

Storage::~Storage() { allocator_->deallocate(data_, bytes_, category_); }

void Storage::set_category(MemoryCategory category) {
  if (data_) allocator_->recount(bytes_, category_, category);
  category_ = category;
}

void Storage::move_to(Device device) {
  if (device == device_) return;
  drop_converted_copy();
  Allocator& target = allocator_for(device);
  void* moved = target.allocate(bytes_, category_);
  copy_bytes(moved, device, data_, device_, bytes_);
  allocator_->deallocate(data_, bytes_, category_);
  data_ = moved;
  device_ = device;
  allocator_ = &target;
}

namespace {

// Reads element i (flat, of a contiguous host buffer) of any dtype as double.
double load_as_double(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(base)[i];
    case DType::f64: return static_cast<const double*>(base)[i];
    case DType::i32: return static_cast<const int32_t*>(base)[i];
    case DType::i64: return static_cast<double>(static_cast<const int64_t*>(base)[i]);
    case DType::u8: return static_cast<const uint8_t*>(base)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
  return 0;
}

void store_from_double(void* base, DType t, int64_t i, double v) {
  switch (t) {
    case DType::f32: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case DType::f64: static_cast<double*>(base)[i] = v; break;
    case DType::i32: static_cast<int32_t*>(base)[i] = static_cast<int32_t>(v); break;
    case DType::i64: static_cast<int64_t*>(base)[i] = static_cast<int64_t>(v); break;
    case DType::u8: static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(v); break;
    case DType::bf16: static_cast<uint16_t*>(base)[i] = f32_to_bf16(static_cast<float>(v)); break;
    case DType::f16: static_cast<uint16_t*>(base)[i] = f32_to_f16(static_cast<float>(v)); break;
  }
}

// Copies elements of `elem` bytes `count` times from a stride of `stride` elements.
template <typename Word>
void copy_words(char* dst, const char* src, int64_t count, int64_t stride) {
  Word* out = reinterpret_cast<Word*>(dst);
  for (int64_t j = 0; j < count; ++j) std::memcpy(out + j, src + j * stride * sizeof(Word), sizeof(Word));
}

// The copy of a transpose: output row i of a run of `rows` rows reads the source from src + i (the
// source's unit-stride dim is the output's second innermost: a matrix's transpose, [B, T, C] ->
// [B, C, T]), its column j at j * inner_step. A task copies columns [j0, j0 + kTransposeColumns) of
// every row of the run, kTransposeTile x kTransposeTile elements at a time through a buffer: each
// source line is read whole at once and each output line written whole at once. A [4096, 1024] f32
// transpose: 15 ms row by row (each element of an output row from another page), 7 ms in tiles
// written straight across (the tile's rows, a power of two apart, evicted each other from the
// cache), 2.9 ms so.
constexpr int64_t kTransposeTile = 16, kTransposeColumns = 64;

template <typename Word>
void copy_transposed(char* dst, const char* src, int64_t rows, int64_t j0, int64_t inner, int64_t inner_step) {
  Word* out = reinterpret_cast<Word*>(dst);
  Word tile[kTransposeTile][kTransposeTile];
  const int64_t j_end = std::min(inner, j0 + kTransposeColumns);
  for (int64_t i0 = 0; i0 < rows; i0 += kTransposeTile) {
    const int64_t ni = std::min(kTransposeTile, rows - i0);
    for (int64_t jt = j0; jt < j_end; jt += kTransposeTile) {
      const int64_t nj = std::min(kTransposeTile, j_end - jt);
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t i = 0; i < ni; ++i)
          std::memcpy(&tile[i][j], src + ((jt + j) * inner_step + i0 + i) * static_cast<int64_t>(sizeof(Word)),
                      sizeof(Word));
      for (int64_t i = 0; i < ni; ++i)
        std::memcpy(out + (i0 + i) * inner + jt, tile[i], static_cast<size_t>(nj) * sizeof(Word));
    }
  }
}

// Copies a strided host view into a contiguous host buffer. Dims that are contiguous with each
// other are merged first, so a view is copied as rows (one memcpy each when its last dim has
// stride 1), or as a transpose in tiles (copy_transposed), spread over the threads.
void gather_strided(char* dst, const char* src, const Shape& shape, const Strides& strides, size_t elem) {
  int64_t n = numel_of(shape);
  if (n == 0) return;
  std::vector<int64_t> sizes, steps;  // merged dims, outermost first
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    if (!sizes.empty() && steps.back() == strides[d] * shape[d]) {
      sizes.back() *= shape[d];
      steps.back() = strides[d];
    } else {
      sizes.push_back(shape[d]);
      steps.push_back(strides[d]);
    }
  }
  if (sizes.empty()) {  // a single element
    std::memcpy(dst, src, elem);
    return;
  }
  const int64_t inner = sizes.back(), inner_step = steps.back(), rows = n / inner;
  const int64_t outer_dims = static_cast<int64_t>(sizes.size()) - 1;
  // The source offset of index q over the first `dims` merged dims, the last fastest.
  auto row_offset = [&](int64_t q, int64_t dims) {
    int64_t offset = 0;
    for (int64_t d = dims - 1; d >= 0; --d) {
      offset += (q % sizes[d]) * steps[d];
      q /= sizes[d];
    }
    return offset;
  };
  if (inner_step != 1 && outer_dims > 0 && steps[outer_dims - 1] == 1 && (elem == 2 || elem == 4 || elem == 8)) {
    // A transpose: runs of output rows whose source rows lie side by side, by chunks of columns.
    const int64_t run = sizes[outer_dims - 1], runs = rows / run;
    const int64_t chunks = (inner + kTransposeColumns - 1) / kTransposeColumns;
#pragma omp parallel for if (n > (1 << 16))
    for (int64_t job = 0; job < runs * chunks; ++job) {
      const int64_t q = job / chunks, j0 = job % chunks * kTransposeColumns;
      char* out = dst + q * run * inner * static_cast<int64_t>(elem);
      const char* in = src + row_offset(q, outer_dims - 1) * static_cast<int64_t>(elem);
      switch (elem) {
        case 8: copy_transposed<uint64_t>(out, in, run, j0, inner, inner_step); break;
        case 4: copy_transposed<uint32_t>(out, in, run, j0, inner, inner_step); break;
        default: copy_transposed<uint16_t>(out, in, run, j0, inner, inner_step); break;
      }
    }
    return;
  }
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    char* out = dst + r * inner * static_cast<int64_t>(elem);
    const char* in = src + row_offset(r, outer_dims) * static_cast<int64_t>(elem);
    if (inner_step == 1) {
      std::memcpy(out, in, static_cast<size_t>(inner) * elem);
      continue;
    }
    switch (elem) {
      case 8: copy_words<uint64_t>(out, in, inner, inner_step); break;
      case 4: copy_words<uint32_t>(out, in, inner, inner_step); break;
      case 2: copy_words<uint16_t>(out, in, inner, inner_step); break;
      default:
        for (int64_t j = 0; j < inner; ++j) std::memcpy(out + j * elem, in + j * inner_step * elem, elem);
    }
  }
}

}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  checked_numel(shape, dtype_size(dtype), "tensor");
  Tensor t;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.defined_ = true;
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(numel_of(shape)) * dtype_size(dtype), device,
                                         current_memory_category(), dtype);
  return t;
}

Tensor Tensor::empty_pinned(const Shape& shape, DType dtype) {
  if (cuda_device_count() == 0) return empty(shape, dtype, Device::cpu());
  checked_numel(shape, dtype_size(dtype), "pinned tensor");
  Tensor t;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  t.device_ = Device::cpu();
  t.defined_ = true;
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(numel_of(shape)) * dtype_size(dtype), Device::cpu(),
                                         current_memory_category(), dtype, *cuda_pinned_allocator());
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::scalar(double value, DType dtype, Device device) { return full({}, value, dtype, device); }

Tensor Tensor::arange(int64_t n, DType dtype, Device device) {
  Tensor host = empty({n}, dtype, Device::cpu());
  for (int64_t i = 0; i < n; ++i) store_from_double(host.raw_data(), dtype, i, static_cast<double>(i));
  return device.is_cpu() ? host : host.to(device);
}

Tensor Tensor::rand(const Shape& shape, DType dtype, Device device) {
  Tensor host = empty(shape, dtype, Device::cpu());
  int64_t n = host.numel();
  RngState rng = next_rng(static_cast<uint64_t>(n));
  std::vector<uint32_t> bits(static_cast<size_t>(n));
  philox::fill_bits(rng.seed, rng.offset, 0, static_cast<uint64_t>(n), bits.data());
  for (int64_t i = 0; i < n; ++i) store_from_double(host.raw_data(), dtype, i, philox::uniform_from_bits(bits[i]));
  return device.is_cpu() ? host : host.to(device);
}

Tensor Tensor::randn(const Shape& shape, DType dtype, Device device) {
  Tensor host = empty(shape, dtype, Device::cpu());
  int64_t n = host.numel();
  // Box-Muller over pairs of uniforms; two draws per element keep the stream layout simple.
  RngState rng = next_rng(static_cast<uint64_t>(2 * n));
  std::vector<uint32_t> bits(static_cast<size_t>(2 * n));
  philox::fill_bits(rng.seed, rng.offset, 0, static_cast<uint64_t>(2 * n), bits.data());
  for (int64_t i = 0; i < n; ++i) {
    double u1 = (bits[2 * i] + 1.0) / 4294967297.0;  // (0, 1)
    double u2 = bits[2 * i + 1] / 4294967296.0;
    store_from_double(host.raw_data(), dtype, i, std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
  }
  return device.is_cpu() ? host : host.to(device);
}

int64_t Tensor::size(int64_t axis) const { return shape_[wrap_axis(axis, dim(), "size")]; }

bool Tensor::is_contiguous() const {
  uint64_t expected = 1;  // unsigned, as contiguous_strides computes it (no overflow for empty shapes)
  for (size_t i = shape_.size(); i-- > 0;) {
    if (shape_[i] != 1 && strides_[i] != static_cast<int64_t>(expected)) return false;
    expected *= static_cast<uint64_t>(shape_[i]);
  }
  return true;
}

std::string Tensor::meta_str() const {
  if (!defined_) return "undefined";
  return std::string(dtype_name(dtype())) + shape_str(shape_) + " on " + device().str();
}

void* Tensor::raw_data() const {
  REMAT_CHECK(defined_, "raw_data: the tensor is undefined");
  if (!storage_ || !storage_->data()) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(dtype_size(dtype()));
}

Tensor Tensor::view(const Shape& shape, const Strides& strides, int64_t offset) const {
  REMAT_CHECK(defined(), "view: the tensor is undefined");
  REMAT_CHECK(shape.size() == strides.size(), "view: expected as many strides as sizes, got sizes ", shape_str(shape),
              " and strides ", shape_str(strides));
  int64_t n = checked_numel(shape, dtype_size(dtype()), "view");
  if (n > 0) {
    // The last element the view reads must lie inside the storage.
    int64_t last = offset;
    for (size_t d = 0; d < shape.size(); ++d) {
      REMAT_CHECK(strides[d] >= 0, "view: expected non-negative strides, got ", shape_str(strides));
      last += (shape[d] - 1) * strides[d];
    }
    int64_t elements = storage_ ? static_cast<int64_t>(storage_->bytes() / dtype_size(dtype())) : 0;
    REMAT_CHECK(offset >= 0 && last < elements, "view: the view ", shape_str(shape), " with strides ",
                shape_str(strides), " at offset ", offset, " reaches element ", last, ", past the ", elements,
                " elements of its storage");
  }
  Tensor t;
  t.storage_ = storage_;
  t.shape_ = shape;
  t.strides_ = strides;
  t.offset_ = offset;
  t.dtype_ = dtype();
  t.device_ = device();
  t.defined_ = true;
  return t;
}

Tensor Tensor::over(std::shared_ptr<Storage> storage) {
  REMAT_CHECK(storage != nullptr, "Tensor::over: expected a storage, got null");
  Tensor t;
  t.dtype_ = storage->dtype();
  t.device_ = storage->device();
  t.shape_ = {static_cast<int64_t>(storage->bytes() / dtype_size(t.dtype_))};
  t.strides_ = {1};
  t.storage_ = std::move(storage);
  t.defined_ = true;
  return t;
}

Tensor Tensor::as_contiguous() const {
  REMAT_CHECK(defined_, "as_contiguous: the tensor is undefined");
  if (is_contiguous()) return detach();
  if (!device().is_cpu()) return cuda_copy_strided(*this);
  Tensor out = empty(shape_, dtype(), device());
  gather_strided(static_cast<char*>(out.raw_data()), static_cast<const char*>(raw_data()), shape_, strides_,
                 dtype_size(dtype()));
  return out;
}

Tensor Tensor::clone() const {
  Tensor src = as_contiguous();
  Tensor out = empty(shape_, dtype(), device());
  copy_bytes(out.raw_data(), device(), src.raw_data(), device(), nbytes());
  return out;
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  Tensor src = as_contiguous();
  Tensor out = empty(shape_, dtype(), device);
  copy_bytes(out.raw_data(), device, src.raw_data(), this->device(), nbytes());
  return out;
}

Tensor Tensor::to(DType target) const {
  if (target == dtype()) return *this;
  Tensor src = as_contiguous().to(Device::cpu());
  Tensor out = empty(shape_, target, Device::cpu());
  for (int64_t i = 0; i < numel(); ++i) store_from_double(out.raw_data(), target, i, load_as_double(src.raw_data(), dtype(), i));
  return device().is_cpu() ? out : out.to(device());
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = as_contiguous().to(Device::cpu());
  std::vector<T> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[i] = static_cast<T>(load_as_double(host.raw_data(), dtype(), i));
  return out;
}
template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;

double Tensor::item() const {
  REMAT_CHECK(numel() == 1, "item: expected a tensor with one element, got ", meta_str());
  return to_vector<double>()[0];
}

void Tensor::copy_(const Tensor& src) {
  REMAT_CHECK(src.shape() == shape_, "copy_: expected source shape ", shape_str(shape_), ", got ",
              shape_str(src.shape()));
  REMAT_CHECK(is_contiguous(), "copy_: destination must be contiguous, got a strided view");
  Tensor s = src.dtype() == dtype() ? src.as_contiguous() : src.to(dtype());
  copy_bytes(raw_data(), device(), s.raw_data(), s.device(), nbytes());
  if (storage_) storage_->bump_version();
}

namespace {

// Writes the value's bit pattern once and replicates it by doubling copies: a per-element
// conversion through double was a visible share of a training step (zeros for gradients).
void fill_cpu(void* base, DType dtype, int64_t n, double value) {
  if (n == 0) return;
  const size_t elem = dtype_size(dtype);
  const size_t total = static_cast<size_t>(n) * elem;
  if (value == 0.0 && !std::signbit(value)) {
    std::memset(base, 0, total);  // all-zero bits are +0 in every dtype
    return;
  }
  store_from_double(base, dtype, 0, value);
  auto* bytes = static_cast<unsigned char*>(base);
  for (size_t filled = elem; filled < total;) {
    const size_t chunk = std::min(filled, total - filled);
    std::memcpy(bytes + filled, bytes, chunk);
    filled += chunk;
  }
}

}  // namespace

void Tensor::fill_(double value) {
  REMAT_CHECK(is_contiguous(), "fill_: expected a contiguous tensor");
  if (device().is_cpu()) {
    fill_cpu(raw_data(), dtype(), numel(), value);
  } else if (value == 0.0 && !std::signbit(value)) {
    cuda_memset_zero(raw_data(), device(), nbytes());  // all-zero bits are 0 in every dtype
  } else {
    // One element converted here, its bits repeated by a kernel: a copy from the host would make
    // the host wait for the GPU (backward's seed gradient is such a fill, once per step).
    uint64_t pattern = 0;
    store_from_double(&pattern, dtype(), 0, value);
    cuda_fill(raw_data(), device(), static_cast<size_t>(numel()), dtype_size(dtype()), pattern);
  }
  if (storage_) storage_->bump_version();
}

Tensor& Tensor::set_requires_grad(bool value) {
  REMAT_CHECK(!value || is_floating(dtype()), "set_requires_grad: only floating tensors can require grad, got ",
              meta_str());
  REMAT_CHECK(is_leaf(), "set_requires_grad: only leaf tensors can change requires_grad");
  autograd_meta().requires_grad = value;
  return *this;
}

AutogradMeta& Tensor::autograd_meta() {
  if (!meta_) meta_ = std::make_shared<AutogradMeta>();
  return *meta_;
}

Tensor Tensor::grad() const { return meta_ && meta_->grad ? *meta_->grad : Tensor(); }

void Tensor::set_grad(const Tensor& g) {
  if (!g.defined()) {
    if (meta_) meta_->grad.reset();
    return;
  }
  REMAT_CHECK(g.shape() == shape_, "set_grad: expected a gradient of shape ", shape_str(shape_), ", got ",
              shape_str(g.shape()));
  autograd_meta().grad = std::make_shared<Tensor>(g);
}

void Tensor::zero_grad() {
  if (meta_) meta_->grad.reset();
}

const std::string& Tensor::tag() const {
  static const std::string none;
  return meta_ ? meta_->tag : none;
}

Tensor& Tensor::set_tag(const std::string& name) {
  autograd_meta().tag = name;
  return *this;
}

Tensor Tensor::detach() const {
  Tensor t = *this;
  t.meta_.reset();
  return t;
}

void cuda_copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n);  // runtime/cuda

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n) {
  if (n == 0) return;
  if (dst_device.is_cpu() && src_device.is_cpu()) {
    memcpy(dst, src, n);
    return;
  }
  cuda_copy_bytes(dst, dst_device, src, src_device, n);
}

}  // namespace remat
