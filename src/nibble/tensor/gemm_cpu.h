// CPU GEMM that emulates a low-precision tensor-core GEMM exactly up to accumulation order.
//
// Every operand is held in the layout a tensor core reads: row-major with the reduction dimension
// K contiguous ("NT": C = A B^T with A M x K and B N x K). Its values are exactly representable in
// the operand's format: FP4/FP8 codes times their block scales (products of at most 6 significant
// bits, exact in float and in BF16), BF16-rounded values, or plain floats. The per-tensor decode
// scales g_a, g_b are left out of the operands and applied once to the FP32 accumulator, as
// alpha = g_a * g_b, the way a Hopper (BF16 emulation) or Blackwell (native FP4) GEMM epilogue does.
// Accumulation is FP32 (OpenBLAS sgemm); only its order differs from a GPU's.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "nibble/quant/quantized_tensor.h"

namespace nibble {

struct GemmOperand {
  int64_t rows = 0;  // M (or N)
  int64_t cols = 0;  // K, contiguous
  std::vector<float> values;
  float decode_scale = 1.0f;  // g, applied in the epilogue (NaN for a non-finite quantized tensor)
};

// A quantized matrix as an operand: code * block_scale per element, g kept apart.
GemmOperand gemm_operand(const QuantizedTensor& q);
// A float matrix as an operand, unchanged (the "fp32" format: no quantization).
GemmOperand gemm_operand_fp32(std::span<const float> x, int64_t rows, int64_t cols);
// A float matrix rounded to BF16 (round-to-nearest-even), then held in float.
GemmOperand gemm_operand_bf16(std::span<const float> x, int64_t rows, int64_t cols);

// c (a.rows x b.rows, row-major) = (g_a * g_b) * A B^T, plus the old c when accumulate is set.
// Throws std::invalid_argument when the shapes do not match.
void gemm_nt(const GemmOperand& a, const GemmOperand& b, std::span<float> c, bool accumulate = false);

// Plain FP32 NT GEMM: c = alpha * a b^T + beta * c (a: m x k, b: n x k, c: m x n, all row-major).
void sgemm_nt(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, float alpha,
              float beta);

}  // namespace nibble
