// A tensor in host memory as files store it: an element type, a shape and the raw little-endian,
// C-order bytes. This is the exchange type of the file readers and writers (.npy, .safetensors);
// arithmetic happens elsewhere, on float spans taken from it.
#pragma once

#include <bit>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/formats/minifloat.h"

namespace nibble {

static_assert(std::endian::native == std::endian::little,
              "nibble's file formats are little-endian and are read by plain copies");

// Element types, named as safetensors spells them. F4 and F6 are sub-byte (packed) types.
enum class DType : uint8_t {
  kBool, kF4, kF6E2M3, kF6E3M2, kU8, kI8, kF8E5M2, kF8E4M3, kF8E8M0,
  kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kC64, kF64, kI64, kU64,
};

int dtype_bits(DType d);                                   // bits per element
std::string_view dtype_name(DType d);                      // "F32", "BF16", "F8_E4M3", ...
std::optional<DType> dtype_from_name(std::string_view name);  // nullopt for unknown names

// Element count of a shape (1 for a scalar, shape []). Throws std::overflow_error past int64.
int64_t shape_numel(std::span<const int64_t> shape);
// Bytes that n elements of d take; throws std::invalid_argument when packed elements do not fill
// whole bytes, std::overflow_error past int64.
int64_t dtype_bytes(DType d, int64_t n);
std::string shape_string(std::span<const int64_t> shape);  // "[2, 3]"

struct HostTensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const { return shape_numel(shape); }
  int rank() const { return static_cast<int>(shape.size()); }

  // Builders that copy typed elements in.
  static HostTensor f32(std::vector<int64_t> shape, std::span<const float> values);
  static HostTensor bf16(std::vector<int64_t> shape, std::span<const bf16_t> values);
  static HostTensor u8(std::vector<int64_t> shape, std::span<const uint8_t> values);
  // Raw bytes with a given dtype (e.g. F8_E4M3 codes); checks the byte count against the shape.
  static HostTensor raw(DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);

  // The elements as float: F32 copied, BF16 widened exactly. Throws for other dtypes.
  std::vector<float> to_f32() const;
  std::vector<bf16_t> to_bf16() const;  // BF16 only
};

}  // namespace nibble
