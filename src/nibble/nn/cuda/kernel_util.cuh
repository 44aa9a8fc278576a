// Device helpers shared by the layer kernels (internal to src/nibble/nn/cuda and train/cuda).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nibble/formats/minifloat.h"

namespace nibble::nn::cuda::detail {

inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  if (b > 0x7fffffffLL) throw std::invalid_argument("CUDA grid too large: " + std::to_string(n) + " elements");
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread. The
// order of additions depends only on the block size: deterministic. `scratch` holds 32 T.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  return warp_sum(v);
}

__device__ inline float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// A layer's output element in FP32, or in BF16 rounded to nearest even (the input of a linear layer
// that takes BF16, LinearCuda::bf16_input): the bits OperandCuda gives a bf16 operand of the FP32 value.
__device__ __forceinline__ uint32_t bf16_bits(float v) { return BF16::encode(v, Rounding::kNearestEven); }
// Two of them in one word, lo in the low half, by the hardware conversion on the GPU (one instruction
// where the encoder takes five or six each): the same bits for every value but a NaN, which it
// writes as the canonical 0x7FFF, the encoder's bits for the canonical FP32 NaN 0x7FFFFFFF, the only
// NaN the GPU's arithmetic produces. Taken where measured faster (H200, docs/benchmarks.md session
// 20): the GELU kernels and the cross-entropy's BF16 gradient (0.345 -> 0.285 ms a chunk), the
// LayerNorm forward that computes an amax and the LayerNorm backward's BF16 dx; the LayerNorm forward
// without an amax, whose statistics are in double, was slower with it (0.040 -> 0.046 ms), so store4
// keeps the encoder.
__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return bf16_bits(lo) | bf16_bits(hi) << 16;
#endif
}
// Four of them as one 8-byte store's word pair, a in the lowest half.
__device__ __forceinline__ uint2 bf16x4_bits(float a, float b, float c, float d) {
  return make_uint2(bf16x2_bits(a, b), bf16x2_bits(c, d));
}
__device__ __forceinline__ void write_out(float* out, float v) { *out = v; }
__device__ __forceinline__ void write_out(bf16_t* out, float v) { out->bits = static_cast<uint16_t>(bf16_bits(v)); }

// Four consecutive elements as FP32 (one 16-byte load of FP32, or one 8-byte load of BF16, exact),
// and back (BF16 rounded as write_out does): p aligned to 4 elements.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const bf16_t* p) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  return make_float4(bits_float(w.x << 16), bits_float(w.x & 0xFFFF0000u), bits_float(w.y << 16),
                     bits_float(w.y & 0xFFFF0000u));
}
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(bf16_t* p, float4 v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(bf16_bits(v.x) | bf16_bits(v.y) << 16, bf16_bits(v.z) | bf16_bits(v.w) << 16);
}

// Records (position, id) of an out-of-range id; the smallest position wins.
__device__ inline void flag_bad_id(unsigned long long* flag, int64_t position, uint32_t id) {
  atomicMin(flag, (static_cast<unsigned long long>(position) << 32) | id);
}

}  // namespace nibble::nn::cuda::detail
