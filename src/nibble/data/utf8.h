// UTF-8 validation (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace nibble::data {

inline constexpr std::size_t kValidUtf8 = static_cast<std::size_t>(-1);

// The byte offset of the first byte that does not start a valid sequence, or kValidUtf8.
std::size_t find_invalid_utf8(std::string_view text);

// Replaces every byte that is not part of a valid sequence with U+FFFD (for corpora with a few
// stray Latin-1 or Windows-1252 bytes). Returns how many bytes were replaced.
std::size_t replace_invalid_utf8(std::string& text);

}  // namespace nibble::data
