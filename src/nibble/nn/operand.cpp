#include "nibble/nn/operand.h"

#include <stdexcept>
#include <string>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"

namespace nibble::nn {

uint64_t layer_step_seed(uint64_t run_seed, uint32_t layer_id, uint64_t step, uint32_t microbatch) {
  const Philox4x32 out = philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), layer_id, microbatch}},
      static_cast<uint32_t>(run_seed), static_cast<uint32_t>(run_seed >> 32));
  return static_cast<uint64_t>(out.v[0]) | static_cast<uint64_t>(out.v[1]) << 32;
}

uint32_t operand_stream(Operand op) { return kOperandStreamBase + static_cast<uint32_t>(op); }

QuantSpec operand_quant_spec(const OperandRecipe& r, Operand op, RhtSigns signs, uint64_t seed) {
  QuantSpec s;
  s.format = quant_format(r.format);
  s.block = r.block;
  s.rounding = r.rounding;
  s.columnwise = operand_columnwise(op);
  s.rht = r.rht;
  s.rht_signs = signs;
  s.seed = seed;
  s.stream = operand_stream(op);
  return s;
}

OperandCopy OperandCopy::make(std::span<const float> x, int64_t rows, int64_t cols, const OperandRecipe& r,
                              Operand op, RhtSigns signs, uint64_t seed) {
  if (static_cast<int64_t>(x.size()) != rows * cols)
    throw std::invalid_argument(std::string(operand_name(op)) + ": the input holds " + std::to_string(x.size()) +
                                " elements, not " + std::to_string(rows) + "x" + std::to_string(cols));
  const bool columnwise = operand_columnwise(op);
  OperandCopy c;
  c.rows_ = columnwise ? cols : rows;
  c.cols_ = columnwise ? rows : cols;
  if (r.quantized()) {
    c.packed_ = quantize(x, rows, cols, operand_quant_spec(r, op, signs, seed));
    return c;
  }
  // Unquantized: the same layout and transform as the quantizer would apply, in float.
  std::vector<float> m(x.begin(), x.end());
  if (columnwise) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) m[j * rows + i] = x[i * cols + j];
  }
  if (r.rht) {
    if (c.cols_ % kRhtBlock != 0)
      throw std::invalid_argument(std::string(operand_name(op)) + ": the RHT needs the contiguous dimension (" +
                                  std::to_string(c.cols_) + ") to be a multiple of 16");
    rht_blocks(m, c.rows_, c.cols_, signs);
  }
  if (r.format == OperandFormat::kBf16) {
    c.bf16_.resize(m.size());
    for (size_t i = 0; i < m.size(); ++i) c.bf16_[i] = BF16::encode(m[i], Rounding::kNearestEven);
  } else {
    c.fp32_ = std::move(m);
  }
  return c;
}

GemmOperand OperandCopy::gemm_operand() const {
  if (packed_) return nibble::gemm_operand(*packed_);
  if (!bf16_.empty() || fp32_.empty()) {
    GemmOperand g{rows_, cols_, std::vector<float>(bf16_.size()), 1.0f};
    for (size_t i = 0; i < bf16_.size(); ++i) g.values[i] = BF16::decode(bf16_[i]);
    return g;
  }
  return gemm_operand_fp32(fp32_, rows_, cols_);
}

int64_t OperandCopy::bytes() const {
  if (packed_)
    return static_cast<int64_t>(packed_->data.size() + packed_->scales.size() + sizeof(packed_->decode_scale));
  return static_cast<int64_t>(bf16_.size() * sizeof(uint16_t) + fp32_.size() * sizeof(float));
}

}  // namespace nibble::nn
