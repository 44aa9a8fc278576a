// `nibble quantize`: quantizes 2-D float tensors from a .npy or .safetensors file and writes the
// packed data, block scales and tensor scale of each to a safetensors file (layout in README.md).
// The command body is a plain function so that tests can run it in-process.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "nibble/quant/quantize.h"

namespace nibble::cli {

struct QuantizeOptions {
  std::filesystem::path input;
  std::filesystem::path output;
  std::vector<std::string> tensors;  // safetensors: these tensors; none: every 2-D F32/BF16 tensor
  std::string format = "nvfp4";      // nvfp4 | mxfp4 | fp8_e4m3 | fp8_e5m2
  std::string block;                 // 1x16 | 16x16 | 1x32 | tensor; empty: the format's default
  std::string rounding = "rne";      // rne | sr
  uint64_t seed = 0;                 // stochastic rounding
  bool rht = false;
  std::optional<uint64_t> rht_seed;  // draw the RHT signs from this seed instead of the default ones
  bool columnwise = false;
  bool dequantize = false;           // also write NAME.dequantized (F32)
  std::string input_dtype = "auto";  // .npy only: auto | f32 | bf16 ('<u2' arrays as bfloat16 bits)
  bool skip_incompatible = false;    // without --tensor: skip tensors whose shape the blocks do not fit
};

// The QuantSpec the options name, or std::invalid_argument for unknown names.
QuantSpec quant_spec_from(const QuantizeOptions& options);

// Runs the command: reads, quantizes, writes OUTPUT through a temporary file. Throws an exception
// naming the file and the problem on any error, and then leaves OUTPUT as it was.
void run_quantize(const QuantizeOptions& options, std::ostream& log);

// The values a quantized tensor stands for, in the layout and domain of the tensor that was
// quantized (rows x cols, row-major): the RHT undone and the columnwise transpose undone.
std::vector<float> dequantize_as_input(const QuantizedTensor& q);

struct ErrorStats {
  double relative_rms = 0;  // ||x' - x|| / ||x||
  double snr_db = 0;        // -20 log10(relative_rms)
};
ErrorStats error_stats(std::span<const float> x, std::span<const float> approx);

// Bits per element of a quantized tensor, its block scales and tensor scale included.
double bits_per_element(const QuantizedTensor& q);

}  // namespace nibble::cli
