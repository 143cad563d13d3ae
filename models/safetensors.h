// Reading and writing the safetensors format (8-byte little-endian header length, a JSON header
// naming dtype, shape and byte offsets of each tensor, then the raw bytes), so Python's
// safetensors reads remat's weights. Writes are atomic: a temporary file, then rename.
#pragma once

#include <istream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../runtime/tensor.h"

namespace remat {

struct SafetensorsFile {
  std::vector<std::pair<std::string, Tensor>> tensors;  // in file order
  std::map<std::string, std::string> metadata;          // "__metadata__" (string values)
  const Tensor& at(const std::string& name) const;      // throws naming the file's tensors
  bool contains(const std::string& name) const;
};

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});
// Validates everything as the reference implementation does and throws a clear error for a
// truncated or corrupted file: header size and JSON, names given twice, dtypes, shapes whose size
// overflows, offsets that do not match dtype and shape, gaps, overlaps, offsets past the end and
// bytes after the last tensor. Reads each tensor straight into its memory (about the file's size).
SafetensorsFile load_safetensors(const std::string& path);
// The same from a stream (seekable; `name` is what messages call it).
SafetensorsFile read_safetensors(std::istream& in, const std::string& name);

// Writes `contents` to `path` through a temporary file and a rename.
void write_file_atomically(const std::string& path, const std::string& contents);
// Throws, creating nothing, unless `path` can be written as a file: not a folder, in a folder that
// exists and is writable. `what` names the option in the message ("--out").
void check_writable_file(const std::string& path, const char* what);

}  // namespace remat
