// Lets the scalar codecs and block math compile for both the host and CUDA devices, so the CPU
// reference and the CUDA kernels run the very same float32 operations (and so give the same bits).
#pragma once

#if defined(__CUDACC__)
#define NIBBLE_HD __host__ __device__ __forceinline__
#define NIBBLE_UNROLL _Pragma("unroll")
#else
#define NIBBLE_HD inline
#define NIBBLE_UNROLL
#endif

#include <cstdint>
#include <cstring>

namespace nibble {

// Bit casts usable in device code (std::bit_cast is not constexpr-friendly there).
NIBBLE_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

NIBBLE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// 2^k as a float, for k in [-149, 127], built from bits (exact; no libm).
NIBBLE_HD float pow2f(int k) {
  if (k >= -126) return bits_float(static_cast<uint32_t>(k + 127) << 23);
  return bits_float(1u << (k + 149));  // subnormal
}

}  // namespace nibble
