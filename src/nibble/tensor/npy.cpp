#include "nibble/tensor/npy.h"

#include <cctype>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "nibble/tensor/atomic_file.h"

namespace nibble {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
constexpr size_t kAlign = 64;  // numpy pads the header so the data starts 64-byte aligned

struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

// Parses the header's Python dict literal. The grammar is the small subset numpy writes: string
// keys; string, True/False and tuple-of-int values; optional trailing commas; spaces anywhere.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& file) : s_(text), file_(file) {}

  NpyHeader parse() {
    NpyHeader h;
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    while (!peek_is('}')) {
      const std::string key = parse_string();
      expect(':');
      if (key == "descr") {
        if (peek_is('[')) fail("structured (record) dtypes are not supported");
        h.descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = parse_bool();
        have_order = true;
      } else if (key == "shape") {
        h.shape = parse_shape();
        have_shape = true;
      } else {
        fail("unexpected key '" + key + "' in the header");
      }
      if (!consume(',')) break;
    }
    expect('}');
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected text after the header dict");
    if (!have_descr || !have_order || !have_shape)
      fail("the header lacks one of 'descr', 'fortran_order', 'shape'");
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error(file_ + ": bad .npy header: " + why);
  }
  void skip_ws() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool peek_is(char c) {
    skip_ws();
    return pos_ < s_.size() && s_[pos_] == c;
  }
  bool consume(char c) {
    if (!peek_is(c)) return false;
    ++pos_;
    return true;
  }
  void expect(char c) {
    if (!consume(c)) fail(std::string("expected '") + c + "' at offset " + std::to_string(pos_));
  }
  std::string parse_string() {
    skip_ws();
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) fail("expected a quoted string");
    const char quote = s_[pos_++];
    const size_t end = s_.find(quote, pos_);
    if (end == std::string_view::npos) fail("unterminated string");
    std::string out(s_.substr(pos_, end - pos_));
    if (out.find('\\') != std::string::npos) fail("escapes in strings are not supported");
    pos_ = end + 1;
    return out;
  }
  bool parse_bool() {
    skip_ws();
    for (const auto& [word, value] : {std::pair{std::string_view("True"), true}, {std::string_view("False"), false}}) {
      if (s_.substr(pos_, word.size()) == word) {
        pos_ += word.size();
        return value;
      }
    }
    fail("'fortran_order' must be True or False");
  }
  int64_t parse_int() {
    skip_ws();
    const size_t start = pos_;
    int64_t v = 0;
    while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
      const int digit = s_[pos_++] - '0';
      if (v > (std::numeric_limits<int64_t>::max() - digit) / 10) fail("a dimension is too large");
      v = v * 10 + digit;
    }
    if (pos_ == start) fail("'shape' must be a tuple of non-negative integers");
    if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_;  // Python 2 long suffix
    return v;
  }
  std::vector<int64_t> parse_shape() {
    std::vector<int64_t> shape;
    expect('(');
    while (!peek_is(')')) {
      shape.push_back(parse_int());
      if (!consume(',')) break;
    }
    expect(')');
    return shape;
  }

  std::string_view s_;
  const std::string& file_;
  size_t pos_ = 0;
};

std::vector<uint8_t> read_whole_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path.string() + ": cannot open for reading");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  in.seekg(0);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    throw std::runtime_error(path.string() + ": read failed");
  return bytes;
}

uint32_t read_le(const uint8_t* p, int n) {
  uint32_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The DType of a descr string, or an error that says what the file holds.
DType dtype_of(const std::string& descr, const NpyReadOptions& options, const std::string& file) {
  const auto fail = [&](const std::string& why) -> DType {
    throw std::runtime_error(file + ": unsupported dtype '" + descr + "': " + why);
  };
  if (descr.size() < 2) return fail("not a numpy type string");
  const char order = descr[0];
  const std::string kind = descr.substr(1);
  if (kind == "u1" && (order == '|' || order == '<' || order == '>' || order == '=')) return DType::kU8;
  if (order == '>') return fail("big-endian data is not supported (save it with dtype '<" + kind + "')");
  if (order != '<') return fail("expected a little-endian type such as '<f4'");
  if (kind == "f4") return DType::kF32;
  if (kind == "u2") return options.u16_as_bf16 ? DType::kBF16 : DType::kU16;
  if (kind == "f8") return fail("float64 is not supported: save float32 (x.astype(numpy.float32))");
  if (kind == "f2") return fail("float16 is not supported: save float32, or bfloat16 bits as '<u2'");
  return fail("supported are '<f4' (float32), '<u2' (uint16, or bfloat16 bits) and '|u1' (uint8)");
}

std::string descr_of(DType d) {
  switch (d) {
    case DType::kF32: return "<f4";
    case DType::kU8: return "|u1";
    case DType::kU16:
    case DType::kBF16: return "<u2";
    default:
      throw std::invalid_argument(std::string(".npy files hold F32, U8, U16 or BF16 here, not ") +
                                  std::string(dtype_name(d)));
  }
}

}  // namespace

bool is_npy_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  char head[kMagicSize] = {};
  return in.read(head, kMagicSize) && std::memcmp(head, kMagic, kMagicSize) == 0;
}

HostTensor read_npy(const std::filesystem::path& path, const NpyReadOptions& options) {
  const std::string file = path.string();
  const std::vector<uint8_t> bytes = read_whole_file(path);
  if (bytes.size() < kMagicSize + 2 || std::memcmp(bytes.data(), kMagic, kMagicSize) != 0)
    throw std::runtime_error(file + ": not a .npy file (it does not start with the \\x93NUMPY magic)");
  const int major = bytes[6], minor = bytes[7];
  if (!((major == 1 || major == 2 || major == 3) && minor == 0))
    throw std::runtime_error(file + ": unsupported .npy format version " + std::to_string(major) + "." +
                             std::to_string(minor) + " (1.0, 2.0 and 3.0 are supported)");
  const size_t len_size = major == 1 ? 2 : 4;
  const size_t prefix = kMagicSize + 2 + len_size;
  if (bytes.size() < prefix) throw std::runtime_error(file + ": truncated .npy header");
  const size_t header_len = read_le(bytes.data() + 8, static_cast<int>(len_size));
  if (header_len > bytes.size() - prefix)
    throw std::runtime_error(file + ": truncated: the header is " + std::to_string(header_len) +
                             " bytes but the file ends " + std::to_string(bytes.size() - prefix) +
                             " bytes after its start");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + prefix), header_len);
  const NpyHeader header = HeaderParser(text, file).parse();
  if (header.fortran_order)
    throw std::runtime_error(file + ": Fortran-order arrays are not supported (save a C-order array: "
                                    "numpy.ascontiguousarray)");
  const DType dtype = dtype_of(header.descr, options, file);
  int64_t need;
  try {
    need = dtype_bytes(dtype, shape_numel(header.shape));
  } catch (const std::exception& e) {
    throw std::runtime_error(file + ": " + e.what());
  }
  const size_t data_start = prefix + header_len;
  const size_t have = bytes.size() - data_start;
  if (static_cast<uint64_t>(need) != have)
    throw std::runtime_error(file + ": " + (static_cast<uint64_t>(need) > have ? "truncated: " : "corrupt: ") +
                             "a " + header.descr + " array of shape " + shape_string(header.shape) + " takes " +
                             std::to_string(need) + " bytes, the file holds " + std::to_string(have) +
                             " after the header");
  return HostTensor::raw(dtype, header.shape, std::vector<uint8_t>(bytes.begin() + data_start, bytes.end()));
}

void write_npy(const std::filesystem::path& path, const HostTensor& tensor) {
  if (static_cast<int64_t>(tensor.bytes.size()) != dtype_bytes(tensor.dtype, tensor.numel()))
    throw std::invalid_argument(path.string() + ": the tensor's byte count does not match its shape");
  std::string dict = "{'descr': '" + descr_of(tensor.dtype) + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < tensor.shape.size(); ++i) dict += std::to_string(tensor.shape[i]) + ", ";
  if (tensor.shape.size() > 1) dict.resize(dict.size() - 2);  // (n,) for one dimension, (a, b) else
  if (tensor.shape.size() == 1) dict.resize(dict.size() - 1);
  dict += "), }";
  // Pad with spaces and a final newline so the data starts at a multiple of 64 bytes.
  const auto padded = [&](size_t len_size) {
    const size_t unpadded = kMagicSize + 2 + len_size + dict.size() + 1;
    return dict + std::string((kAlign - unpadded % kAlign) % kAlign, ' ') + "\n";
  };
  int major = 1;
  std::string header = padded(2);
  if (header.size() > 0xFFFF) {
    major = 2;
    header = padded(4);
  }
  std::vector<uint8_t> prefix(kMagic, kMagic + kMagicSize);
  prefix.push_back(static_cast<uint8_t>(major));
  prefix.push_back(0);
  const uint32_t len = static_cast<uint32_t>(header.size());
  for (int i = 0; i < (major == 1 ? 2 : 4); ++i) prefix.push_back(static_cast<uint8_t>(len >> (8 * i)));

  AtomicFileWriter out(path);
  out.write(prefix);
  out.write(header.data(), header.size());
  out.write(tensor.bytes);
  out.commit();
}

}  // namespace nibble
