// Helpers shared by the data-layer tests: a scratch directory, seeded randomness, small files.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "test_dir.h"
#include "test_seed.h"

namespace nibble::data::testing {

using nibble::test::TempDir;

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Appends code point cp as UTF-8.
inline void append_utf8(std::string& s, char32_t cp) {
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xc0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xe0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    s += static_cast<char>(0xf0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

// Random valid UTF-8 text mixing ASCII words, whitespace of several kinds, and code points from
// many scripts (Latin-1, Cyrillic, Greek, Arabic, CJK, Hangul, emoji, rare planes).
inline std::string random_text(std::mt19937_64& rng, std::size_t code_points) {
  static const std::vector<std::pair<char32_t, char32_t>> ranges = {
      {0x20, 0x7e}, {0x20, 0x7e}, {0x20, 0x7e}, {'\t', '\r'}, {0xa0, 0xff}, {0x100, 0x17f}, {0x370, 0x3ff},
      {0x400, 0x4ff}, {0x600, 0x6ff}, {0x900, 0x97f}, {0x2000, 0x206f}, {0x3000, 0x30ff}, {0x4e00, 0x9fff},
      {0xac00, 0xd7a3}, {0xfe00, 0xfeff}, {0x1f300, 0x1f64f}, {0x10000, 0x10ffff}};
  std::string s;
  std::uniform_int_distribution<std::size_t> pick(0, ranges.size() - 1);
  for (std::size_t i = 0; i < code_points; ++i) {
    auto [lo, hi] = ranges[pick(rng)];
    char32_t cp = std::uniform_int_distribution<std::uint32_t>(lo, hi)(rng);
    if (cp >= 0xd800 && cp <= 0xdfff) cp = 'x';  // surrogates are not text
    append_utf8(s, cp);
  }
  return s;
}

}  // namespace nibble::data::testing
