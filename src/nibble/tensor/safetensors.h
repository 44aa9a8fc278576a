// safetensors files: an 8-byte little-endian header size N, N bytes of JSON header, then the data.
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// into the data section) and may hold "__metadata__", a string-to-string map.
//
// The reader checks everything before trusting it and names the file and the problem on error
// (std::runtime_error): header size past the end of the file or above 100 MB, invalid JSON,
// duplicate names, unknown dtypes, malformed shapes or offsets, offsets that do not match
// dtype x shape, overlap, gaps, a data section shorter (truncated file) or longer than the tensors.
// Tensors are read one at a time, so a large checkpoint is never loaded whole.
//
// dtype names follow the safetensors library (F32, BF16, F8_E4M3, F8_E5M2, F8_E8M0, F4, U8, ...);
// F4 and F6 are packed sub-byte types whose element count times their bits must fill whole bytes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "nibble/tensor/host_tensor.h"

namespace nibble {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t begin = 0;  // byte offsets into the data section
  int64_t end = 0;
};

class SafetensorsReader {
 public:
  explicit SafetensorsReader(std::filesystem::path path);  // reads and validates the header

  const std::filesystem::path& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // in data order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsEntry* find(std::string_view name) const;  // nullptr if absent
  HostTensor read(std::string_view name);                     // throws if absent

 private:
  [[noreturn]] void fail(const std::string& why) const;
  void parse_header(std::string_view json);
  std::filesystem::path path_;
  std::ifstream in_;
  int64_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensor = std::pair<std::string, HostTensor>;

// Writes the tensors (names unique, non-empty, not "__metadata__") and the metadata, through a
// temporary file renamed onto `path`. Tensors are laid out by decreasing element size, then by
// name, and the header is padded to a multiple of 8 bytes, so every tensor starts aligned to its
// element size (as the safetensors library lays them out).
void write_safetensors(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// True if the file looks like safetensors: at least 9 bytes, and the header starts with '{'.
bool is_safetensors_file(const std::filesystem::path& path);

}  // namespace nibble
