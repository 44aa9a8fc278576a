// What a quantizer produces: a packed low-precision matrix with its block and tensor scales, and
// the recipe-level description (QuantSpec) of how it was made.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nibble/formats/rounding.h"
#include "nibble/quant/rht.h"

namespace nibble {

enum class Format : uint8_t {
  kNvfp4,    // E2M1 elements, E4M3 block scales, FP32 tensor scale
  kMxfp4,    // E2M1 elements, E8M0 block scales (OCP MX v1.0)
  kFp8E4M3,  // per-tensor current scaling
  kFp8E5M2,
};

// Block shape as rows x cols of the quantized matrix; scales run along its contiguous dimension.
enum class Block : uint8_t {
  kTensor,  // one scale for the whole tensor (FP8)
  k1x16,    // NVFP4 activations and gradients
  k16x16,   // NVFP4 weights: one scale per 16x16 tile, so W and W^T quantize to the same values
  k1x32,    // MXFP4
};

struct QuantSpec {
  Format format = Format::kNvfp4;
  Block block = Block::k1x16;
  Rounding rounding = Rounding::kNearestEven;
  // Quantize X^T instead of X: the columnwise copy, i.e. the operand layout the transposed GEMM
  // needs (1x16 blocks then run along X's rows, the token dimension of a Wgrad GEMM).
  bool columnwise = false;
  // Random Hadamard Transform on 16-element blocks along the quantized matrix's contiguous
  // dimension, before quantization (amax included). Only with 1D blocks.
  bool rht = false;
  RhtSigns rht_signs = kDefaultRhtSigns;
  // Stochastic rounding: element i of the quantized matrix (row-major index) draws
  // fp4_random_word(seed, stream, i) (FP4 formats: 8 bits) or random_word(seed, stream, i) (FP8).
  uint64_t seed = 0;
  uint32_t stream = 0;
};

// A spec from its most-used fields; the others keep their defaults.
inline QuantSpec make_spec(Format format, Block block, Rounding rounding = Rounding::kNearestEven,
                           bool columnwise = false, bool rht = false) {
  QuantSpec s;
  s.format = format;
  s.block = block;
  s.rounding = rounding;
  s.columnwise = columnwise;
  s.rht = rht;
  return s;
}

// Throws std::invalid_argument naming the problem if the spec is not a valid combination, or if
// a rows x cols input cannot be quantized with it (shapes must be multiples of the block size:
// nibble rejects, never pads).
void validate(const QuantSpec& spec, int64_t rows, int64_t cols);

std::string describe(const QuantSpec& spec);  // e.g. "nvfp4 1x16 rne columnwise rht"
const char* format_name(Format f);
const char* block_name(Block b);

struct QuantizedTensor {
  QuantSpec spec;
  int64_t rows = 0;  // shape of the quantized matrix: X's, or X^T's when spec.columnwise
  int64_t cols = 0;
  // FP4: rows * cols / 2 bytes, row-major, element 2i in the low nibble of byte i.
  // FP8: rows * cols bytes.
  std::vector<uint8_t> data;
  // Block scale codes, row-major: NVFP4 1x16 rows x cols/16 (E4M3); 16x16 rows/16 x cols/16;
  // MXFP4 rows x cols/32 (E8M0); FP8: none.
  std::vector<uint8_t> scales;
  // Per-tensor decode scale g (NVFP4, FP8: 1/S; MXFP4: 1). NaN marks a tensor whose input held a
  // NaN or an infinity (NVFP4, FP8): its data and scales are then all zero.
  float decode_scale = 1.0f;
  // max |x| of what was quantized (after the RHT when spec.rht); NaN/Inf if the input had them.
  float amax = 0.0f;

  int64_t scale_rows() const;
  int64_t scale_cols() const;
  int64_t numel() const { return rows * cols; }
  bool finite() const { return decode_scale == decode_scale; }
};

}  // namespace nibble
