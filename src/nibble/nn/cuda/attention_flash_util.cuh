// Register-level helpers of the fused attention kernels (attention_flash.cu, attention_flash_sm90.cu),
// for accumulators in the mma.sync / wgmma layout, where a row's values sit in the 4 lanes of a quad.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/exp2_ftz.cuh"  // kLog2e (scores in base-2 units) and exp2_ftz

namespace nibble::nn::cuda::detail {
namespace {

// Two floats rounded to BF16 (nearest even) in one register, lo in the low half (lower column).
__device__ inline uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Columns col, col + 1 of row t of head h of sequence b of a gradient, in FP32 or in BF16.
__device__ inline void store_pair(const HeadGrad& g, int64_t b, int64_t h, int64_t t, int col, float x, float y) {
  if (g.f32.base != nullptr)
    *reinterpret_cast<float2*>(g.f32.at(b, h, t) + col) = make_float2(x, y);
  else
    *reinterpret_cast<uint32_t*>(g.b16.at(b, h, t) + col) = pack_bf16(x, y);
}

__device__ inline float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ inline float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The forward kernels take exp2_ftz; in the backward kernels it measured 4% slower (0.545 -> 0.566
// ms, nibble_layers_bench_cuda), so they keep exp2f.

}  // namespace
}  // namespace nibble::nn::cuda::detail
