// The NVFP4 16x16 weight kernel (nvfp4_tile16_kernel: W and W^T from one pass). Included by
// quantize_cuda.cu, and compiled as host C++ by tests/cuda_emulation/quantize_emulation_test.cpp
// (NIBBLE_ROWCOL_HOST_EMULATION, see nvfp4_rowcol.cuh, whose helpers it shares).
#pragma once

#include <cstdint>

#include "nibble/quant/cuda/fp4_decode_store.cuh"
#include "nibble/quant/cuda/nvfp4_rowcol.cuh"
#include "nibble/quant/cuda/tile16_layout.h"

namespace nibble::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// NVFP4 16x16 tiles, round-to-nearest-even (the paper's weights): W and, in the same pass, W^T.
//
// Each warp quantizes 32 x 64 warp tiles of W (layout in tile16_layout.h): it loads them with
// whole-row 16-byte loads, reduces each tile's amax over the 8 lanes that hold the tile, encodes
// every element once (its 8 codes per word are W's packed output as they stand), and transposes
// the words as 16 x 16 nibble matrices for W^T: the same codes, since a tile of W^T has the tile's
// scale and values. No shared memory but the encode-scale table and no block barriers in the
// loop; grid-stride over warp tiles (persistent grid), so each block builds the table once.
// The tile scale is the shared nvfp4_block_scale_code, the element encode scale the shared
// nvfp4_element_encode_scale (looked up by code), the elements pack8_rne as in the fused pass.

constexpr int kTile16Threads = 128;
constexpr int kTile16Warps = kTile16Threads / 32;

// 8 elements of one word: one 16-byte vector of BF16, two of float.
template <typename T>
struct Raw8 {
  static constexpr int kVecs = 8 * sizeof(T) / 16;
  uint4 vec[kVecs];
};

__device__ __forceinline__ void unpack8(const Raw8<bf16_t>& r, float v[8]) {
  const uint32_t w[4] = {r.vec[0].x, r.vec[0].y, r.vec[0].z, r.vec[0].w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = bits_float(w[j] << 16);
    v[2 * j + 1] = bits_float(w[j] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float v[8]) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    v[4 * q] = bits_float(r.vec[q].x);
    v[4 * q + 1] = bits_float(r.vec[q].y);
    v[4 * q + 2] = bits_float(r.vec[q].z);
    v[4 * q + 3] = bits_float(r.vec[q].w);
  }
}

// max |v| over the 8 elements of a word, for a finite tensor. BF16: the 16-bit halves compared as
// unsigned integers with their sign bits cleared (the order of the values, for non-NaN), which
// needs neither the float values nor a float max per element.
__device__ __forceinline__ float max_abs8(const Raw8<bf16_t>& r) {
  const uint32_t w[4] = {r.vec[0].x, r.vec[0].y, r.vec[0].z, r.vec[0].w};
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) m = __vmaxu2(m, w[j] & 0x7FFF7FFFu);
  return fmaxf(bits_float(m << 16), bits_float(m & 0xFFFF0000u));
}
__device__ __forceinline__ float max_abs8(const Raw8<float>& r) {
  float v[8];
  unpack8(r, v);
  return max_abs_finite<8>(v);
}

// Resident blocks per SM the register allocation must allow: 20 warps for BF16 input (96
// registers), 16 for float, whose 8 words in flight take 64 registers (128): enough loads in
// flight either way to cover the memory latency.
template <typename T>
constexpr int kTile16MinBlocks = sizeof(T) == 2 ? 5 : 4;

// w_out: W's codes and tile scales (rows/16 x cols/16), and its decoded BF16 values where
// w_out.decoded is set; t_out: W^T's codes and tile scales (cols/16 x rows/16). Codes and scales of
// a side whose data pointer is null are not written; g goes to every decode_scale pointer given.
// amax_in: max |x| bits of the whole tensor. Block `block` of `blocks` that share the tensor's warp
// tiles (grid-stride); enc_scale: the block's shared table of kE4m3Codes floats.
template <typename T>
__device__ __forceinline__ void tile16_quantize_blocks(const T* __restrict__ x, int64_t rows, int64_t cols,
                                                       const uint32_t* __restrict__ amax_in, QuantBuffers w_out,
                                                       QuantBuffers t_out, int64_t block, int64_t blocks,
                                                       float* enc_scale) {
  const uint32_t amax_bits = *amax_in;
  const bool finite = amax_is_finite(amax_bits);
  const TensorScale ts = nvfp4_tensor_scale(bits_float(amax_bits));
  for (int c = threadIdx.x; c < kE4m3Codes; c += kTile16Threads)
    enc_scale[c] = nvfp4_element_encode_scale(static_cast<uint8_t>(c), ts.decode);
  const bool rowwise = w_out.data != nullptr, colwise = t_out.data != nullptr;
  if (block == 0 && threadIdx.x == 0) {
    const float g = finite ? ts.decode : __int_as_float(0x7FC00000);
    if (w_out.decode_scale != nullptr) *w_out.decode_scale = g;
    if (t_out.decode_scale != nullptr) *t_out.decode_scale = g;
  }
  __syncthreads();

  constexpr uint32_t kAll = 0xFFFFFFFFu;
  const int lane = threadIdx.x % 32;
  const int tc = tile16::tile_col(lane);
  const int64_t scale_cols = cols / 16, t_scale_cols = rows / 16;
  const int64_t count = tile16::warp_tiles(rows, cols);
  // Warp-uniform loop (every lane of a warp takes the same trips), so the shuffles see full warps.
  for (int64_t wt = block * kTile16Warps + threadIdx.x / 32; wt < count; wt += blocks * kTile16Warps) {
    const tile16::WarpTile t = tile16::warp_tile(wt, cols);
    const bool col_ok = t.c0 + tile16::word_col(lane) < cols;  // this lane's tile column exists
    const bool row1_ok = t.r0 + 16 < rows;                     // tile row 1 exists (row 0 always)

    Raw8<T> raw[tile16::kWords];
#pragma unroll
    for (int i = 0; i < tile16::kWords; ++i) {
      const bool ok = finite && col_ok && (tile16::tile_row(i) == 0 || row1_ok);
      const T* p = x + (t.r0 + tile16::word_row(lane, i)) * cols + t.c0 + tile16::word_col(lane);
#pragma unroll
      for (int q = 0; q < Raw8<T>::kVecs; ++q)
        raw[i].vec[q] = ok ? __ldg(reinterpret_cast<const uint4*>(p) + q) : make_uint4(0, 0, 0, 0);
    }

    // Tile amaxes (finite tensor: float max of |v|), over the lane's words, then its tile's lanes.
    float amax[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < tile16::kWords; ++i) {
      const int tr = tile16::tile_row(i);
      amax[tr] = fmaxf(amax[tr], max_abs8(raw[i]));
    }
#pragma unroll
    for (int k = 0; k < tile16::kTileLanesLog2; ++k) {
      amax[0] = fmaxf(amax[0], __shfl_xor_sync(kAll, amax[0], tile16::tile_lane_mask(k)));
      amax[1] = fmaxf(amax[1], __shfl_xor_sync(kAll, amax[1], tile16::tile_lane_mask(k)));
    }
    // Each lane encodes one of its two tile scales and trades it with lane ^ 8 (same tiles).
    const bool odd = (lane & 8) != 0;
    const uint32_t own = finite ? nvfp4_block_scale_code(odd ? amax[1] : amax[0], ts.encode) : 0u;
    const uint32_t other = __shfl_xor_sync(kAll, own, 8);
    const uint32_t code[2] = {odd ? other : own, odd ? own : other};
    const float e[2] = {enc_scale[code[0] & 0x7Fu], enc_scale[code[1] & 0x7Fu]};
    // Below 7 no element needs E2M1's saturation (see encode16).
    const bool saturate[2] = {!(amax[0] * e[0] < 7.0f), !(amax[1] * e[1] < 7.0f)};

    uint32_t w[tile16::kWords];
#pragma unroll
    for (int i = 0; i < tile16::kWords; ++i) {
      float v[8];
      unpack8(raw[i], v);
      const int tr = tile16::tile_row(i);
      w[i] = saturate[tr] ? pack8_rne<true>(v, e[tr]) : pack8_rne<false>(v, e[tr]);
    }
    // Tile scales: one lane per tile column writes both tile rows' (lane 2 tc).
    const bool scale_lane = col_ok && lane == 2 * tc;

    if (rowwise && col_ok) {
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i) {
        if (tile16::tile_row(i) == 1 && !row1_ok) continue;
        const int64_t r = t.r0 + tile16::word_row(lane, i);
        *reinterpret_cast<uint32_t*>(w_out.data + (r * cols + t.c0 + tile16::word_col(lane)) / 2) = w[i];
      }
    }
    // W's decoded BF16 values where asked for (w_out.decoded: a GEMM operand without a decode pass
    // of its own), from the codes as stored: each word is 8 elements of one row, one 16-byte store.
    if (w_out.decoded != nullptr && col_ok) {
      const uint32_t scale2[2] = {e4m3_scale_bf16x2(code[0]), e4m3_scale_bf16x2(code[1])};
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i) {
        if (tile16::tile_row(i) == 1 && !row1_ok) continue;
        const int64_t r = t.r0 + tile16::word_row(lane, i);
        uint32_t d[4];
        decode8_bf16(w[i], scale2[tile16::tile_row(i)], d);
        *reinterpret_cast<uint4*>(w_out.decoded + r * cols + t.c0 + tile16::word_col(lane)) =
            make_uint4(d[0], d[1], d[2], d[3]);
      }
    }
    if (rowwise && scale_lane) {
      const int64_t s = (t.r0 / 16) * scale_cols + t.c0 / 16 + tc;
      w_out.scales[s] = static_cast<uint8_t>(code[0]);
      if (row1_ok) w_out.scales[s + scale_cols] = static_cast<uint8_t>(code[1]);
    }

    if (colwise) {
      tile16::transpose_step2(w);
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i)
        w[i] = tile16::transpose_step1(w[i], __shfl_xor_sync(kAll, w[i], 16), lane);
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i)
        w[i] = tile16::transpose_step0(w[i], __shfl_xor_sync(kAll, w[i], 8), lane);
      if (col_ok) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          // W^T row t.c0 + transposed_row, elements t.r0 .. t.r0 + 31: 16 bytes, or 8 when tile row
          // 1 is missing; 16-byte aligned when rows % 32 == 0, 8-byte aligned always.
          uint8_t* dst = t_out.data + ((t.c0 + tile16::transposed_row(lane, m)) * rows + t.r0) / 2;
          if (row1_ok && rows % 32 == 0) {
            *reinterpret_cast<uint4*>(dst) = make_uint4(w[m], w[2 + m], w[4 + m], w[6 + m]);
          } else {
            *reinterpret_cast<uint2*>(dst) = make_uint2(w[m], w[2 + m]);
            if (row1_ok) *reinterpret_cast<uint2*>(dst + 8) = make_uint2(w[4 + m], w[6 + m]);
          }
        }
      }
      if (scale_lane) {
        const int64_t s = (t.c0 / 16 + tc) * t_scale_cols + t.r0 / 16;
        t_out.scales[s] = static_cast<uint8_t>(code[0]);
        if (row1_ok) t_out.scales[s + 1] = static_cast<uint8_t>(code[1]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kTile16Threads, kTile16MinBlocks<T>)
    nvfp4_tile16_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, const uint32_t* __restrict__ amax_in,
                        QuantBuffers w_out, QuantBuffers t_out) {
  __shared__ float enc_scale[kE4m3Codes];  // element encode scale e_b by E4M3 code
  tile16_quantize_blocks(x, rows, cols, amax_in, w_out, t_out, blockIdx.x, gridDim.x, enc_scale);
}

// Many weights in one launch (nvfp4_quantize_tile16_jobs): job blockIdx.y, its warp tiles shared by
// the blocks along x that have any (the rest leave at once), each tile as nvfp4_tile16_kernel
// quantizes it: the same bits as a launch per weight, without a launch and its gaps per weight.
constexpr int kTile16JobsPerLaunch = 30;  // 128 bytes a job (the static_assert below)
constexpr int kTile16JobTilesPerWarp = 2;  // each block builds its encode-scale table for 8 warp tiles
struct Tile16Jobs {
  Tile16Job job[kTile16JobsPerLaunch];
};
static_assert(sizeof(Tile16Jobs) <= 4096, "Tile16Jobs goes by value in the kernel's parameters (4 KiB)");
NIBBLE_HD int64_t tile16_job_blocks(int64_t rows, int64_t cols) {
  constexpr int64_t kTilesPerBlock = kTile16Warps * kTile16JobTilesPerWarp;
  return (tile16::warp_tiles(rows, cols) + kTilesPerBlock - 1) / kTilesPerBlock;
}
__global__ void __launch_bounds__(kTile16Threads, kTile16MinBlocks<float>) nvfp4_tile16_jobs_kernel(Tile16Jobs jobs) {
  __shared__ float enc_scale[kE4m3Codes];
  const Tile16Job& job = jobs.job[blockIdx.y];
  const int64_t blocks = tile16_job_blocks(job.rows, job.cols);
  if (blockIdx.x >= blocks) return;  // the whole block: before any barrier
  tile16_quantize_blocks(job.x, job.rows, job.cols, job.amax_bits, job.w, job.wt, blockIdx.x, blocks, enc_scale);
}

}  // namespace
}  // namespace nibble::cuda
