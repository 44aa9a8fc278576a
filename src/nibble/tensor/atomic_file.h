// Writes a file so that readers see either the old file or the complete new one, never a part:
// bytes go to a temporary file next to the target, which is flushed to disk and then renamed over
// it. If the writer is destroyed before commit() (an error on the way), the temporary file is
// removed and the target is left as it was.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>

namespace nibble {

class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path target);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(std::span<const uint8_t> bytes);
  void write(const void* data, size_t size) { write({static_cast<const uint8_t*>(data), size}); }
  // fsync, close, rename onto the target. Throws std::runtime_error naming the target on failure.
  void commit();

  const std::filesystem::path& target() const { return target_; }

 private:
  [[noreturn]] void fail(const char* what);
  std::filesystem::path target_;
  std::filesystem::path temp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace nibble
