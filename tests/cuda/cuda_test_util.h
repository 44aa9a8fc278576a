// Helpers shared by the CUDA test suites.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::test {

// Copies n elements from the device after the device has finished its work (kernels on any stream).
template <typename T>
std::vector<T> download(const T* device, int64_t n) {
  std::vector<T> host(static_cast<size_t>(n));
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  NIBBLE_CUDA_CHECK(cudaMemcpy(host.data(), device, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

}  // namespace nibble::test
