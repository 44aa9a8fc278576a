// File plumbing of the data layer: read-only memory maps (corpora larger than RAM), outputs that
// appear only when complete (temporary file + rename), and text input that may be gzip-compressed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>

namespace nibble::data {

// A whole file mapped read-only. Pages are loaded on demand by the kernel, so a 100 GB token file
// costs address space, not RAM. An empty file maps to an empty span.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;

  std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(data_), size_}; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

// Writes PATH through a temporary file beside it (same directory, so rename is atomic). The file
// appears under PATH only after commit(); destroying an uncommitted writer removes the temporary,
// so an error never leaves a half-written output or clobbers an older complete one.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t bytes);
  void write_at(std::uint64_t offset, const void* data, std::size_t bytes);  // patch a header
  std::uint64_t size() const { return written_; }
  void commit();  // flush, fsync, rename over PATH

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::string temp_path_;
  std::FILE* file_ = nullptr;
  std::uint64_t written_ = 0;
};

// Writes a whole small file (manifest, index) atomically.
void write_file_atomically(const std::string& path, const std::string& contents);

// Reads a text file whole. Files that start with the gzip magic (.gz, and dictd's .dz, which is
// gzip with an extra header field) are decompressed, whatever their name.
std::string read_text_file(const std::string& path);

}  // namespace nibble::data
