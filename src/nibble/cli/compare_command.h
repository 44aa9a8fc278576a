// `nibble compare`: reads the metrics of finished (or running) training runs, writes one SVG with
// their training losses and their relative loss gap to a baseline run, and prints a summary table.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace nibble::cli {

// What one run directory holds: its training steps and validation losses from metrics.jsonl.
struct RunMetrics {
  std::filesystem::path dir;
  std::string name;    // the directory's name
  std::filesystem::path folder;  // the folder holding it (canonical; a seed set with --paired)
  std::string recipe;  // the recipe's name from run.txt ("" when run.txt is missing)
  struct Step {
    int64_t step = 0, tokens = 0;
    double loss = 0;  // NaN where the run logged a non-finite loss
  };
  struct Val {
    int64_t step = 0, tokens = 0;
    double loss = 0;
  };
  std::vector<Step> steps;  // in step order
  std::vector<Val> val;     // in step order
};

// Throws std::runtime_error naming the file (and line) when metrics.jsonl is missing or malformed.
RunMetrics read_run(const std::filesystem::path& dir);

struct CompareOptions {
  std::vector<std::filesystem::path> runs;
  std::optional<std::filesystem::path> baseline;  // default: the first run; added in front if not among runs
  std::filesystem::path out = "compare.svg";
  std::string x = "tokens";  // tokens | step: the plots' x axis and what losses are matched on
  double smooth = 0.9;       // EMA factor of the plotted training loss (0: raw)
  // Runs repeated over seeds: each folder holding runs is one seed's set (OUT_SEED/RUN, as
  // scripts/experiments.sh writes), and a run's gaps are taken against the baseline's namesake in
  // its own folder (paired by seed); the table ends with each run name's mean gap over the sets.
  bool paired = false;
};

// Each run name's gap over the seed sets (--paired).
struct SeedSummary {
  std::string name;
  int sets = 0;                        // runs of this name with a baseline beside them
  double mean_val_loss = 0, mean_gap = 0;
  double gap_std = 0;                  // sample standard deviation of the gaps (0 with one set)
  double min_gap = 0, max_gap = 0;
};

struct CompareRow {
  std::string name, recipe;  // name: the folder's name, or parent/name where names repeat
  int64_t tokens = 0;    // at the last logged step
  double train_loss = 0; // the last step's loss
  double val_loss = 0;   // the last validation loss (NaN if none)
  double val_gap = 0;    // (val_loss - baseline's) / baseline's, in percent (NaN if either has none)
  bool baseline = false;
};

// Bias-corrected exponential moving average (factor in [0, 1)); non-finite values are skipped.
std::vector<double> ema(const std::vector<double>& y, double factor);

// The relative gap in percent, (y - base) / base, of a curve (x, y) to a baseline curve (base_x,
// base_y; x increasing) at matching x: the baseline is interpolated linearly between its points
// (its non-finite points left out); NaN where x lies outside the baseline's range.
std::vector<double> relative_gap(const std::vector<double>& base_x, const std::vector<double>& base_y,
                                 const std::vector<double>& x, const std::vector<double>& y);

// Writes the SVG (atomically) and prints the table to `out`; returns the table's rows, baseline first.
// With options.paired, `summary` (if given) receives the per-name statistics over the seed sets.
std::vector<CompareRow> run_compare(const CompareOptions& options, std::ostream& out,
                                    std::vector<SeedSummary>* summary = nullptr);

}  // namespace nibble::cli
