#include "nibble/train/metrics.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "nibble/tensor/atomic_file.h"

namespace nibble::train {

MetricsLog::MetricsLog(const std::filesystem::path& run_dir, int64_t resume_step) : path_(run_dir / "metrics.jsonl") {
  std::string kept;
  if (resume_step >= 0 && std::filesystem::exists(path_)) {
    std::ifstream in(path_);
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= resume_step)
        kept += line + "\n";
    }
  }
  AtomicFileWriter w(path_);
  w.write(kept.data(), kept.size());
  w.commit();
  out_.open(path_, std::ios::app);
  if (!out_) throw std::runtime_error(path_.string() + ": cannot open for writing");
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
  if (!out_) throw std::runtime_error(path_.string() + ": write failed");
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long long s = std::llround(seconds);
  char buf[64];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm%02llds", s / 3600, s / 60 % 60, s % 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%llds", s);
  return buf;
}

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // Linux reports KiB
}

Progress::Progress(Mode mode, int64_t plain_every, std::FILE* out) : out_(out), plain_every_(std::max<int64_t>(plain_every, 1)) {
  if (mode == Mode::kAuto) mode = isatty(fileno(out)) ? Mode::kTerminal : Mode::kPlain;
  live_ = mode == Mode::kTerminal;
  quiet_ = mode == Mode::kQuiet;
}

void Progress::step(const ProgressFields& f) {
  if (quiet_) return;
  if (!live_ && f.step % plain_every_ != 0 && f.step != f.total) return;
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %lld/%lld | loss %.4f | lr %.3e | grad norm %.3f | %.0f tok/s | ETA %s",
                static_cast<long long>(f.step), static_cast<long long>(f.total), f.loss, f.lr, f.grad_norm,
                f.tokens_per_s, format_duration(f.eta_s).c_str());
  if (live_) {
    std::fprintf(out_, "\r\033[K%s", buf);  // rewrite the line in place
    line_open_ = true;
  } else {
    std::fprintf(out_, "%s\n", buf);
  }
  std::fflush(out_);
}

void Progress::message(const std::string& line) {
  if (quiet_) return;
  if (line_open_) std::fputc('\n', out_), line_open_ = false;
  std::fprintf(out_, "%s\n", line.c_str());
  std::fflush(out_);
}

void Progress::finish() {
  if (line_open_) std::fputc('\n', out_), line_open_ = false;
  std::fflush(out_);
}

}  // namespace nibble::train
