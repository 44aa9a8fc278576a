// Errors of the data layer. Every message names the file and, where it applies, the byte offset,
// so that a user can find the bad spot in a multi-gigabyte corpus.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace nibble::data {

class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "PATH: WHAT" and "PATH: WHAT (at byte offset N)".
[[noreturn]] inline void fail(const std::string& path, const std::string& what) {
  throw DataError(path + ": " + what);
}
[[noreturn]] inline void fail_at(const std::string& path, std::uint64_t byte_offset, const std::string& what) {
  throw DataError(path + ": " + what + " (at byte offset " + std::to_string(byte_offset) + ")");
}

}  // namespace nibble::data
