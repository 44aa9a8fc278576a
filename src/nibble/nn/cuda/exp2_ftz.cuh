// The fast base-2 exponential of the softmax kernels (the fused attention's, the cross-entropy's).
// Host builds (the kernels' CPU emulation in tests/cuda_emulation) take std::exp2 with the same
// flush to zero, so the emulations bring no stand-in of their own.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace nibble::nn::cuda::detail {

inline constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = 2^(x log2 e)

// 2^x by the SFU's approximation with results below FLT_MIN flushed to zero: one instruction,
// where exp2f's handling of subnormal results takes three more (a term that small adds nothing to a
// softmax row whose largest term is 1), and expf's range reduction about ten.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
#endif
}

}  // namespace nibble::nn::cuda::detail
