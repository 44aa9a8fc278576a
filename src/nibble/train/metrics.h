// Run metrics: one JSON object per line in RUN_DIR/metrics.jsonl (training steps and validation
// evaluations, told apart by their keys), and the human-facing progress output: a live line with an
// ETA rewritten in place on a terminal, plain lines when stderr is a file or pipe.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace nibble::train {

class MetricsLog {
 public:
  // Opens RUN_DIR/metrics.jsonl. When resuming from `resume_step`, lines of later steps (written
  // after that checkpoint by the interrupted run) are dropped first, so the file reads as one run;
  // a fresh run (resume_step < 0) starts an empty file.
  MetricsLog(const std::filesystem::path& run_dir, int64_t resume_step);
  void write(const nlohmann::json& record);  // one line, flushed
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

struct ProgressFields {
  int64_t step = 0, total = 0;
  double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, eta_s = 0;
};

class Progress {
 public:
  enum class Mode { kAuto, kTerminal, kPlain, kQuiet };
  Progress(Mode mode, int64_t plain_every, std::FILE* out = stderr);
  void step(const ProgressFields& f);
  void message(const std::string& line);  // a full line (ends a live line first)
  void finish();

 private:
  std::FILE* out_;
  bool live_ = false, quiet_ = false, line_open_ = false;
  int64_t plain_every_;
};

// "1h02m03s", "4m05s", "7s".
std::string format_duration(double seconds);
// Peak resident memory of this process in MiB.
double peak_rss_mib();

}  // namespace nibble::train
