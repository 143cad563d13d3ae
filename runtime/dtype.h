// Element types: f32 everywhere, f64 on CPU for gradient checks, integers for indices, bf16/f16 storage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace remat {

enum class DType : uint8_t { f32, f64, i32, i64, u8, bf16, f16 };

inline constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
    case DType::bf16: return 2;
    case DType::f16: return 2;
  }
  return 0;
}

inline constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
  }
  return "?";
}

inline constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16;
}
inline constexpr bool is_integer(DType t) { return t == DType::i32 || t == DType::i64 || t == DType::u8; }

// The type a floating-point tensor's sums, statistics and losses are kept in: f64 stays f64, and
// f32, bf16 and f16 accumulate in f32 (bf16's 8-bit mantissa would lose a long sum's small terms).
inline constexpr DType accumulation_dtype(DType t) { return t == DType::f64 ? DType::f64 : DType::f32; }

// Parses "f32", "f64", ...; throws listing the accepted names otherwise.
DType parse_dtype(const std::string& name);

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };

}  // namespace remat
