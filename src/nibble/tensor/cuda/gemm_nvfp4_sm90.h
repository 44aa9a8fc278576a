// A Hopper GEMM that reads NVFP4 operands as they are stored (4.5 bits an element) and decodes them
// in its operand load: the "dequantization fused into the GEMM" of the Hopper emulation (DESIGN.md),
// in place of a decode pass that writes BF16 copies for cuBLASLt to read again.
//
//   C[m x n] = alpha * sum_k A[i, k] B[j, k]  (+ C when accumulating),   C row-major FP32 or BF16
//
// Each operand is [rows x k] with k contiguous (the NT layout of every GEMM of the recipe): packed
// E2M1 codes, two per byte, element 2i in the low nibble, and E4M3 block scales, one per 16
// elements along k, row-major [rows / rows_per_scale x k / 16] (rows_per_scale = 1 for 1x16 blocks,
// 16 for 16x16 tiles). Each k-tile of codes is decoded to BF16 (code x block scale, exact: the bits
// of the decode pass, quant/fp4_decode_bf16.h) into shared memory, where the tensor cores read it
// (wgmma, FP32 accumulation); alpha (g_a g_b, a device pointer, nullptr = 1) is applied once to the
// FP32 sums. So the result equals the decode + cuBLASLt path up to the order of FP32 accumulation.
//
// Runs on compute capability 9.0 only (wgmma); shapes: m a multiple of 128, n of 256, k of 64, codes
// 16-byte and scales 2-byte aligned. nvfp4_packed_gemm_applies says whether a call can run; callers
// fall back to the decode + cuBLASLt path otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/tensor/cuda/gemm_cuda.h"

namespace nibble::cuda {

struct Nvfp4Operand {
  const uint8_t* codes = nullptr;   // [rows x k/2] bytes
  const uint8_t* scales = nullptr;  // [rows / rows_per_scale x k/16] E4M3 codes
  int rows_per_scale = 1;           // 1 (1x16 blocks) or 16 (16x16 tiles)
};

// Whether this GPU runs the kernel (compute capability 9.0).
bool nvfp4_packed_gemm_available();
// Whether the kernel takes these sizes (m a multiple of 128, n of 256, k of 64), on any GPU.
bool nvfp4_packed_gemm_shape_ok(int64_t m, int64_t n, int64_t k);
// Whether a call can run: available, shape_ok, rows_per_scale 1 or 16, aligned pointers, an
// unbatched FP32 or BF16 output.
bool nvfp4_packed_gemm_applies(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b,
                              const GemmOutput& c);

// Stream-ordered; throws std::invalid_argument where nvfp4_packed_gemm_applies is false. With a
// `split_workspace` (grown as needed, kept by the caller), a call with fewer output tiles than the
// GPU has SMs (Wgrad: small m x n, long k) splits k, writes each split's FP32 sums there and adds
// them in a fixed order in a second kernel: the same result on every run.
void nvfp4_packed_gemm(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b,
                      const GemmOutput& c, const float* alpha, bool accumulate, cudaStream_t stream,
                      DeviceBuffer<float>* split_workspace = nullptr);

}  // namespace nibble::cuda
