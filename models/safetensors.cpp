// safetensors encoder and validating decoder.
#include "models/safetensors.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace remat {

namespace {

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
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string bytes = buffer.str();
  REMAT_CHECK(bytes.size() >= 8, path, ": not a safetensors file (", bytes.size(), " bytes, expected at least 8)");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  REMAT_CHECK(n <= bytes.size() - 8, path, ": truncated or corrupted: header of ", n, " bytes but the file has ",
              bytes.size() - 8, " after the length");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(8, n));
  } catch (const nlohmann::json::exception& e) {
    REMAT_FAIL(path, ": corrupted header (not valid JSON): ", e.what());
  }
  REMAT_CHECK(header.is_object(), path, ": corrupted header: expected a JSON object");
  size_t data_start = 8 + n, data_size = bytes.size() - data_start;
  SafetensorsFile file;
  std::vector<std::pair<uint64_t, std::pair<std::string, Tensor>>> ordered;
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
    DType dtype = parse_st_dtype(entry["dtype"].get<std::string>(), path, name);
    Shape shape;
    for (auto& d : entry["shape"]) {
      REMAT_CHECK(d.is_number_unsigned(), path, ": tensor '", name, "' has a non-integer dimension");
      shape.push_back(d.get<int64_t>());
    }
    REMAT_CHECK(entry["data_offsets"][0].is_number_unsigned() && entry["data_offsets"][1].is_number_unsigned(), path,
                ": tensor '", name, "' has non-integer data_offsets");
    uint64_t begin = entry["data_offsets"][0].get<uint64_t>(), end = entry["data_offsets"][1].get<uint64_t>();
    uint64_t expected = static_cast<uint64_t>(numel_of(shape)) * dtype_size(dtype);
    REMAT_CHECK(begin <= end && end - begin == expected, path, ": tensor '", name, "' spans ", end - begin,
                " bytes but dtype and shape ", shape_str(shape), " need ", expected);
    REMAT_CHECK(end <= data_size, path, ": truncated: tensor '", name, "' ends at byte ", end, " of the data but only ",
                data_size, " bytes are present");
    Tensor t;
    {
      MemoryCategoryScope scope(MemoryCategory::parameter);
      t = Tensor::empty(shape, dtype);
    }
    if (expected) std::memcpy(t.raw_data(), bytes.data() + data_start + begin, expected);
    ordered.push_back({begin, {name, t}});
  }
  std::sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [offset, entry] : ordered) file.tensors.push_back(std::move(entry));
  return file;
}

}  // namespace remat
