#include "nibble/tensor/safetensors.h"

#include <gtest/gtest.h>

#include <random>

#include "tensor/tensor_test_util.h"

namespace nibble {
namespace {

using test::expect_error;
using test::TempDir;

HostTensor random_tensor(std::mt19937_64& rng, DType dtype, std::vector<int64_t> shape) {
  std::vector<uint8_t> bytes(static_cast<size_t>(dtype_bytes(dtype, shape_numel(shape))));
  for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
  return HostTensor::raw(dtype, std::move(shape), std::move(bytes));
}

TEST(Safetensors, RoundTripsTensorsOfManyDtypesWithMetadata) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  std::uniform_int_distribution<int64_t> dim(1, 24);
  std::vector<NamedTensor> tensors = {
      {"layer.0.weight", random_tensor(rng, DType::kF32, {dim(rng), dim(rng)})},
      {"layer.0.bias", random_tensor(rng, DType::kBF16, {dim(rng)})},
      {"codes", random_tensor(rng, DType::kU8, {dim(rng), 3})},
      {"scales", random_tensor(rng, DType::kF8E4M3, {dim(rng)})},
      {"mx_scales", random_tensor(rng, DType::kF8E8M0, {5})},
      {"packed_fp4", random_tensor(rng, DType::kF4, {3, 2 * dim(rng)})},
      {"step", random_tensor(rng, DType::kI64, {})},
      {"empty", random_tensor(rng, DType::kF32, {0, 4})},
      {"g", random_tensor(rng, DType::kF32, {})},
  };
  const std::map<std::string, std::string> metadata = {{"format", "nvfp4"}, {"note", "ünïcode ok"}};
  const auto path = dir / "t.safetensors";
  write_safetensors(path, tensors, metadata);
  EXPECT_EQ(dir.files(), std::vector<std::string>{"t.safetensors"});

  SafetensorsReader reader(path);
  EXPECT_EQ(reader.metadata(), metadata);
  ASSERT_EQ(reader.entries().size(), tensors.size());
  const std::string bytes = test::read_bytes(path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(header_size % 8, 0u) << "the data section must start 8-byte aligned";
  for (const SafetensorsEntry& e : reader.entries()) {
    const int bytes_per_element = std::max(1, dtype_bits(e.dtype) / 8);
    EXPECT_EQ(e.begin % bytes_per_element, 0) << e.name << " is not aligned to its element size";
  }
  for (const auto& [name, t] : tensors) {
    const HostTensor back = reader.read(name);
    EXPECT_EQ(back.dtype, t.dtype) << name;
    EXPECT_EQ(back.shape, t.shape) << name;
    EXPECT_EQ(back.bytes, t.bytes) << name;
  }
}

TEST(Safetensors, ReadsAFileWrittenByHand) {
  TempDir dir;
  // Tensors listed out of data order, with no metadata, as another writer may produce them.
  const float a[2] = {1.5f, -2.0f};
  const uint16_t b[3] = {0x3F80, 0xC000, 0x7F80};  // BF16 1, -2, +inf
  std::string data(reinterpret_cast<const char*>(b), 6);
  data += std::string(reinterpret_cast<const char*>(a), 8);
  test::write_raw_safetensors(dir / "h.safetensors",
                              R"({"a":{"dtype":"F32","shape":[1,2],"data_offsets":[6,14]},)"
                              R"("b":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}  )",
                              data);
  SafetensorsReader r(dir / "h.safetensors");
  EXPECT_TRUE(r.metadata().empty());
  EXPECT_EQ(r.entries()[0].name, "b");
  EXPECT_EQ(r.read("a").to_f32(), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(r.read("b").to_f32(), (std::vector<float>{1.0f, -2.0f, INFINITY}));
  EXPECT_EQ(r.find("c"), nullptr);
  expect_error([&] { r.read("c"); }, {"h.safetensors", "no tensor named 'c'"});
}

TEST(Safetensors, RejectsBadFilesNamingThem) {
  TempDir dir;
  const std::string d24(24, '\x11');
  const auto t = [](const std::string& body) { return "{" + body + "}"; };
  const std::string ok_a = R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})";
  struct Case {
    std::string name, header, data, expect;
  };
  const std::vector<Case> cases = {
      {"json", "{\"a\": ", d24, "not valid JSON"},
      {"array", "[1, 2]", d24, "not a JSON object"},
      {"dup", t(ok_a + "," + ok_a), d24, "'a' appears twice"},
      {"dtype", t(R"("a":{"dtype":"F12","shape":[2,3],"data_offsets":[0,24]})"), d24, "unknown dtype 'F12'"},
      {"dtype_type", t(R"("a":{"dtype":7,"shape":[2,3],"data_offsets":[0,24]})"), d24, "'dtype' is not a string"},
      {"shape_neg", t(R"("a":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]})"), d24, "not a non-negative integer"},
      {"shape_float", t(R"("a":{"dtype":"F32","shape":[2.5,3],"data_offsets":[0,24]})"), d24, "not a non-negative integer"},
      {"shape_type", t(R"("a":{"dtype":"F32","shape":6,"data_offsets":[0,24]})"), d24, "'shape' is not an array"},
      {"offsets_len", t(R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0]})"), d24, "two non-negative integers"},
      {"offsets_back", t(R"("a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]})"), d24, "end before they begin"},
      {"size", t(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,24]})"), d24, "F32 [2, 2] takes 16"},
      {"f4_odd", t(R"("a":{"dtype":"F4","shape":[3],"data_offsets":[0,24]})"), d24, "do not fill whole bytes"},
      {"missing", t(R"("a":{"dtype":"F32","shape":[2,3]})"), d24, "needs 'dtype', 'shape' and 'data_offsets'"},
      {"extra_field", t(R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"x":1})"), d24, "unexpected field 'x'"},
      {"entry_type", t(R"("a":[1])"), d24, "not an object"},
      {"meta", t(R"("__metadata__":{"k":1},)" + ok_a), d24, "__metadata__['k'] is not a string"},
      {"meta_type", t(R"("__metadata__":"x",)" + ok_a), d24, "__metadata__ must be an object"},
      {"overlap", t(R"("a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]})"),
       std::string(20, '\0'), "overlap"},
      {"gap", t(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]})"),
       d24, "gap of 8 unused bytes before tensor 'b'"},
      {"not_at_0", t(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]})"), std::string(12, '\0'), "gap of 4"},
      {"truncated", t(ok_a), d24.substr(0, 20), "past the end of the data (20 bytes)"},
      {"trailing", t(ok_a), d24 + "abcd", "trailing bytes"},
      {"bad_utf8", "{\"a\xff\": 1}", d24, "not valid JSON"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const auto path = dir / (c.name + ".safetensors");
    test::write_raw_safetensors(path, c.header, c.data);
    expect_error([&] { SafetensorsReader r(path); }, {path.string(), c.expect});
  }
  // Damage to the 8-byte size itself.
  test::write_bytes(dir / "tiny.safetensors", "{}");
  expect_error([&] { SafetensorsReader r(dir / "tiny.safetensors"); }, {"tiny.safetensors", "less than the 8-byte"});
  std::string past(8, '\0');
  past[0] = '\x40';  // 64-byte header in a 10-byte file
  test::write_bytes(dir / "past.safetensors", past + "{}");
  expect_error([&] { SafetensorsReader r(dir / "past.safetensors"); }, {"past.safetensors", "runs past the end"});
  std::string huge(8, '\0');
  huge[4] = '\x01';  // 2^32 bytes
  test::write_bytes(dir / "huge.safetensors", huge + "{}");
  expect_error([&] { SafetensorsReader r(dir / "huge.safetensors"); }, {"huge.safetensors", "100 MB"});
  expect_error([&] { SafetensorsReader r(dir / "absent.safetensors"); }, {"absent.safetensors", "cannot open"});
}

TEST(Safetensors, WriterRejectsBadInputAndKeepsTheOldFile) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const auto path = dir / "out.safetensors";
  test::write_bytes(path, "old contents");
  const HostTensor x = random_tensor(rng, DType::kF32, {4});
  HostTensor broken = x;
  broken.bytes.pop_back();
  expect_error([&] { write_safetensors(path, {{"x", x}, {"x", x}}); }, {"out.safetensors", "'x' given twice"});
  expect_error([&] { write_safetensors(path, {{"__metadata__", x}}); }, {"out.safetensors", "invalid tensor name"});
  expect_error([&] { write_safetensors(path, {{"", x}}); }, {"invalid tensor name"});
  expect_error([&] { write_safetensors(path, {{"b", broken}}); }, {"out.safetensors", "'b' has 15 bytes"});
  EXPECT_EQ(test::read_bytes(path), "old contents");
  EXPECT_EQ(dir.files(), std::vector<std::string>{"out.safetensors"});
  write_safetensors(path, {{"x", x}});
  EXPECT_EQ(SafetensorsReader(path).read("x").bytes, x.bytes);
}

}  // namespace
}  // namespace nibble
