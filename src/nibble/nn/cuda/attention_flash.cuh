// Fused (flash-style) causal attention kernels behind AttentionCoreCuda (internal to
// src/nibble/nn/cuda). Operands are the packed BF16 heads of attention_cuda.cu:
//   q, o [B, H, Tp, HD], k, v [B, KV, Tp, HD]   (rows padded with zeros to Tp, a multiple of
//   kFlashTile; head dimension padded with zeros to HD = 64 or 128, see flash_head_dim)
// Scores never reach global memory: each block keeps a 64 x 64 tile of them in registers (BF16
// tensor-core mma.sync m16n8k16, FP32 accumulation), with the online softmax in FP32 and the key
// tiles above the diagonal skipped. Backward recomputes P from the saved log-sum-exp in two
// kernels that each own their outputs (dk, dv per key tile; dq per query tile): no atomics, so
// the result is the same bits on every run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nibble::nn::cuda::detail {

inline constexpr int64_t kFlashTile = 64;  // query rows and keys per tile; Tp is a multiple of it

// The padded head dimension the fused kernels are compiled for: 64 or 128; 0 when hd > 128
// (the caller falls back to the batched-GEMM core).
inline int64_t flash_head_dim(int64_t hd) { return hd <= 64 ? 64 : hd <= 128 ? 128 : 0; }

struct FlashDims {
  int64_t B, T, Tp, H, KV, hd, HD;  // hd: the model's head dimension; HD: padded (64 or 128)
  float scale;                      // 1 / sqrt(hd)
};

// Forward. Writes out [B*T x H*hd] (FP32, the heads' outputs), o (BF16 copy of the normalised
// output, padded layout, for backward's rowsum(dO o)) and lse [B, H, Tp]: per row, the base-2
// log-sum-exp log2(sum_j 2^(s_j * scale * log2 e)) of the row's causal scores.
void flash_forward(const FlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                   float* out, __nv_bfloat16* o, float* lse, cudaStream_t stream);

// Backward, from dO [B, H, Tp, HD] (BF16, zero rows beyond T) and delta [B, H, Tp] = rowsum(dO o).
// Writes dq [B, H, Tp, HD], dk and dv [B, KV, Tp, HD] (FP32, overwritten; dk and dv summed over
// the heads of each KV group in a fixed order).
void flash_backward(const FlashDims& d, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
                    const __nv_bfloat16* dout, const float* lse, const float* delta, float* dq, float* dk, float* dv,
                    cudaStream_t stream);

}  // namespace nibble::nn::cuda::detail
