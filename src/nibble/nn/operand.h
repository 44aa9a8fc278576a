// One operand of a linear layer's GEMMs as the layer keeps it (packed when quantized), and the
// derivation of the stochastic-rounding seeds.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "nibble/nn/recipe.h"
#include "nibble/quant/quantized_tensor.h"
#include "nibble/tensor/gemm_cpu.h"

namespace nibble::nn {

// Seed of a layer's random draws at one step and micro-batch: the first two words of
// Philox4x32-10 keyed by run_seed at counter {step lo, step hi, layer_id, microbatch}. Philox is a
// bijection of the counter for a fixed key, so distinct (layer, step, micro-batch) never share a
// 128-bit output; each operand then draws from its own stream of that seed (operand_stream).
uint64_t layer_step_seed(uint64_t run_seed, uint32_t layer_id, uint64_t step, uint32_t microbatch);

// Philox stream of an operand's stochastic rounding: kOperandStreamBase + its index (0..5).
inline constexpr uint32_t kOperandStreamBase = 0x4C494E00u;  // "LIN"
uint32_t operand_stream(Operand op);

// The quantizer spec of a quantized operand (format, block, rounding, layout, RHT, seed, stream).
QuantSpec operand_quant_spec(const OperandRecipe& recipe, Operand op, RhtSigns signs, uint64_t seed);

// A high-precision rows x cols matrix prepared as operand `op`: transposed first for a columnwise
// operand, RHT-transformed along its contiguous dimension if the recipe says so, then quantized
// (packed), rounded to bf16 or kept in fp32.
class OperandCopy {
 public:
  static OperandCopy make(std::span<const float> x, int64_t rows, int64_t cols, const OperandRecipe& recipe,
                          Operand op, RhtSigns signs, uint64_t seed);

  GemmOperand gemm_operand() const;
  // Bytes held: packed codes + block scales + the tensor scale, or 2 (bf16) / 4 (fp32) per element.
  int64_t bytes() const;
  const std::optional<QuantizedTensor>& packed() const { return packed_; }

 private:
  int64_t rows_ = 0, cols_ = 0;  // of the operand (transposed for columnwise ones)
  std::optional<QuantizedTensor> packed_;
  std::vector<uint16_t> bf16_;
  std::vector<float> fp32_;
};

}  // namespace nibble::nn
