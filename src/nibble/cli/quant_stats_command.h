// `nibble quant-stats`: where quantization error concentrates. For every transformer linear layer
// of a checkpoint -- its weight W, and (given token data) its input X and output gradient dY from
// one forward/backward pass of the model on the CPU -- or for one synthetic tensor, the error of
// each quantization scheme the recipes use:
//   relative MSE = ||x - q(x)||^2 / ||x||^2,   SNR = -10 log10(relative MSE) dB,   in double,
// with q(x) the dequantized tensor in x's own layout and domain: a columnwise copy is transposed
// back and an RHT-transformed one inverse-transformed. The RHT is orthogonal, so this equals the
// error measured in the transformed domain up to float rounding (tests/cli/quant_stats_command_test.cpp
// shows it). Every scheme rounds to nearest even (stochastic rounding trades a larger error for
// unbiasedness, which this measure cannot show).
//
// Schemes (quant_schemes()); "rows"/"cols" are the tensor's as stored: W [out x in], X [tokens x in],
// dY [tokens x out], a synthetic tensor [ROWS x COLS]:
//   nvfp4_1x16          1x16 blocks along each row: the Fprop/Dgrad layout (fprop.x, fprop.w, dgrad.dy)
//   nvfp4_1x16_col      1x16 blocks along each column: the Wgrad layout of X and dY (blocks along
//                       tokens), W^T for W (dgrad.w with 1D blocks)
//   nvfp4_1x16_col_rht  the same with the 16-point RHT first, as the nvfp4 recipe's Wgrad inputs
//   nvfp4_16x16         16x16 tiles (the recipe's weights)
//   mxfp4_1x32          MXFP4, 1x32 blocks along each row
//   fp8_e4m3, fp8_e5m2  FP8 with one per-tensor (current) scale
// A scheme whose blocks do not fit a shape is reported as not applicable ("-", JSON null).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/model/gpt.h"
#include "nibble/quant/quantized_tensor.h"

namespace nibble::cli {

struct QuantScheme {
  std::string name;  // e.g. "nvfp4_1x16_col_rht"
  QuantSpec spec;
  std::string layout;  // in words, for the legend
};

const std::vector<QuantScheme>& quant_schemes();
// The named schemes in the given order (all of them when `names` is empty); throws
// std::invalid_argument naming an unknown scheme and listing the known ones.
std::vector<QuantScheme> select_schemes(const std::vector<std::string>& names);

struct SchemeError {
  double rel_mse = 0;  // NaN when the tensor holds NaN/Inf
  double snr_db = 0;   // +inf for an exact (e.g. all-zero) tensor
};

// The error of quantizing the row-major rows x cols tensor x with `spec`; nullopt when the spec's
// blocks do not fit the shape.
std::optional<SchemeError> scheme_error(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec);

struct TensorStats {
  std::string layer;   // "blocks.0.attn.qkv", or "synthetic"
  std::string tensor;  // "W", "X", "dY" (a synthetic tensor: its distribution)
  int64_t rows = 0, cols = 0;
  double amax = 0, rms = 0;
  std::vector<std::optional<SchemeError>> errors;  // one per selected scheme
};

struct QuantStatsOptions {
  // Source: exactly one of these. `checkpoint` is a checkpoint folder (step_XXXXXXXX/), its
  // model.safetensors, or a run directory (its newest checkpoint).
  std::optional<std::filesystem::path> checkpoint;
  std::optional<std::string> synthetic;  // "ROWSxCOLS"

  // Checkpoint: the model config and the recipe of the forward/backward pass (default: those in
  // the checkpoint's metadata, fp32 for a recipe it lacks, all layers bf16 when its state.json says
  // the run had switched), and the token data of the one batch (none: weights only).
  std::optional<std::filesystem::path> config;
  std::optional<std::string> recipe;
  std::vector<std::string> data;  // a `nibble prepare` directory or token files
  std::string split = "train";    // of a prepared directory
  int64_t batch_size = 4;
  int64_t seq_len = 0;            // 0: the model's

  // Synthetic: a ROWS (tokens) x COLS (channels) tensor whose elements are
  //   gaussian          N(0, 1)
  //   outlier-channels  N(0, 1) plus, in a random outlier_fraction of the columns (at least one),
  //                     a constant offset of +-outlier_scale on every row: the persistent outlier
  //                     features of LLM activations. In the Wgrad layout (blocks along tokens) their
  //                     blocks are near-constant, which E2M1's coarse top (4, 6) represents badly
  //                     and the RHT spreads out.
  //   heavy-tailed      Student's t with 3 degrees of freedom
  std::string distribution = "gaussian";
  double outlier_fraction = 1.0 / 64;
  double outlier_scale = 16.0;

  uint64_t seed = 0;  // the batch drawn from the data, the synthetic tensor, stochastic rounding of the pass
  std::vector<std::string> schemes;  // empty: all
  std::optional<std::filesystem::path> json;
};

struct QuantStatsReport {
  std::vector<QuantScheme> schemes;
  std::vector<TensorStats> tensors;
  nlohmann::json source;  // what was measured (also the JSON file's "source")
};

// Parses "ROWSxCOLS" (positive integers); throws std::invalid_argument otherwise.
std::pair<int64_t, int64_t> parse_shape(const std::string& text);

// A rows x cols synthetic tensor (see QuantStatsOptions::distribution); throws std::invalid_argument
// for an unknown distribution.
std::vector<float> synthetic_tensor(int64_t rows, int64_t cols, const QuantStatsOptions& options);

// One forward/backward pass of `model` on the batch, calling `visit` with each transformer linear
// layer's input X [tokens x in] (during forward) and output gradient dY [tokens x out] (during
// backward) as the layer receives them, before any quantization. Gradients accumulate in the model
// as in training. Returns the mean loss.
using LinearTensorVisitor =
    std::function<void(const std::string& layer, const char* tensor, std::span<const float> x, int64_t rows, int64_t cols)>;
double capture_linear_tensors(model::Gpt& model, std::span<const uint32_t> inputs, std::span<const uint32_t> targets,
                              int64_t batch, int64_t seq, const LinearTensorVisitor& visit);

// Runs the command: prints the legend and the table of SNRs to `out`, writes options.json
// (atomically) when set. Throws an exception naming the file and the problem on bad input.
QuantStatsReport run_quant_stats(const QuantStatsOptions& options, std::ostream& out);

// The report as JSON (what --json writes).
nlohmann::json to_json(const QuantStatsReport& report);

}  // namespace nibble::cli
