// Device memory and error checks shared by every CUDA part of nibble.
//
// NIBBLE_CUDA_CHECK(call) throws std::runtime_error naming the call, the file and the line; a CUDA
// error is never silently dropped. DeviceBuffer<T> owns one cudaMalloc allocation (no managed
// memory: see the device notes in docs/benchmarks.md) and copies to and from host spans.
// HostStaging<T> is pinned host memory for copies to the device that do not block the host;
// PinnedBuffer<T> pinned host memory for copies from the device that the host reads after one wait.
// With the environment variable NIBBLE_ALLOC_LOG=1, every DeviceBuffer allocation and release goes
// to stderr with the running total (memory breakdowns, docs/benchmarks.md).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace nibble::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                           ") in " + call + " at " + file + ":" + std::to_string(line));
}

#define NIBBLE_CUDA_CHECK(call)                                                         \
  do {                                                                                  \
    cudaError_t nibble_err_ = (call);                                                   \
    if (nibble_err_ != cudaSuccess) ::nibble::cuda::throw_cuda_error(nibble_err_, #call, __FILE__, __LINE__); \
  } while (0)

// Checks the launch of the kernel just issued (configuration errors); execution errors surface at
// the next synchronising call.
#define NIBBLE_CUDA_CHECK_LAUNCH() NIBBLE_CUDA_CHECK(cudaGetLastError())

// An attribute of the current device (compute capability, multiprocessor count, ...).
inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// NIBBLE_ALLOC_LOG's line for one allocation (bytes > 0) or release (bytes < 0).
inline void log_device_allocation(int64_t bytes) {
  static const bool on = [] {
    const char* v = std::getenv("NIBBLE_ALLOC_LOG");
    return v != nullptr && *v != '\0' && *v != '0';
  }();
  if (!on) return;
  static std::atomic<int64_t> total{0};
  const int64_t now = total += bytes;
  std::fprintf(stderr, "nibble alloc %+.2f MiB, total %.2f MiB\n", static_cast<double>(bytes) / 1048576.0,
               static_cast<double>(now) / 1048576.0);
}

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) { resize(count); }
  explicit DeviceBuffer(std::span<const T> host) {
    resize(host.size());
    upload(host);
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }

  // Reallocates only when the count changes; the contents are then undefined.
  void resize(size_t count) {
    if (count == count_) return;
    release();
    if (count > 0) {
      NIBBLE_CUDA_CHECK(cudaMalloc(&ptr_, count * sizeof(T)));
      log_device_allocation(static_cast<int64_t>(count * sizeof(T)));
    }
    count_ = count;
  }
  // Grows (never shrinks) to at least `count` elements.
  void reserve(size_t count) {
    if (count > count_) resize(count);
  }
  void zero(cudaStream_t stream = nullptr) {
    if (count_ > 0) NIBBLE_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, bytes(), stream));
  }
  void upload(std::span<const T> host) {
    if (host.size() != count_) throw std::invalid_argument("DeviceBuffer::upload: size mismatch");
    if (count_ > 0) NIBBLE_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_ > 0) NIBBLE_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  void release() {
    if (ptr_ != nullptr) {
      cudaFree(ptr_);
      log_device_allocation(-static_cast<int64_t>(bytes()));
    }
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// Pinned host memory that asynchronous copies to the device read from, two buffers used in turn:
// write() waits until the copies out of the buffer it hands back (marked by copied() two write()s
// ago) have run, so the host never overwrites data in flight, and otherwise never waits for the
// device. With one buffer, a step's third micro-batch waited for the first's compute (its tokens'
// copy queued behind it).
template <typename T>
class HostStaging {
 public:
  HostStaging() = default;
  ~HostStaging() {
    for (Buffer& b : buffers_) b.release();
  }
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;

  // `count` elements to fill, valid until the next write().
  T* write(size_t count) {
    Buffer& b = buffers_[turn_];
    if (b.event != nullptr) NIBBLE_CUDA_CHECK(cudaEventSynchronize(b.event));
    if (count > b.count) {
      b.release();
      NIBBLE_CUDA_CHECK(cudaMallocHost(&b.ptr, count * sizeof(T)));
      NIBBLE_CUDA_CHECK(cudaEventCreateWithFlags(&b.event, cudaEventDisableTiming));
      b.count = count;
    }
    return b.ptr;
  }
  // Marks the copies issued on `stream` so far as the last ones that read the last write()'s memory.
  void copied(cudaStream_t stream) {
    NIBBLE_CUDA_CHECK(cudaEventRecord(buffers_[turn_].event, stream));
    turn_ ^= 1;
  }

 private:
  struct Buffer {
    T* ptr = nullptr;
    cudaEvent_t event = nullptr;
    size_t count = 0;
    void release() {
      if (event != nullptr) {
        cudaEventSynchronize(event);
        cudaEventDestroy(event);
      }
      if (ptr != nullptr) cudaFreeHost(ptr);
      ptr = nullptr;
      event = nullptr;
      count = 0;
    }
  };
  Buffer buffers_[2];
  int turn_ = 0;
};

// Pinned host memory that asynchronous copies from the device write into, read by the host after it
// has waited for the stream: a copy into pageable memory makes the host wait at each copy. Neither
// copied nor moved (its owners stay where they are built).
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t count) { reserve(count); }
  ~PinnedBuffer() { release(); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  // Grows (never shrinks) to at least `count` elements; the contents are then undefined. Not while a
  // copy into it may be in flight.
  void reserve(size_t count) {
    if (count <= count_) return;
    release();
    NIBBLE_CUDA_CHECK(cudaMallocHost(&ptr_, count * sizeof(T)));
    count_ = count;
  }
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  void release() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

}  // namespace nibble::cuda
