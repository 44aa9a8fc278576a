// CPU reference quantizers. Every backend is held to these bit for bit.
//
// Defined behaviour at the edges:
// - Shapes: the quantized matrix's contiguous dimension must be a multiple of the block width
//   (16 for NVFP4 1x16 and for the RHT, 32 for MXFP4) and, for 16x16 tiles, its rows a multiple
//   of 16. Other shapes are rejected with std::invalid_argument (nibble never pads silently).
// - All-zero tensors: NVFP4 takes S = FLT_MAX and every code is zero; FP8 takes S = 1.
// - NaN or +-Inf anywhere in the input (after the RHT, which spreads them over their block):
//   NVFP4 and FP8 mark the whole tensor non-finite (decode_scale = NaN, data and scales zero,
//   dequantization gives NaN everywhere), so that a training step can detect it and skip or stop;
//   MXFP4 follows OCP MX v1.0 per block: the block's scale is the NaN code 0xFF, its elements zero.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/quantized_tensor.h"

namespace nibble {

// Quantizes the row-major rows x cols matrix x (or its transpose, see QuantSpec::columnwise).
QuantizedTensor quantize(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec);
QuantizedTensor quantize(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec);

// The values the quantized tensor stands for, as a row-major q.rows x q.cols float matrix
// (x' = code * block_scale * decode_scale, in that order). With spec.rht these are the
// transformed values: undo with rht_blocks(..., inverse).
std::vector<float> dequantize(const QuantizedTensor& q);

// The same values without the per-tensor decode scale (code * block_scale), as a GEMM operand:
// exact in float (an E2M1 code times an E4M3 or E8M0 scale, or an FP8 code), with g left for the
// GEMM's alpha = g_a * g_b. A non-finite tensor gives NaN everywhere.
std::vector<float> dequantize_unscaled(const QuantizedTensor& q);

// Applies the RHT in place to each 16-element block along the rows of a rows x cols matrix.
// The transform's inverse is its transpose, H16 diag(signs) / 4; `inverse` applies that.
void rht_blocks(std::span<float> x, int64_t rows, int64_t cols, RhtSigns signs, bool inverse = false);

// Unpacks element i of a packed FP4 buffer (low nibble first).
inline uint8_t fp4_code_at(const std::vector<uint8_t>& data, int64_t i) {
  const uint8_t byte = data[static_cast<size_t>(i >> 1)];
  return (i & 1) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0xF);
}

}  // namespace nibble
