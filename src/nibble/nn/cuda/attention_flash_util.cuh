// Register-level helpers of the fused attention kernels (attention_flash.cu, attention_flash_sm90.cu),
// for accumulators in the mma.sync / wgmma layout, where a row's values sit in the 4 lanes of a quad.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "nibble/formats/host_device.h"  // float_bits, bits_float
#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/exp2_ftz.cuh"  // kLog2e (scores in base-2 units) and exp2_ftz
#include "nibble/quant/cuda/amax_device.cuh"  // fmax_abs_nan

namespace nibble::nn::cuda::detail {
namespace {

// Two floats rounded to BF16 (nearest even) in one register, lo in the low half (lower column).
__device__ inline uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The floats of a pair's BF16 halves (pack_bf16's lo and hi).
__device__ inline float bf16_lo(uint32_t pair) { return bits_float(pair << 16); }
__device__ inline float bf16_hi(uint32_t pair) { return bits_float(pair & 0xFFFF0000u); }

// acc + sum_j a_j b_j over the 8 BF16 of each operand (4 pairs, pack_bf16's order), j in order, one
// FMA each: delta = rowsum(dO o)'s part over 8 columns (attention_cuda.cu's pack_dout_kernel, and the
// Hopper dq kernel where it computes delta itself: the same bits).
__device__ inline float bf16x8_dot(uint4 a, uint4 b, float acc) {
  const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t x = aw[j / 2], y = bw[j / 2];
    acc = j % 2 == 0 ? fmaf(bf16_lo(x), bf16_lo(y), acc) : fmaf(bf16_hi(x), bf16_hi(y), acc);
  }
  return acc;
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

// The amax of the fused NVFP4 pass over an output the kernels write in BF16 (ProducerAmax,
// quantize_cuda.h; the linear layer after the attention quantizes it), from the values a warp stores
// out of an accumulator in the mma.sync / wgmma layout. The warp's 16 rows are one 16-row block of
// the pass's columnwise RHT (the caller's rows start at a multiple of 16 of the tensor), lane 4g + t
// holding rows g and g + 8. add() takes one column's two values as stored; their RHT runs the
// butterfly of amax_device.cuh's accumulate_amax16 (the signs, then rows 1, 2, 4 and 8 apart: lanes
// 4, 8 and 16 apart, then within the thread) with the same operations in the same order, so the
// maxima, and the words finish() adds into amax.slots, are the amax pass's bits.
struct WarpAmax {
  nibble::cuda::ProducerAmax amax;
  float row_max = 0.0f, col_max = 0.0f;

  __device__ __forceinline__ void add(float x0, float x1, int g) {
    using nibble::cuda::fmax_abs_nan;
    row_max = fmax_abs_nan(fmax_abs_nan(row_max, x0), x1);
    if (!amax.col_rht) return;
    const uint32_t negative = amax.rht_signs.negative_mask;
    float a = (negative >> g) & 1u ? -x0 : x0, b = (negative >> (g + 8)) & 1u ? -x1 : x1;
#pragma unroll
    for (int h = 1; h < 8; h *= 2) {  // row r pairs with row r ^ h: (lower, upper) -> (lower + upper, lower - upper)
      const float pa = __shfl_xor_sync(0xffffffffu, a, 4 * h), pb = __shfl_xor_sync(0xffffffffu, b, 4 * h);
      const bool upper = (g & h) != 0;
      a = upper ? pa - a : a + pa;
      b = upper ? pb - b : b + pb;
    }
    col_max = fmax_abs_nan(fmax_abs_nan(col_max, a + b), a - b);
  }
  // A warp's 16 rows as stored in BF16 pairs (pack_bf16): rows[0] the thread's row g, rows[1] its row
  // g + 8, pair j holding columns 8j + 2t and 8j + 2t + 1; `in_tensor`: the rows are the tensor's
  // (not padding beyond T). Uniform in the warp.
  __device__ __forceinline__ void add_rows(const uint32_t (&rows)[2][8], int g, bool in_tensor) {
    if (!in_tensor) return;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      add(bf16_lo(rows[0][j]), bf16_lo(rows[1][j]), g);
      add(bf16_hi(rows[0][j]), bf16_hi(rows[1][j]), g);
    }
  }
  // The warp's maxima into amax.slots.current (lane 0's atomics; finish_amax's words: the columnwise
  // word col_max / 4 with the RHT, else the rowwise one); the grid's first warp (`first`) zeroes
  // slots.zero_next. Called by all lanes of the warp.
  __device__ __forceinline__ void finish(bool first) {
#pragma unroll
    for (int mask = 16; mask >= 1; mask /= 2) {  // the maxima are >= 0 or NaN: fmax_abs_nan's |.| changes nothing
      row_max = nibble::cuda::fmax_abs_nan(row_max, __shfl_xor_sync(0xffffffffu, row_max, mask));
      col_max = nibble::cuda::fmax_abs_nan(col_max, __shfl_xor_sync(0xffffffffu, col_max, mask));
    }
    if ((threadIdx.x & 31) != 0) return;
    if (first && amax.slots.zero_next != nullptr) amax.slots.zero_next[0] = amax.slots.zero_next[1] = 0;
    const uint32_t row = float_bits(row_max), col = float_bits(amax.col_rht ? col_max * 0.25f : row_max);
    if (row != 0) atomicMax(amax.slots.current, row);
    if (col != 0) atomicMax(amax.slots.current + 1, col);
  }
};

// The forward kernels take exp2_ftz; in the backward kernels it measured 4% slower (0.545 -> 0.566
// ms, nibble_layers_bench_cuda), so they keep exp2f.

}  // namespace
}  // namespace nibble::nn::cuda::detail
