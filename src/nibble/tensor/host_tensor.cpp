#include "nibble/tensor/host_tensor.h"

#include <array>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace nibble {
namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  int bits;
};

constexpr std::array<DTypeInfo, 20> kDTypes{{
    {DType::kBool, "BOOL", 8},       {DType::kF4, "F4", 4},
    {DType::kF6E2M3, "F6_E2M3", 6},  {DType::kF6E3M2, "F6_E3M2", 6},
    {DType::kU8, "U8", 8},           {DType::kI8, "I8", 8},
    {DType::kF8E5M2, "F8_E5M2", 8},  {DType::kF8E4M3, "F8_E4M3", 8},
    {DType::kF8E8M0, "F8_E8M0", 8},  {DType::kI16, "I16", 16},
    {DType::kU16, "U16", 16},        {DType::kF16, "F16", 16},
    {DType::kBF16, "BF16", 16},      {DType::kI32, "I32", 32},
    {DType::kU32, "U32", 32},        {DType::kF32, "F32", 32},
    {DType::kC64, "C64", 64},        {DType::kF64, "F64", 64},
    {DType::kI64, "I64", 64},        {DType::kU64, "U64", 64},
}};

const DTypeInfo& info(DType d) {
  for (const DTypeInfo& i : kDTypes)
    if (i.dtype == d) return i;
  throw std::logic_error("unknown DType value");
}

}  // namespace

int dtype_bits(DType d) { return info(d).bits; }
std::string_view dtype_name(DType d) { return info(d).name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const DTypeInfo& i : kDTypes)
    if (i.name == name) return i.dtype;
  return std::nullopt;
}

int64_t shape_numel(std::span<const int64_t> shape) {
  int64_t n = 1;
  for (const int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("negative dimension in shape " + shape_string(shape));
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d)
      throw std::overflow_error("shape " + shape_string(shape) + " has too many elements");
    n *= d;
  }
  return n;
}

int64_t dtype_bytes(DType d, int64_t n) {
  const int bits = dtype_bits(d);
  if (n > std::numeric_limits<int64_t>::max() / bits)
    throw std::overflow_error(std::to_string(n) + " elements of " + std::string(dtype_name(d)) + " overflow");
  const int64_t total = n * bits;
  if (total % 8 != 0)
    throw std::invalid_argument(std::to_string(n) + " elements of " + std::string(dtype_name(d)) +
                                " do not fill whole bytes");
  return total / 8;
}

std::string shape_string(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

HostTensor HostTensor::raw(DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  const int64_t expected = dtype_bytes(dtype, shape_numel(shape));
  if (static_cast<int64_t>(bytes.size()) != expected)
    throw std::invalid_argument("a " + std::string(dtype_name(dtype)) + " tensor of shape " + shape_string(shape) +
                                " takes " + std::to_string(expected) + " bytes, not " +
                                std::to_string(bytes.size()));
  return HostTensor{dtype, std::move(shape), std::move(bytes)};
}

template <typename T>
static HostTensor typed(DType dtype, std::vector<int64_t> shape, std::span<const T> values) {
  std::vector<uint8_t> bytes(values.size_bytes());
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return HostTensor::raw(dtype, std::move(shape), std::move(bytes));
}

HostTensor HostTensor::f32(std::vector<int64_t> shape, std::span<const float> values) {
  return typed(DType::kF32, std::move(shape), values);
}
HostTensor HostTensor::bf16(std::vector<int64_t> shape, std::span<const bf16_t> values) {
  return typed(DType::kBF16, std::move(shape), values);
}
HostTensor HostTensor::u8(std::vector<int64_t> shape, std::span<const uint8_t> values) {
  return typed(DType::kU8, std::move(shape), values);
}

std::vector<float> HostTensor::to_f32() const {
  const size_t n = static_cast<size_t>(numel());
  std::vector<float> out(n);
  if (dtype == DType::kF32) {
    if (n) std::memcpy(out.data(), bytes.data(), n * sizeof(float));
  } else if (dtype == DType::kBF16) {
    for (size_t i = 0; i < n; ++i) {
      uint16_t bits;
      std::memcpy(&bits, bytes.data() + 2 * i, 2);
      out[i] = BF16::decode(bits);
    }
  } else {
    throw std::invalid_argument("a " + std::string(dtype_name(dtype)) + " tensor is not F32 or BF16");
  }
  return out;
}

std::vector<bf16_t> HostTensor::to_bf16() const {
  if (dtype != DType::kBF16)
    throw std::invalid_argument("a " + std::string(dtype_name(dtype)) + " tensor is not BF16");
  std::vector<bf16_t> out(static_cast<size_t>(numel()));
  if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(bf16_t));
  return out;
}

}  // namespace nibble
