// Fused (flash-style) causal attention kernels behind AttentionCoreCuda (internal to
// src/nibble/nn/cuda). Operands are BF16 heads, each a HeadRows view: the packed heads of
// attention_cuda.cu,
//   q, o [B, H, Tp, HD], k, v [B, KV, Tp, HD]   (rows padded with zeros to Tp, a multiple of
//   kFlashTile; head dimension padded with zeros to HD = 64 or 128, see flash_head_dim)
// or, where nothing needs padding (T = Tp, hd = HD), the heads in place in the rows of a matrix:
// q, k and v in the qkv projection's output [B*T x (H + 2 KV) hd], dO in the output gradient
// [B*T x H hd]; backward writes dq, dk and dv the same two ways (FP32 packed, or BF16 in place).
// Scores never reach global memory: each block keeps a 64 x 64 tile of them (64 keys x 32 queries
// in dk/dv at HD 128) in registers (BF16 tensor-core mma.sync m16n8k16, FP32 accumulation), with
// the online softmax in FP32 and the key tiles above the diagonal skipped. Backward recomputes P
// from the saved log-sum-exp in two kernels that each own their outputs (dk, dv per key tile; dq
// per query tile): no atomics, so the result is the same bits on every run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "nibble/quant/cuda/quantize_cuda.h"  // ProducerAmax

namespace nibble::nn::cuda::detail {

inline constexpr int64_t kFlashTile = 64;  // query rows and keys per tile; Tp is a multiple of it

// The padded head dimension the fused kernels are compiled for: 64 or 128; 0 when hd > 128
// (the caller falls back to the batched-GEMM core).
inline int64_t flash_head_dim(int64_t hd) { return hd <= 64 ? 64 : hd <= 128 ? 128 : 0; }

struct FlashDims {
  int64_t B, T, Tp, H, KV, hd, HD;  // hd: the model's head dimension; HD: padded (64 or 128)
  float scale;                      // 1 / sqrt(hd)
};

// Row t of head h of sequence b: base + b * batch + h * head + t * row (strides in elements). The
// kernels read HD elements of up to Tp rows from it, 16 bytes at a time (base and strides 16-byte
// aligned; check_flash_views).
template <typename E>
struct HeadRows {
  E* base = nullptr;
  int64_t batch = 0, head = 0, row = 0;
  __host__ __device__ E* at(int64_t b, int64_t h, int64_t t) const { return base + b * batch + h * head + t * row; }
};
// The packed layout [B, heads, Tp, HD].
template <typename E>
HeadRows<E> packed_heads(E* p, const FlashDims& d, int64_t heads) {
  return {p, heads * d.Tp * d.HD, d.Tp * d.HD, d.HD};
}
// Heads in place in the rows of a [B*T x width] matrix, the first at column `col0`.
template <typename E>
HeadRows<E> heads_in_rows(E* p, const FlashDims& d, int64_t width, int64_t col0) {
  return {p + col0, d.T * width, d.hd, width};
}
// Where backward's dq, dk or dv go: FP32 (f32) or BF16 rounded to nearest even (b16), one of them.
struct HeadGrad {
  HeadRows<float> f32;
  HeadRows<__nv_bfloat16> b16;
};

// Throws std::invalid_argument, naming the fused attention kernels, when d is outside what they
// handle: HD 64 or 128 with 0 < hd <= HD, 0 < T <= Tp with Tp a multiple of kFlashTile, H a multiple
// of KV, and B, H and KV within the grid's y and z limits (65535). flash_forward and
// flash_backward call it; it is host code (tested on the CPU in tests/cuda_emulation).
void check_flash_dims(const FlashDims& d);
// Throws std::invalid_argument unless the views' pointers and strides are 16-byte aligned and, where
// they are not the packed layout, T = Tp and hd = HD (the kernels read whole tiles of HD columns).
void check_flash_views(const FlashDims& d, std::initializer_list<HeadRows<const __nv_bfloat16>> in,
                       std::initializer_list<HeadGrad> out = {});

// Dynamic shared memory per block of the largest of the three kernels at padded head dimension HD
// (64 or 128). Above 48 KiB a kernel must opt in, up to the device's
// cudaDevAttrMaxSharedMemoryPerBlockOptin (227 KiB on Hopper; 99 KiB on GPUs of compute capability
// 8.6, 8.9 and 12.x, which HD 128 exceeds).
size_t flash_shared_bytes(int64_t HD);

// Whether the current device lets the kernels at padded head dimension HD have their shared memory.
bool flash_fits_device(int64_t HD);

// Forward. Writes out [B*T x H*hd] (FP32, the heads' outputs), o (BF16 copy of the normalised
// output, padded layout, for backward's rowsum(dO o)) and lse [B, H, Tp]: per row, the base-2
// log-sum-exp log2(sum_j 2^(s_j * scale * log2 e)) of the row's causal scores. With out16, the
// heads' outputs go there in BF16 (the values of o) instead of to out (unused then).
// `amax` (with out16; nibble::cuda::ProducerAmax): the amax of the fused NVFP4 pass over out16
// [B*T x H*hd], which the Hopper kernel computes where T is a multiple of 16 (its warps' 16 rows are
// then the pass's 16-row blocks). Returns whether it was computed; the caller runs the pass otherwise.
using BF16Heads = HeadRows<const __nv_bfloat16>;
bool flash_forward(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, float* out, __nv_bfloat16* o, float* lse,
                   cudaStream_t stream, __nv_bfloat16* out16 = nullptr, const nibble::cuda::ProducerAmax& amax = {});

// Backward, from dO (BF16, zero rows beyond T) and delta [B, H, Tp] = rowsum(dO o) (attention_cuda.cu's
// pack_dout_kernel computes it). Writes dq (H heads), dk and dv (KV heads; overwritten, every row
// up to Tp of a packed view; dk and dv summed over the heads of each KV group in a fixed order).
// `amax`: that of the fused NVFP4 pass over the three in BF16 in place, the rows of d_qkv
// [B*T x (H + 2 KV) hd] (heads_in_rows views), computed by the Hopper kernels where T is a multiple
// of 16; returns whether it was (as flash_forward).
// `o` (the forward's packed o): the kernels compute delta themselves, the same bits, and write it
// to `delta`; only where flash_delta_in_kernel(d) (std::logic_error otherwise).
bool flash_backward(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, const float* lse,
                    float* delta, HeadGrad dq, HeadGrad dk, HeadGrad dv, cudaStream_t stream,
                    const nibble::cuda::ProducerAmax& amax = {}, BF16Heads o = {});
// Whether flash_backward computes delta from `o` for these dims: the Hopper kernels, T = Tp and
// hd = HD = 64 (nothing padded).
bool flash_delta_in_kernel(const FlashDims& d);

// Hopper (sm_90a) kernels for HD 64 with Tp a multiple of 128 (attention_flash_sm90.cu: wgmma, blocks
// of 128 queries or keys, tiles of 64 of the other), which flash_forward and flash_backward take where
// flash_sm90_applies: on a device of compute capability 9.0, unless set_flash_wgmma(false) keeps the
// mma.sync kernels (process-wide; for the benchmarks and tests that compare the two).
bool flash_sm90_applies(const FlashDims& d);
void set_flash_wgmma(bool enabled);
// `amax` (may be empty): computed in the kernels, as flash_forward and flash_backward say where.
void flash_forward_sm90(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, float* out, __nv_bfloat16* o,
                        float* lse, __nv_bfloat16* out16, const nibble::cuda::ProducerAmax& amax, cudaStream_t stream);
void flash_backward_sm90(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, BF16Heads o,
                         const float* lse, float* delta, HeadGrad dq, HeadGrad dk, HeadGrad dv,
                         const nibble::cuda::ProducerAmax& amax, cudaStream_t stream);

}  // namespace nibble::nn::cuda::detail
