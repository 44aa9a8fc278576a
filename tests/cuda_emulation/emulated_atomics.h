// CUDA's atomicMax and atomicMin for kernels compiled as host C++ (the emulation tests, whose
// threads are std::threads): the same results, through std::atomic_ref.
#pragma once

#include <atomic>
#include <cstdint>

// amax_device.cuh's and the attention's amax words: the largest value wins.
inline uint32_t atomicMax(uint32_t* p, uint32_t v) {
  std::atomic_ref<uint32_t> a(*p);
  uint32_t old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
// kernel_util.cuh's flag_bad_id: the smallest value wins.
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
