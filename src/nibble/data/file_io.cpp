#include "nibble/data/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "nibble/data/error.h"

namespace nibble::data {

namespace {
std::string errno_text() { return std::strerror(errno); }
}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    std::string why = errno_text();
    ::close(fd);
    fail(path, "cannot stat: " + why);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    data_ = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (data_ == MAP_FAILED) {
      data_ = nullptr;
      std::string why = errno_text();
      ::close(fd);
      fail(path, "cannot map into memory: " + why);
    }
  }
  ::close(fd);  // the mapping keeps the file referenced
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)), data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(data_, size_);
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  // The temporary lives beside the target so that rename() stays on one file system.
  temp_path_ = path_ + ".tmp." + std::to_string(::getpid());
  file_ = std::fopen(temp_path_.c_str(), "wb");
  if (file_ == nullptr) fail(path_, "cannot create temporary file " + temp_path_ + ": " + errno_text());
}

AtomicFile::~AtomicFile() {
  if (file_ != nullptr) {
    std::fclose(file_);
    std::remove(temp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, std::size_t bytes) {
  if (bytes == 0) return;
  if (std::fwrite(data, 1, bytes, file_) != bytes) fail(path_, "write failed: " + errno_text());
  written_ += bytes;
}

void AtomicFile::write_at(std::uint64_t offset, const void* data, std::size_t bytes) {
  if (offset + bytes > written_) fail(path_, "internal error: patch past the end of the file");
  if (std::fseek(file_, static_cast<long>(offset), SEEK_SET) != 0 || std::fwrite(data, 1, bytes, file_) != bytes ||
      std::fseek(file_, 0, SEEK_END) != 0) {
    fail(path_, "write failed: " + errno_text());
  }
}

void AtomicFile::commit() {
  if (file_ == nullptr) fail(path_, "internal error: committed twice");
  bool ok = std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  std::string why = ok ? "" : errno_text();
  ok = (std::fclose(file_) == 0) && ok;
  file_ = nullptr;
  if (!ok) {
    std::remove(temp_path_.c_str());
    fail(path_, "cannot finish writing: " + why);
  }
  if (std::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    std::string rename_why = errno_text();
    std::remove(temp_path_.c_str());
    fail(path_, "cannot rename the temporary file into place: " + rename_why);
  }
}

void write_file_atomically(const std::string& path, const std::string& contents) {
  AtomicFile file(path);
  file.write(contents.data(), contents.size());
  file.commit();
}

namespace {

// Inflates every gzip member in turn (a .gz may hold several, concatenated).
std::string gunzip(const std::string& path, std::span<const std::byte> in) {
  std::string out;
  out.reserve(in.size() * 3);
  z_stream zs{};
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) fail(path, "zlib: cannot initialise the decompressor");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  std::size_t remaining = in.size();
  char buffer[1 << 16];
  for (;;) {
    // avail_in is 32 bits wide: feed very large files in pieces.
    if (zs.avail_in == 0 && remaining > 0) {
      zs.avail_in = static_cast<uInt>(std::min<std::size_t>(remaining, 1u << 30));
      remaining -= zs.avail_in;
    }
    zs.next_out = reinterpret_cast<Bytef*>(buffer);
    zs.avail_out = sizeof(buffer);
    int rc = inflate(&zs, Z_NO_FLUSH);
    out.append(buffer, sizeof(buffer) - zs.avail_out);
    if (rc == Z_STREAM_END) {
      if (zs.avail_in == 0 && remaining == 0) break;
      inflateReset(&zs);  // another member follows
      continue;
    }
    if (rc == Z_BUF_ERROR && zs.avail_in == 0 && remaining == 0) {
      std::uint64_t at = static_cast<std::uint64_t>(reinterpret_cast<const std::byte*>(zs.next_in) - in.data());
      inflateEnd(&zs);
      fail_at(path, at, "gzip data ends early (truncated file?)");
    }
    if (rc != Z_OK && rc != Z_BUF_ERROR) {
      std::uint64_t at = static_cast<std::uint64_t>(reinterpret_cast<const std::byte*>(zs.next_in) - in.data());
      std::string why = zs.msg != nullptr ? zs.msg : "error " + std::to_string(rc);
      inflateEnd(&zs);
      fail_at(path, at, "corrupt gzip data: " + why);
    }
  }
  inflateEnd(&zs);
  return out;
}

}  // namespace

std::string read_text_file(const std::string& path) {
  MappedFile file(path);
  auto bytes = file.bytes();
  if (bytes.size() >= 2 && bytes[0] == std::byte{0x1f} && bytes[1] == std::byte{0x8b}) return gunzip(path, bytes);
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

}  // namespace nibble::data
