#include "nibble/data/utf8.h"

#include <cstdint>
#include <cstring>
#include <utility>

namespace nibble::data {

std::size_t find_invalid_utf8(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    // Fast path: 8 ASCII bytes at a time (most of an English corpus).
    if (i + 8 <= n) {
      std::uint64_t word;
      std::memcpy(&word, s + i, 8);
      if ((word & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned char lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;       // overlong
      if (c == 0xed) hi = 0x9f;       // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;       // overlong
      if (c == 0xf4) hi = 0x8f;       // above U+10FFFF
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
    }
    i += len;
  }
  return kValidUtf8;
}

std::size_t replace_invalid_utf8(std::string& text) {
  std::size_t bad = find_invalid_utf8(text);
  if (bad == kValidUtf8) return 0;
  std::string out;
  out.reserve(text.size() + 16);
  std::size_t replaced = 0, from = 0;
  while (bad != kValidUtf8) {
    out.append(text, from, bad - from);
    out += "\xEF\xBF\xBD";  // U+FFFD
    ++replaced;
    from = bad + 1;
    std::size_t next = find_invalid_utf8(std::string_view(text).substr(from));
    bad = next == kValidUtf8 ? kValidUtf8 : from + next;
  }
  out.append(text, from, std::string::npos);
  text = std::move(out);
  return replaced;
}

}  // namespace nibble::data
