// Device helpers of the NVFP4 amax: the maxima and the RHT butterfly that the fused pass's amax
// kernel (nvfp4_rowcol.cuh) computes, shared with the kernels that compute the same two words
// while they produce the tensor (ProducerAmax, quantize_cuda.h), such as the MLP activation and the
// attention (attention_flash_util.cuh). Compiled
// as host C++ by tests/cuda_emulation/quantize_emulation_test.cpp (NIBBLE_ROWCOL_HOST_EMULATION,
// which brings its own fmax_abs_nan).
#pragma once

#include <cmath>
#include <cstdint>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/cuda/quantize_cuda.h"

namespace nibble::cuda {
namespace {

// max(m, |v[i]|) over kN elements, NaN if m or any v[i] is NaN (one FMNMX per element, where the
// integer maximum of abs_bits takes two): the amax passes' maximum. Its bits equal the maximum of
// abs_bits (the CPU reference's amax_bits_of) whenever that is not a NaN; the fused passes treat all
// NaN amaxes alike (not finite: the copy is all zeros).
#ifndef NIBBLE_ROWCOL_HOST_EMULATION
__device__ __forceinline__ float fmax_abs_nan(float m, float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(fabsf(v)));
  return r;
#else  // host builds of kernels that use it (the attention's, tests/cuda_emulation/flash_emulation_test.cpp)
  return std::isnan(m) || std::isnan(v) ? NAN : std::fmax(m, std::fabs(v));
#endif
}
#endif
template <int kN>
__device__ __forceinline__ float max_abs_nan(float m, const float* v) {
#pragma unroll
  for (int i = 0; i < kN; ++i) m = fmax_abs_nan(m, v[i]);
  return m;
}

// Max over the thread block, then atomicMax into *out. Called by all threads of the block.
__device__ __forceinline__ void block_max_to_global(uint32_t v, uint32_t* out) {
  __shared__ uint32_t warp_max[32];
  __syncthreads();  // warp_max may still be read by an earlier call
  v = __reduce_max_sync(0xFFFFFFFFu, v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) / 32;
    uint32_t m = lane < nwarps ? warp_max[lane] : 0;
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    if (lane == 0 && m != 0) atomicMax(out, m);
  }
}

// rht16 (rht.h) without its first step, the multiplication by the signs, which the fused pass
// applies while staging the tile: the same float32 operations in the same order. kScale = false
// leaves out the last step, the multiplication by 1/4 (the amax pass applies it to the maximum
// instead: rounding is monotonic, so max |RN(x / 4)| = RN(max |x| / 4), NaN and infinities included).
template <bool kScale = true>
__device__ __forceinline__ void rht16_butterfly(float v[16]) {
#pragma unroll
  for (int stage = 0; stage < 4; ++stage) {
    const int h = 1 << stage;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int j = (k / h) * 2 * h + k % h;
      const float a = v[j], b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
  }
  if constexpr (kScale) {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] *= 0.25f;
  }
}

// One 16-row block of kCols columns of a tensor as the fused pass quantizes it (v[r][k]: row r of
// the block, whose first row is a multiple of 16, column k), added to a thread's maxima: row_max of
// |v| and, with the RHT, col_max of |butterfly(signs x column)| before the 1/4 (finish_amax applies
// it to the maximum, as the amax pass does). The butterfly is rht16_butterfly's, in the same order,
// so the maximum has the amax pass's bits.
template <int kCols>
__device__ __forceinline__ void accumulate_amax16(const float (&v)[16][kCols], const ProducerAmax& amax,
                                                  float& row_max, float& col_max) {
#pragma unroll
  for (int r = 0; r < 16; ++r) row_max = max_abs_nan<kCols>(row_max, v[r]);
  if (!amax.col_rht) return;
#pragma unroll
  for (int k = 0; k < kCols; ++k) {
    float c[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) c[r] = (amax.rht_signs.negative_mask >> r) & 1u ? -v[r][k] : v[r][k];
    rht16_butterfly<false>(c);
    col_max = max_abs_nan<16>(col_max, c);
  }
}

// The block's maxima into slots.current: word 0 the rowwise amax and, with the columnwise side,
// word 1 the columnwise one (with the RHT col_max / 4, without it the rowwise one); the first
// block's thread 0 zeroes slots.zero_next. What nvfp4_amax writes. Called by all threads of every
// block of the grid.
__device__ __forceinline__ void finish_amax(float row_max, float col_max, AmaxSlots slots, bool col_rht,
                                            bool columnwise = true) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && slots.zero_next != nullptr)
    slots.zero_next[0] = slots.zero_next[1] = 0;
  block_max_to_global(float_bits(row_max), slots.current);
  // Without the columnwise side the second word is left alone (quantize_amax's callers give it one word).
  if (columnwise) block_max_to_global(float_bits(col_rht ? col_max * 0.25f : row_max), slots.current + 1);
}

}  // namespace
}  // namespace nibble::cuda
