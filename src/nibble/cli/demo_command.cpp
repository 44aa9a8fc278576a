// `nibble demo`: see demo_command.h.
#include "nibble/cli/demo_command.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <stdexcept>

#include "nibble/cli/commands.h"
#include "nibble/cli/quantize_command.h"
#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"

namespace nibble::cli {
namespace {

// Philox streams of the demo's draws (separate from the quantizers' streams).
constexpr uint32_t kGaussStream = 0x44454D30u;    // "DEM0"
constexpr uint32_t kChannelStream = 0x44454D31u;  // "DEM1"
constexpr uint32_t kTokenStream = 0x44454D32u;    // "DEM2" (and "DEM3")

// A uniform in (0, 1) from 24 random bits (never 0, so its log is finite).
double uniform(uint32_t word) { return (static_cast<double>(word >> 8) + 0.5) * 0x1p-24; }

// A standard normal draw (Box-Muller) from two random words.
double normal(uint64_t seed, uint32_t stream, uint64_t i) {
  const Philox4x32 w = random_words(seed, stream, i);
  return std::sqrt(-2.0 * std::log(uniform(w.v[0]))) * std::cos(2.0 * M_PI * uniform(w.v[1]));
}

}  // namespace

std::vector<float> demo_activations(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<double> channel(static_cast<size_t>(cols), 1.0);
  for (int64_t c = 0; c < cols; ++c) {
    const Philox4x32 w = random_words(seed, kChannelStream, static_cast<uint64_t>(c));
    if (uniform(w.v[0]) < 0.01) channel[c] = 10.0 * std::pow(10.0, uniform(w.v[1]));  // outlier: x10..x100
  }
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const Philox4x32 w = random_words(seed, kTokenStream, static_cast<uint64_t>(r));
    double token = std::exp(0.5 * normal(seed, kTokenStream + 1, static_cast<uint64_t>(r)));
    if (uniform(w.v[0]) < 0.005) token *= 10.0 * std::pow(5.0, uniform(w.v[1]));  // massive token: x10..x50
    for (int64_t c = 0; c < cols; ++c) {
      const uint64_t i = static_cast<uint64_t>(r * cols + c);
      x[i] = static_cast<float>(normal(seed, kGaussStream, i) * token * channel[c]);
    }
  }
  return x;
}

std::vector<DemoRow> run_demo(const DemoOptions& o, std::ostream& out) {
  if (o.rows <= 0 || o.cols <= 0 || o.rows % 32 != 0 || o.cols % 32 != 0)
    throw std::invalid_argument("demo: --rows and --cols must be positive multiples of 32 (got " +
                                std::to_string(o.rows) + " x " + std::to_string(o.cols) + ")");
  using Clock = std::chrono::steady_clock;
  const std::vector<float> x = demo_activations(o.rows, o.cols, o.seed);

  std::vector<DemoRow> rows;
  {  // BF16, the unquantized baseline: every element rounded to nearest even.
    const auto t0 = Clock::now();
    std::vector<float> b(x.size());
    for (size_t i = 0; i < x.size(); ++i) b[i] = BF16::decode(BF16::encode(x[i], Rounding::kNearestEven));
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    const ErrorStats e = error_stats(x, b);
    rows.push_back({"bf16 (baseline)", 16.0, e.relative_rms, e.snr_db, ms});
  }
  struct Config {
    const char* label;
    QuantSpec spec;
  };
  const auto spec = [&](Format f, Block b, Rounding r = Rounding::kNearestEven, bool columnwise = false,
                        bool rht = false) {
    QuantSpec s = make_spec(f, b, r, columnwise, rht);
    s.seed = o.seed;
    return s;
  };
  const std::vector<Config> configs = {
      {"fp8_e4m3 per-tensor", spec(Format::kFp8E4M3, Block::kTensor)},
      {"mxfp4 1x32 (E8M0 scales)", spec(Format::kMxfp4, Block::k1x32)},
      {"nvfp4 1x16 (activations)", spec(Format::kNvfp4, Block::k1x16)},
      {"nvfp4 16x16 (weights)", spec(Format::kNvfp4, Block::k16x16)},
      {"nvfp4 1x16 sr (gradients)", spec(Format::kNvfp4, Block::k1x16, Rounding::kStochastic)},
      {"nvfp4 1x16 columnwise", spec(Format::kNvfp4, Block::k1x16, Rounding::kNearestEven, true)},
      {"nvfp4 1x16 columnwise rht (Wgrad)", spec(Format::kNvfp4, Block::k1x16, Rounding::kNearestEven, true, true)},
  };
  for (const Config& c : configs) {
    const auto t0 = Clock::now();
    const QuantizedTensor q = quantize(std::span<const float>(x), o.rows, o.cols, c.spec);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    const ErrorStats e = error_stats(x, dequantize_as_input(q));
    rows.push_back({c.label, bits_per_element(q), e.relative_rms, e.snr_db, ms});
  }

  char line[160];
  out << "nibble demo: " << o.rows << " x " << o.cols
      << " activation-like matrix (Gaussian; ~1% outlier channels x10..x100, ~0.5% massive tokens x10..x50), seed "
      << o.seed << "\n\n";
  std::snprintf(line, sizeof line, "%-36s %10s %14s %8s %10s\n", "format", "bits/elem", "rel. RMS err", "SNR dB",
                "time ms");
  out << line;
  for (const DemoRow& r : rows) {
    std::snprintf(line, sizeof line, "%-36s %10.3f %14.4g %8.2f %10.2f\n", r.label.c_str(), r.bits_per_element,
                  r.relative_rms, r.snr_db, r.milliseconds);
    out << line;
  }
  out << "\nbits/elem counts the block and tensor scales. Errors are measured against the input, with the RHT\n"
         "and the transpose undone. Stochastic rounding has the larger error per element but no bias, which\n"
         "is what gradients need. Times are the single-threaded CPU reference quantizer.\n";
  return rows;
}

void add_demo_command(CLI::App& app) {
  auto o = std::make_shared<DemoOptions>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "Quantize a random activation-like matrix with NVFP4 (1x16, 16x16, RHT, SR), MXFP4 and FP8, and "
              "compare their error and size");
  cmd->add_option("--rows", o->rows, "Rows (tokens), a multiple of 32")->capture_default_str();
  cmd->add_option("--cols", o->cols, "Columns (channels), a multiple of 32")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed of the random matrix and of stochastic rounding")->capture_default_str();
  cmd->callback([o] { run_demo(*o, std::cout); });
}

}  // namespace nibble::cli
