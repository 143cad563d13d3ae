// safetensors encoder and validating decoder.
#include "models/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace remat {

namespace {

// The reference implementation's limit: a header larger than this is not a weights file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

const char* st_dtype(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
  }
  return "?";
}

DType parse_st_dtype(const std::string& s, const std::string& path, const std::string& name) {
  for (DType t : {DType::f32, DType::f64, DType::i32, DType::i64, DType::u8, DType::bf16, DType::f16})
    if (s == st_dtype(t)) return t;
  REMAT_FAIL(path, ": tensor '", name, "' has dtype '", s, "'; expected one of F32, F64, I32, I64, U8, BF16, F16");
}

}  // namespace

const Tensor& SafetensorsFile::at(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return t;
  std::string names;
  for (size_t i = 0; i < tensors.size() && i < 8; ++i) names += (i ? ", " : "") + tensors[i].first;
  REMAT_FAIL("safetensors: no tensor named '", name, "' (the file has ", tensors.size(), ": ", names,
             tensors.size() > 8 ? ", ..." : "", ")");
}

bool SafetensorsFile::contains(const std::string& name) const {
  for (const auto& entry : tensors)
    if (entry.first == name) return true;
  return false;
}

void check_writable_file(const std::string& path, const char* what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  REMAT_CHECK(!path.empty(), what, ": expected a file name");
  REMAT_CHECK(!fs::is_directory(path, ec), what, " ", path, ": is a folder; expected a file name");
  fs::path folder = fs::absolute(fs::path(path)).parent_path();
  REMAT_CHECK(fs::is_directory(folder, ec), what, " ", path, ": the folder ", folder.string(), " does not exist");
  REMAT_CHECK(::access(folder.c_str(), W_OK) == 0, what, " ", path, ": the folder ", folder.string(), " is not writable");
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  std::filesystem::path target(path);
  std::filesystem::path tmp = target;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    REMAT_CHECK(out.good(), "cannot write ", tmp.string(), ": ", std::strerror(errno));
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    out.flush();
    REMAT_CHECK(out.good(), "writing ", tmp.string(), " failed: ", std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, target, ec);
  REMAT_CHECK(!ec, "cannot rename ", tmp.string(), " to ", path, ": ", ec.message());
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  std::vector<Tensor> host;
  for (const auto& [name, t] : tensors) {
    REMAT_CHECK(name != "__metadata__" && !header.contains(name), "save_safetensors: duplicate or reserved name '", name, "'");
    Tensor h = t.as_contiguous().to(Device::cpu());
    header[name] = {{"dtype", st_dtype(h.dtype())}, {"shape", h.shape()}, {"data_offsets", {offset, offset + h.nbytes()}}};
    offset += h.nbytes();
    host.push_back(h);
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::string out;
  out.reserve(8 + json.size() + offset);
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += json;
  for (const Tensor& h : host) out.append(static_cast<const char*>(h.raw_data()), h.nbytes());
  write_file_atomically(path, out);
}

SafetensorsFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REMAT_CHECK(in.good(), "cannot open ", path, ": ", std::strerror(errno));
  return read_safetensors(in, path);
}

SafetensorsFile read_safetensors(std::istream& in, const std::string& path) {
  in.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  REMAT_CHECK(file_size >= 8, path, ": not a safetensors file (", file_size, " bytes, expected at least 8)");
  unsigned char length[8];
  in.read(reinterpret_cast<char*>(length), 8);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(length[i]) << (8 * i);
  REMAT_CHECK(n <= file_size - 8, path, ": truncated or corrupted: header of ", n, " bytes but the file has ",
              file_size - 8, " after the length");
  REMAT_CHECK(n <= kMaxHeaderBytes, path, ": header of ", n, " bytes; at most ", kMaxHeaderBytes, " are accepted");
  std::string text(n, '\0');
  in.read(text.data(), static_cast<std::streamsize>(n));
  REMAT_CHECK(in.good(), path, ": reading the header failed: ", std::strerror(errno));
  REMAT_CHECK(n >= 2 && text[0] == '{', path, ": corrupted header: expected a JSON object starting with '{'");

  // Duplicate names are an error (JSON parsers keep the last one silently).
  std::set<std::string> seen;
  std::string duplicate;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      if (depth == 1 && event == nlohmann::json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second &&
          duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    });
  } catch (const nlohmann::json::exception& e) {
    REMAT_FAIL(path, ": corrupted header (not valid JSON): ", e.what());
  }
  REMAT_CHECK(duplicate.empty(), path, ": the header names '", duplicate, "' twice");
  REMAT_CHECK(header.is_object(), path, ": corrupted header: expected a JSON object");

  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  SafetensorsFile file;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      REMAT_CHECK(entry.is_object(), path, ": __metadata__ must be an object");
      for (auto& [k, v] : entry.items()) {
        REMAT_CHECK(v.is_string(), path, ": __metadata__ values must be strings ('", k, "' is not)");
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    REMAT_CHECK(entry.is_object() && entry.contains("dtype") && entry.contains("shape") && entry.contains("data_offsets") &&
                    entry["dtype"].is_string() && entry["shape"].is_array() && entry["data_offsets"].is_array() &&
                    entry["data_offsets"].size() == 2,
                path, ": corrupted entry for tensor '", name, "': expected dtype, shape and data_offsets [begin, end]");
    Entry e{name, parse_st_dtype(entry["dtype"].get<std::string>(), path, name), {}, 0, 0};
    for (auto& d : entry["shape"]) {
      REMAT_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), path, ": tensor '",
                  name, "' has a dimension that is not a size: ", d.dump());
      e.shape.push_back(d.get<int64_t>());
    }
    REMAT_CHECK(entry["data_offsets"][0].is_number_unsigned() && entry["data_offsets"][1].is_number_unsigned(), path,
                ": tensor '", name, "' has non-integer data_offsets");
    e.begin = entry["data_offsets"][0].get<uint64_t>(), e.end = entry["data_offsets"][1].get<uint64_t>();
    std::string what = path + ": tensor '" + name + "'";
    uint64_t expected = static_cast<uint64_t>(checked_numel(e.shape, dtype_size(e.dtype), what.c_str())) * dtype_size(e.dtype);
    REMAT_CHECK(e.begin <= e.end && e.end - e.begin == expected, path, ": tensor '", name, "' spans data_offsets [",
                e.begin, ", ", e.end, "] but dtype and shape ", shape_str(e.shape), " need ", expected, " bytes");
    entries.push_back(std::move(e));
  }
  // The tensors tile the data exactly, in offset order: no gap, no overlap, nothing after the last.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  const uint64_t data_start = 8 + n, data_size = file_size - data_start;
  uint64_t at = 0;
  for (const Entry& e : entries) {
    REMAT_CHECK(e.begin >= at, path, ": tensor '", e.name, "' at data_offsets [", e.begin, ", ", e.end,
                "] overlaps the tensor before it (which ends at ", at, ")");
    REMAT_CHECK(e.begin == at, path, ": a gap of ", e.begin - at, " bytes before tensor '", e.name, "' (data_offsets [",
                e.begin, ", ", e.end, "], the tensor before it ends at ", at, ")");
    REMAT_CHECK(e.end <= data_size, path, ": truncated: tensor '", e.name, "' ends at byte ", e.end, " of the data but only ",
                data_size, " bytes are present");
    at = e.end;
  }
  REMAT_CHECK(at == data_size, path, ": ", data_size - at, " bytes after the last tensor (the data is ", data_size,
              " bytes, the tensors cover ", at, ")");
  // Each tensor is read straight into its own memory: loading needs about the file's size.
  for (const Entry& e : entries) {
    Tensor t;
    {
      MemoryCategoryScope scope(MemoryCategory::parameter);
      t = Tensor::empty(e.shape, e.dtype);
    }
    if (e.end > e.begin) {
      in.seekg(static_cast<std::streamoff>(data_start + e.begin));
      in.read(static_cast<char*>(t.raw_data()), static_cast<std::streamsize>(e.end - e.begin));
      REMAT_CHECK(in.good(), path, ": reading tensor '", e.name, "' failed: ", std::strerror(errno));
    }
    file.tensors.emplace_back(e.name, t);
  }
  return file;
}

}  // namespace remat
