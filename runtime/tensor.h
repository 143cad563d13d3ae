// Tensor: a handle (shape, strides, offset, dtype) over refcounted Storage on a device.
// Copies of a handle share storage and autograd state; views share storage only.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "allocator.h"
#include "device.h"
#include "dtype.h"
#include "error.h"
#include "shape.h"

namespace remat {

// Bytes on one device. The version counter counts in-place writes, so that autograd can tell
// when a tensor it saved was changed after it was saved.
class Storage {
 public:
  Storage(size_t bytes, Device device, MemoryCategory category, DType dtype);
  // Bytes from a given allocator (pinned host memory: device cpu, allocator cuda_pinned_allocator()).
  Storage(size_t bytes, Device device, MemoryCategory category, DType dtype, Allocator& allocator);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  MemoryCategory category() const { return category_; }
  // The bytes now hold something of another category (a backward wrote a gradient over an
  // activation it was the last to read): counted under that one from now on.
  void set_category(MemoryCategory category);
  // The element type of every tensor viewing these bytes (views never reinterpret).
  DType dtype() const { return dtype_; }
  uint64_t version() const { return version_; }
  void bump_version() { ++version_; }
  // Creation order over every storage of the process: tells those made before a point (see
  // next_storage_serial) from those made after, e.g. a step's data from its activations.
  uint64_t serial() const { return serial_; }
  // Moves the bytes to another device in place: every tensor and view over this storage follows
  // (how Module::to moves parameters that layers hold by handle).
  void move_to(Device device);
  // Takes over `other`'s bytes, device and dtype in place (`other` gets these and frees them):
  // how Module::to(dtype) converts a parameter that every handle follows. Counts as a write.
  void take_contents(Storage& other);

  // A copy of these bytes in another dtype kept with them (autocast's compute-dtype copy of a
  // parameter, autograd/cast_cache.h): null when there is none in `dtype` or these bytes were
  // written since it was kept (the version moved on). Moving or converting the bytes drops it; it
  // dies with them. Not synchronised: its one user, the cast cache, holds a lock around these.
  const std::shared_ptr<Storage>& converted_copy() const { return converted_; }
  bool converted_copy_current(DType dtype) const;
  void keep_converted_copy(std::shared_ptr<Storage> copy);  // current at this version
  void mark_converted_copy_current() { converted_version_ = version_; }
  void drop_converted_copy() { converted_.reset(); }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
  Allocator* allocator_;
  MemoryCategory category_;
  DType dtype_;
  uint64_t version_ = 0;
  uint64_t serial_ = 0;
  std::shared_ptr<Storage> converted_;
  uint64_t converted_version_ = 0;
};

// The serial the next storage made will get.
uint64_t next_storage_serial();

class Tensor;
class Graph;  // autograd/graph.h: only named here, so that runtime/ includes nothing above it

// Autograd state of a tensor handle. Lives here as plain data; autograd/ gives it meaning.
struct AutogradMeta {
  bool requires_grad = false;
  std::shared_ptr<Tensor> grad;  // accumulated gradient of a leaf
  std::shared_ptr<Graph> graph;  // the graph that recorded this tensor, which it keeps alive (null for leaves)
  int64_t value_id = -1;         // the tensor's value in that graph
  std::string tag;               // user name, for policies that save or recompute by name
};

class Tensor {
 public:
  Tensor() = default;  // an undefined tensor

  // Factories. New storage is counted under current_memory_category().
  static Tensor empty(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor scalar(double value, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor arange(int64_t n, DType dtype = DType::f32, Device device = Device::cpu());
  // Host memory the GPU copies to and from asynchronously (page-locked); plain host memory in a
  // build without CUDA or on a machine without a GPU.
  static Tensor empty_pinned(const Shape& shape, DType dtype = DType::f32);
  // Philox draws from the global stream (runtime/random.h).
  static Tensor rand(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  static Tensor randn(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu());
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape, Device device = Device::cpu());

  bool defined() const { return defined_; }
  const Shape& shape() const { return shape_; }
  const Strides& strides() const { return strides_; }
  int64_t offset() const { return offset_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t axis) const;
  int64_t numel() const { return numel_of(shape_); }
  // Read from the storage, like the device, so that Module::to(dtype) reaches every handle.
  DType dtype() const { return storage_ ? storage_->dtype() : dtype_; }
  Device device() const { return storage_ ? storage_->device() : device_; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  uint64_t version() const { return storage_ ? storage_->version() : 0; }
  std::string meta_str() const;  // "f32[2,3] on cpu"

  // Typed pointer to the first element (CPU or device); checks the dtype.
  template <typename T> T* data() const;
  void* raw_data() const;

  // A contiguous tensor over all of `storage` (its dtype and device): view() it for any other layout.
  static Tensor over(std::shared_ptr<Storage> storage);

  // A view over the same storage.
  Tensor view(const Shape& shape, const Strides& strides, int64_t offset) const;
  // Itself if contiguous, else a contiguous copy. Plain data: no autograd history.
  Tensor as_contiguous() const;
  // Deep copies (no autograd history).
  Tensor clone() const;
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;
  // Element values as T (any dtype, any layout), through the host.
  template <typename T> std::vector<T> to_vector() const;
  double item() const;  // the single element as double

  // In-place writes outside autograd (bump the version counter).
  void copy_(const Tensor& src);
  void fill_(double value);

  // Autograd state (see autograd/).
  bool requires_grad() const { return meta_ && meta_->requires_grad; }
  Tensor& set_requires_grad(bool value = true);
  bool is_leaf() const { return !meta_ || !meta_->graph; }
  Tensor grad() const;           // undefined when none was accumulated
  void set_grad(const Tensor& g);
  void zero_grad();              // drops the gradient (frees its memory)
  const std::string& tag() const;
  Tensor& set_tag(const std::string& name);
  AutogradMeta& autograd_meta();  // created on first use
  const std::shared_ptr<AutogradMeta>& autograd_meta_ptr() const { return meta_; }
  Tensor detach() const;  // same storage, no autograd state

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  Strides strides_;
  int64_t offset_ = 0;
  DType dtype_ = DType::f32;
  bool defined_ = false;
  Device device_;
  std::shared_ptr<AutogradMeta> meta_;
};

// Copies n bytes between devices (either may be CUDA). Synchronous.
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t n);

template <typename T>
T* Tensor::data() const {
  REMAT_CHECK(dtype() == dtype_of<T>::value, "data<", dtype_name(dtype_of<T>::value), ">: tensor is ",
              dtype_name(dtype()));
  return static_cast<T*>(raw_data());
}

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape, Device device) {
  REMAT_CHECK(static_cast<int64_t>(values.size()) == numel_of(shape), "from_vector: expected ",
              numel_of(shape), " values for shape ", shape_str(shape), ", got ", values.size());
  Tensor host = empty(shape, dtype_of<T>::value, Device::cpu());
  if (!values.empty()) memcpy(host.raw_data(), values.data(), values.size() * sizeof(T));
  return device.is_cpu() ? host : host.to(device);
}

}  // namespace remat
