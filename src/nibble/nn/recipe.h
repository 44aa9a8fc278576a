// A training recipe as data: for each operand of a linear layer's three GEMMs, its format, block
// shape, rounding and whether the Random Hadamard Transform precedes quantization; plus the
// model-level fields the trainer needs (layers kept in BF16, switch to BF16 late in training).
//
// The six operands, each in the layout its GEMM reads (reduction dimension contiguous):
//   fprop.x   X     [tokens x in ]  Y  = X W^T   blocks along in_features
//   fprop.w   W     [out x in    ]               blocks along in_features
//   dgrad.dy  dY    [tokens x out]  dX = dY W    blocks along out_features
//   dgrad.w   W^T   [in x out    ]               W's columnwise copy
//   wgrad.dy  dY^T  [out x tokens]  dW = dY^T X  blocks along tokens (columnwise copy of dY)
//   wgrad.x   X^T   [in x tokens ]               blocks along tokens (columnwise copy of X)
// Columnwise copies are always quantized from the high-precision tensor, never from a rowwise copy.
//
// Presets (preset_names()):
//   fp32        no quantization anywhere (tests)
//   bf16        every operand rounded to BF16, FP32 accumulation
//   fp8         E4M3 everywhere, per-tensor current scaling (TransformerEngine's default Format.E4M3)
//   fp8_hybrid  E4M3 for X and W, E5M2 for dY (TransformerEngine's Format.HYBRID)
//   nvfp4       the paper's recipe: W 16x16 RNE; X 1x16 RNE; dY 1x16 stochastic rounding (Dgrad and
//               Wgrad); RHT on both Wgrad inputs along the token dimension; the first and last
//               blocks in bf16 at the paper's ratio (2 and 8 of 62 blocks: "auto", rounded, so a
//               12-block GPT-2 keeps its last 2 blocks in bf16, a 24-block one its first 1 and last 3)
//   mxfp4       nvfp4's techniques with MXFP4 operands (1x32 E8M0 blocks everywhere: MX has no 2D
//               blocks); our choice for a like-for-like comparison
// and the ablations of nvfp4 (also applicable to any recipe, see apply_override):
//   no_rht   RHT off on the Wgrad inputs
//   no_2d    weights in 1x16 blocks instead of 16x16 tiles
//   no_sr    round-to-nearest-even for the gradients too
//
// Overrides (command line `--recipe nvfp4 --recipe-set no_rht --recipe-set wgrad.dy.rounding=rne`,
// applied left to right by make_recipe) are either an ablation name above or key=value with keys
//   <gemm>.<operand>.format     fp32 | bf16 | fp8_e4m3 | fp8_e5m2 | mxfp4 | nvfp4
//   <gemm>.<operand>.block      tensor | 1x16 | 16x16 | 1x32
//   <gemm>.<operand>.rounding   rne | sr
//   <gemm>.<operand>.rht        true | false
//   name, bf16_first_blocks, bf16_last_blocks (integer or "auto"), bf16_switch_fraction,
//   rht_sign_seed (integer or "default")
// with <gemm>.<operand> one of the six above. Setting a format also resets that operand's block to
// the format's default (nvfp4 1x16, mxfp4 1x32, otherwise tensor) and, for fp32/bf16, its rounding
// to rne, so "fprop.x.format=bf16" alone gives a valid operand; set block/rounding after it.
//
// TOML files (configs/recipes/*.toml) hold the same keys:
//   base = "nvfp4"                 # optional preset to start from (default: every operand must be given)
//   name = "my_recipe"             # default: the base preset's name, or the file name without .toml
//   bf16_first_blocks = 2
//   [wgrad.dy]
//   rounding = "rne"
// Unknown keys, unknown names and invalid combinations are errors naming the file and the key.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/quant/quantized_tensor.h"

namespace nibble::nn {

class RecipeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The formats an operand can take: the quantizer's formats plus the two unquantized ones.
enum class OperandFormat : uint8_t { kFp32, kBf16, kFp8E4M3, kFp8E5M2, kMxfp4, kNvfp4 };
inline bool is_fp4(OperandFormat f) { return f == OperandFormat::kNvfp4 || f == OperandFormat::kMxfp4; }

struct OperandRecipe {
  OperandFormat format = OperandFormat::kFp32;
  Block block = Block::kTensor;
  Rounding rounding = Rounding::kNearestEven;
  bool rht = false;

  bool quantized() const { return format != OperandFormat::kFp32 && format != OperandFormat::kBf16; }
  bool operator==(const OperandRecipe&) const = default;
};

// bf16_first_blocks / bf16_last_blocks value meaning the paper's ratio: round(2/62 and 8/62 of the
// model's blocks), from the 12B model's first 2 and last 8 of 62 blocks kept in BF16.
inline constexpr int kBf16BlocksPaperRatio = -1;

enum class Operand : uint8_t { kFpropX, kFpropW, kDgradDy, kDgradW, kWgradDy, kWgradX };
inline constexpr int kNumOperands = 6;
inline constexpr std::array<Operand, kNumOperands> kAllOperands = {
    Operand::kFpropX, Operand::kFpropW, Operand::kDgradDy, Operand::kDgradW, Operand::kWgradDy, Operand::kWgradX};

const char* operand_name(Operand op);  // "fprop.x", ...
// Whether the operand is quantized as the columnwise (transposed) copy of its high-precision tensor.
bool operand_columnwise(Operand op);

struct Recipe {
  std::string name = "fp32";
  std::array<OperandRecipe, kNumOperands> operands{};
  // RHT sign vector: TransformerEngine's default, or drawn from this seed (one vector per run).
  std::optional<uint64_t> rht_sign_seed;
  // Selective high precision: the first/last transformer blocks whose linear layers use bf16;
  // kBf16BlocksPaperRatio ("auto") takes the paper's ratio for the model's depth.
  int bf16_first_blocks = 0;
  int bf16_last_blocks = 0;
  // Fraction of the training tokens after which every layer switches to bf16 (1 = never).
  double bf16_switch_fraction = 1.0;

  OperandRecipe& operator[](Operand op) { return operands[static_cast<int>(op)]; }
  const OperandRecipe& operator[](Operand op) const { return operands[static_cast<int>(op)]; }
  RhtSigns rht_signs() const;
  // Whether block `index` (0-based) of a model with `num_blocks` blocks keeps its linears in bf16,
  // and the resolved counts.
  bool keeps_bf16(int index, int num_blocks) const;
  int first_bf16_blocks(int num_blocks) const;
  int last_bf16_blocks(int num_blocks) const;
  bool operator==(const Recipe&) const = default;
};

std::vector<std::string> preset_names();
Recipe preset(std::string_view name);  // throws RecipeError for an unknown name

// Throws RecipeError naming the operand and the problem (format/block/rounding/RHT mismatches,
// out-of-range model fields).
void validate(const Recipe& recipe);

// One override (see the top of this file). `source` names where it came from in error messages.
void apply_override(Recipe& recipe, std::string_view override_text, std::string_view source = "override");

// Parses a recipe file's text (see the top of this file); `source` (the file name) starts every
// error message. The result is validated.
Recipe parse_recipe_toml(std::string_view text, std::string_view source);
Recipe load_recipe_file(const std::filesystem::path& path);

// `base` is a preset name or the path of a TOML file (anything ending in .toml); then the
// overrides, left to right; then validation.
Recipe make_recipe(std::string_view base, std::span<const std::string> overrides = {});

// The recipe as a complete TOML document (no base): loads back to an equal recipe.
std::string to_toml(const Recipe& recipe);
// A one-line summary, e.g. "nvfp4: fprop x=nvfp4 1x16 rne w=nvfp4 16x16 rne | dgrad ...".
std::string describe(const Recipe& recipe);

const char* operand_format_name(OperandFormat f);
// The quantizer format of a quantized operand format (throws for fp32/bf16).
Format quant_format(OperandFormat f);

}  // namespace nibble::nn
