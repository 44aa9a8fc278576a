#include "nibble/tensor/npy.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "tensor/tensor_test_util.h"

namespace nibble {
namespace {

using test::expect_error;
using test::TempDir;

// The prefix numpy writes before a v1.0 header of `len` bytes.
std::string v1_prefix(size_t len) {
  std::string p = "\x93NUMPY";
  p += '\x01';
  p += '\x00';
  p += static_cast<char>(len & 0xFF);
  p += static_cast<char>(len >> 8);
  return p;
}

// A v1.0 file with `dict` as its header, padded as numpy pads it, followed by `data`.
std::string npy_v1(std::string dict, std::string_view data) {
  while ((10 + dict.size() + 1) % 64 != 0) dict += ' ';
  dict += '\n';
  return v1_prefix(dict.size()) + dict + std::string(data);
}

std::string f32_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

std::vector<float> random_floats(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(Npy, RoundTripsFloat32OfEveryRank) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  std::uniform_int_distribution<int64_t> dim(1, 40);
  const std::vector<std::vector<int64_t>> shapes = {
      {}, {dim(rng)}, {dim(rng), dim(rng)}, {dim(rng), dim(rng), dim(rng)}, {0, dim(rng)}};
  for (const auto& shape : shapes) {
    std::vector<float> v = random_floats(rng, static_cast<size_t>(shape_numel(shape)));
    if (!v.empty()) v[0] = -0.0f;
    const auto path = dir / "a.npy";
    write_npy(path, HostTensor::f32(shape, v));
    const std::string bytes = test::read_bytes(path);
    const size_t header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
    EXPECT_EQ((10 + header_len) % 64, 0u) << "data must start 64-byte aligned";
    const HostTensor t = read_npy(path);
    EXPECT_EQ(t.dtype, DType::kF32);
    EXPECT_EQ(t.shape, shape);
    ASSERT_EQ(t.to_f32().size(), v.size());
    EXPECT_EQ(t.bytes, HostTensor::f32(shape, v).bytes) << "bit-exact, -0 included";
  }
  EXPECT_EQ(dir.files(), std::vector<std::string>{"a.npy"}) << "no temporary file may be left";
}

TEST(Npy, Bf16TravelsAsU2) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  std::vector<bf16_t> v(48);
  for (bf16_t& x : v) x.bits = static_cast<uint16_t>(rng());
  write_npy(dir / "b.npy", HostTensor::bf16({3, 16}, v));
  const HostTensor as_u16 = read_npy(dir / "b.npy");
  EXPECT_EQ(as_u16.dtype, DType::kU16);
  const HostTensor as_bf16 = read_npy(dir / "b.npy", {.u16_as_bf16 = true});
  EXPECT_EQ(as_bf16.dtype, DType::kBF16);
  EXPECT_EQ(as_bf16.shape, (std::vector<int64_t>{3, 16}));
  EXPECT_EQ(as_bf16.bytes, as_u16.bytes);
  const std::vector<bf16_t> back = as_bf16.to_bf16();
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(back[i].bits, v[i].bits) << i;
  EXPECT_NE(test::read_bytes(dir / "b.npy").find("'<u2'"), std::string::npos);
}

TEST(Npy, RoundTripsUint8) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  std::vector<uint8_t> v(77);
  for (uint8_t& x : v) x = static_cast<uint8_t>(rng());
  write_npy(dir / "u.npy", HostTensor::u8({77}, v));
  const HostTensor t = read_npy(dir / "u.npy");
  EXPECT_EQ(t.dtype, DType::kU8);
  EXPECT_EQ(t.shape, (std::vector<int64_t>{77}));
  EXPECT_EQ(t.bytes, v);
}

TEST(Npy, ReadsHeadersAsNumpyAndOthersWriteThem) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const std::vector<float> v = random_floats(rng, 6);
  // Exactly numpy's v1.0 spelling; then variants: key order, double quotes, no trailing comma,
  // Python 2 long suffixes, a 1-tuple, versions 2.0 and 3.0.
  const std::vector<std::pair<std::string, std::vector<int64_t>>> dicts = {
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", {2, 3}},
      {"{'shape': (3, 2), 'fortran_order': False, 'descr': '<f4'}", {3, 2}},
      {"{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (6,)}", {6}},
      {"{'descr':'<f4','fortran_order':False,'shape':(1L,6L),}", {1, 6}},
  };
  for (const auto& [dict, shape] : dicts) {
    test::write_bytes(dir / "h.npy", npy_v1(dict, f32_bytes(v)));
    const HostTensor t = read_npy(dir / "h.npy");
    EXPECT_EQ(t.shape, shape) << dict;
    EXPECT_EQ(t.to_f32(), v) << dict;
  }
  for (const char major : {'\x02', '\x03'}) {
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    while ((12 + dict.size() + 1) % 64 != 0) dict += ' ';
    dict += '\n';
    std::string file = "\x93NUMPY";
    file += major;
    file += '\x00';
    for (int i = 0; i < 4; ++i) file += static_cast<char>((dict.size() >> (8 * i)) & 0xFF);
    test::write_bytes(dir / "v.npy", file + dict + f32_bytes(v));
    EXPECT_EQ(read_npy(dir / "v.npy").to_f32(), v) << "version " << int(major);
  }
}

TEST(Npy, WritesVersion2WhenTheHeaderOutgrowsVersion1) {
  TempDir dir;
  const std::vector<int64_t> shape(30000, 1);  // a 30000-dimensional single element
  const float x = 1.5f;
  write_npy(dir / "big.npy", HostTensor::f32(shape, {&x, 1}));
  const std::string bytes = test::read_bytes(dir / "big.npy");
  EXPECT_EQ(bytes[6], '\x02');
  const HostTensor t = read_npy(dir / "big.npy");
  EXPECT_EQ(t.shape, shape);
  EXPECT_EQ(t.to_f32(), std::vector<float>{1.5f});
}

TEST(Npy, RejectsBadFilesNamingThem) {
  TempDir dir;
  const std::string data = f32_bytes({1, 2, 3, 4, 5, 6});
  const std::string good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  struct Case {
    std::string name, bytes, expect;
  };
  std::string v4 = npy_v1(good, data);
  v4[6] = '\x04';
  std::string long_header = npy_v1(good, data);
  long_header[8] = '\xFF';
  const std::vector<Case> cases = {
      {"magic.npy", "PK\x03\x04 not numpy at all", "not a .npy file"},
      {"empty.npy", "", "not a .npy file"},
      {"version.npy", v4, "version 4.0"},
      {"header_trunc.npy", long_header, "truncated"},
      {"data_trunc.npy", npy_v1(good, data.substr(0, 20)), "truncated"},
      {"data_extra.npy", npy_v1(good, data + "xx"), "takes 24 bytes, the file holds 26"},
      {"fortran.npy", npy_v1("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data), "Fortran"},
      {"big_endian.npy", npy_v1("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", data), "big-endian"},
      {"f64.npy", npy_v1("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", data), "float64"},
      {"i4.npy", npy_v1("{'descr': '<i4', 'fortran_order': False, 'shape': (6,), }", data), "unsupported dtype '<i4'"},
      {"record.npy", npy_v1("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }", data), "structured"},
      {"missing.npy", npy_v1("{'descr': '<f4', 'shape': (2, 3), }", data), "lacks"},
      {"extra_key.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", data), "unexpected key 'x'"},
      {"shape.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", data), "non-negative integers"},
      {"shape_list.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3], }", data), "expected '('"},
      {"bool.npy", npy_v1("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", data), "True or False"},
      {"unterminated.npy", npy_v1("{'descr': '<f4", data), "unterminated"},
      {"garbage_after.npy", npy_v1(good + " 7", data), "after the header"},
      {"overflow.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", data), "too large"},
      {"numel_overflow.npy", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", data), "too many elements"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    test::write_bytes(dir / c.name, c.bytes);
    expect_error([&] { read_npy(dir / c.name); }, {(dir / c.name).string(), c.expect});
  }
  expect_error([&] { read_npy(dir / "absent.npy"); }, {(dir / "absent.npy").string(), "cannot open"});
}

TEST(Npy, FailedWritesLeaveExistingFilesAlone) {
  TempDir dir;
  const std::string before = "precious";
  test::write_bytes(dir / "keep.npy", before);
  const std::vector<uint8_t> codes = {1, 2, 3, 4};
  // F8_E4M3 has no .npy dtype here: rejected before anything is written.
  expect_error([&] { write_npy(dir / "keep.npy", HostTensor::raw(DType::kF8E4M3, {4}, codes)); }, {"F8_E4M3"});
  EXPECT_EQ(test::read_bytes(dir / "keep.npy"), before);
  EXPECT_EQ(dir.files(), std::vector<std::string>{"keep.npy"});
  // A directory that does not exist: the error names the target.
  const auto nowhere = dir / "no" / "such.npy";
  expect_error([&] { write_npy(nowhere, HostTensor::u8({4}, codes)); }, {nowhere.string()});
}

}  // namespace
}  // namespace nibble
