#include "nibble/tensor/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace nibble {

namespace {
std::atomic<unsigned> g_temp_counter{0};
}

AtomicFileWriter::AtomicFileWriter(std::filesystem::path target) : target_(std::move(target)) {
  if (target_.filename().empty()) throw std::runtime_error(target_.string() + ": not a file name");
  // Same directory as the target, so that the final rename stays within one file system.
  temp_ = target_;
  temp_ += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(g_temp_counter++);
  fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd_ < 0)
    throw std::runtime_error(target_.string() + ": cannot create a temporary file to write it: " +
                             std::strerror(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temp_.c_str());
}

void AtomicFileWriter::fail(const char* what) {
  const int err = errno;
  throw std::runtime_error(target_.string() + ": " + what + ": " + std::strerror(err));
}

void AtomicFileWriter::write(std::span<const uint8_t> bytes) {
  if (fd_ < 0) throw std::logic_error("AtomicFileWriter::write after commit");
  const uint8_t* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("write failed");
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

void AtomicFileWriter::commit() {
  if (fd_ < 0) throw std::logic_error("AtomicFileWriter::commit twice");
  if (::fsync(fd_) != 0) fail("fsync failed");
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail("close failed");
  if (::rename(temp_.c_str(), target_.c_str()) != 0) fail("cannot rename the temporary file onto it");
  committed_ = true;
}

}  // namespace nibble
