// `nibble demo`: quantizes a reproducible activation-like random matrix with each recipe's formats
// and prints what each costs (bits per element) and loses (relative RMS error, SNR).
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace nibble::cli {

struct DemoOptions {
  int64_t rows = 2048;  // tokens
  int64_t cols = 1024;  // channels (hidden size)
  uint64_t seed = 0;
};

struct DemoRow {
  std::string label;
  double bits_per_element = 0;
  double relative_rms = 0;
  double snr_db = 0;
  double milliseconds = 0;
};

// An activation-like matrix: N(0, 1) per element, times a log-normal scale per token (sigma 0.5),
// with about 1% of the channels outliers scaled by 10..100 and about 0.5% of the tokens "massive"
// ones scaled by 10..50. Drawn from Philox, so the same seed gives the same
// matrix on every machine.
std::vector<float> demo_activations(int64_t rows, int64_t cols, uint64_t seed);

// Runs the demo, prints the table to `out` and returns its rows.
std::vector<DemoRow> run_demo(const DemoOptions& options, std::ostream& out);

}  // namespace nibble::cli
