// `nibble compare`: see compare_command.h.
#include "nibble/cli/compare_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "nibble/cli/commands.h"
#include "nibble/tensor/atomic_file.h"
#include "nibble/train/plot_svg.h"

namespace nibble::cli {
namespace fs = std::filesystem;
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The recipe's name from run.txt's "recipe: NAME: operands..." line.
std::string read_recipe(const fs::path& dir) {
  std::ifstream in(dir / "run.txt");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("recipe: ", 0) == 0) return line.substr(8, line.find(':', 8) - 8);
  return "";
}

// A loss field: a number, or null for a non-finite loss (JSON has no NaN).
double loss_field(const nlohmann::json& j, const char* key, const std::string& where) {
  const nlohmann::json& v = j.at(key);
  if (v.is_null()) return kNaN;
  if (!v.is_number()) throw std::runtime_error(where + ": \"" + key + "\" is not a number");
  return v.get<double>();
}

int64_t int_field(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_number_integer())
    throw std::runtime_error(where + ": missing or non-integer \"" + key + "\"");
  return j[key].get<int64_t>();
}

// Linear interpolation of (xs, ys) at x, with xs increasing; NaN outside [xs.front(), xs.back()].
double interpolate(const std::vector<double>& xs, const std::vector<double>& ys, double x) {
  if (xs.empty() || x < xs.front() || x > xs.back()) return kNaN;
  const size_t i = static_cast<size_t>(std::lower_bound(xs.begin(), xs.end(), x) - xs.begin());
  if (xs[i] == x) return ys[i];
  const double t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]);
  return ys[i - 1] + t * (ys[i] - ys[i - 1]);
}

double relative_percent(double value, double base) { return 100.0 * (value - base) / base; }

std::string fixed(double v, const char* format) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// The plotted training curve of a run: x and smoothed loss at every step.
struct Curve {
  std::vector<double> x, y;
};

}  // namespace

RunMetrics read_run(const fs::path& dir) {
  RunMetrics run;
  run.dir = dir;
  fs::path canonical = fs::weakly_canonical(dir);
  if (canonical.filename().empty()) canonical = canonical.parent_path();  // "runs/x/"
  run.name = canonical.filename().string();
  run.folder = canonical.parent_path();
  const fs::path path = dir / "metrics.jsonl";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": cannot open (is " + dir.string() + " a training run directory?)");
  std::map<int64_t, int64_t> tokens_at;  // step -> tokens, to place validation points
  std::string line;
  struct PendingVal {
    int64_t step;
    double loss;
    std::string where;
  };
  std::vector<PendingVal> pending;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path.string() + ":" + std::to_string(number);
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) throw std::runtime_error(where + ": not a JSON object");
    const int64_t step = int_field(j, "step", where);
    if (j.contains("val_loss")) {
      pending.push_back({step, loss_field(j, "val_loss", where), where});
    } else if (j.contains("loss")) {
      if (!run.steps.empty() && step <= run.steps.back().step)
        throw std::runtime_error(where + ": step " + std::to_string(step) + " after step " +
                                 std::to_string(run.steps.back().step) + " (steps must increase)");
      run.steps.push_back({step, int_field(j, "tokens", where), loss_field(j, "loss", where)});
      tokens_at[step] = run.steps.back().tokens;
    } else {
      throw std::runtime_error(where + ": neither \"loss\" nor \"val_loss\"");
    }
  }
  if (run.steps.empty()) throw std::runtime_error(path.string() + ": no training steps");
  for (const PendingVal& v : pending) {
    const auto it = tokens_at.find(v.step);
    if (it == tokens_at.end())
      throw std::runtime_error(v.where + ": validation at step " + std::to_string(v.step) + " has no training step");
    run.val.push_back({v.step, it->second, v.loss});
  }
  run.recipe = read_recipe(dir);
  return run;
}

std::vector<double> ema(const std::vector<double>& y, double factor) {
  std::vector<double> out(y.size(), kNaN);
  double m = 0, w = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (!std::isfinite(y[i])) continue;
    m = factor * m + (1 - factor) * y[i];
    w = factor * w + (1 - factor);  // dividing by the weight removes the bias towards 0 at the start
    out[i] = m / w;
  }
  return out;
}

std::vector<double> relative_gap(const std::vector<double>& base_x, const std::vector<double>& base_y,
                                 const std::vector<double>& x, const std::vector<double>& y) {
  std::vector<double> bx, by;
  for (size_t i = 0; i < base_x.size() && i < base_y.size(); ++i)
    if (std::isfinite(base_y[i])) bx.push_back(base_x[i]), by.push_back(base_y[i]);
  std::vector<double> gap;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) gap.push_back(relative_percent(y[i], interpolate(bx, by, x[i])));
  return gap;
}

namespace {

// The index of the run each run's gaps are taken against: the first run, or with `paired` the
// first run's namesake in the run's own folder.
std::vector<size_t> gap_bases(const std::vector<RunMetrics>& runs, bool paired) {
  std::vector<size_t> base(runs.size(), 0);
  if (!paired) return base;
  for (size_t r = 0; r < runs.size(); ++r) {
    const auto beside = [&](const RunMetrics& c) { return c.name == runs[0].name && c.folder == runs[r].folder; };
    const auto it = std::find_if(runs.begin(), runs.end(), beside);
    if (it == runs.end())
      throw std::invalid_argument("compare --paired: " + runs[r].dir.string() + " has no baseline run beside it (" +
                                  (runs[r].folder / runs[0].name).string() + " is not among the runs)");
    base[r] = static_cast<size_t>(it - runs.begin());
  }
  return base;
}

std::vector<SeedSummary> summarize_seeds(const std::vector<RunMetrics>& runs, const std::vector<CompareRow>& rows) {
  std::vector<SeedSummary> out;
  std::map<std::string, std::vector<size_t>> members;
  for (size_t r = 0; r < runs.size(); ++r) {
    if (rows[r].baseline || !std::isfinite(rows[r].val_gap)) continue;
    if (!members.count(runs[r].name)) out.push_back({runs[r].name});
    members[runs[r].name].push_back(r);
  }
  for (SeedSummary& s : out) {
    const std::vector<size_t>& m = members[s.name];
    s.sets = static_cast<int>(m.size());
    s.min_gap = s.max_gap = rows[m[0]].val_gap;
    for (size_t r : m) {
      s.mean_val_loss += rows[r].val_loss / s.sets;
      s.mean_gap += rows[r].val_gap / s.sets;
      s.min_gap = std::min(s.min_gap, rows[r].val_gap), s.max_gap = std::max(s.max_gap, rows[r].val_gap);
    }
    double sq = 0;
    for (size_t r : m) sq += (rows[r].val_gap - s.mean_gap) * (rows[r].val_gap - s.mean_gap);
    s.gap_std = s.sets > 1 ? std::sqrt(sq / (s.sets - 1)) : 0.0;
  }
  return out;
}

}  // namespace

std::vector<CompareRow> run_compare(const CompareOptions& o, std::ostream& out, std::vector<SeedSummary>* summary) {
  if (o.x != "tokens" && o.x != "step") throw std::invalid_argument("compare: --x must be tokens or step, not " + o.x);
  if (!(o.smooth >= 0 && o.smooth < 1)) throw std::invalid_argument("compare: --smooth must be in [0, 1)");
  std::vector<fs::path> dirs = o.runs;
  if (o.baseline) {
    const auto same = [&](const fs::path& d) { return fs::weakly_canonical(d) == fs::weakly_canonical(*o.baseline); };
    const auto it = std::find_if(dirs.begin(), dirs.end(), same);
    if (it != dirs.end()) dirs.erase(it);
    dirs.insert(dirs.begin(), *o.baseline);
  }
  if (dirs.empty()) throw std::invalid_argument("compare: no run directories given");
  std::vector<RunMetrics> runs;
  for (const fs::path& d : dirs) runs.push_back(read_run(d));
  const std::vector<size_t> base = gap_bases(runs, o.paired);
  // A run is named by its folder, or by parent/folder where two runs share a name (seed sets).
  std::map<std::string, int> uses;
  for (const RunMetrics& r : runs) ++uses[r.name];
  std::vector<std::string> label;
  for (const RunMetrics& r : runs)
    label.push_back(uses[r.name] > 1 ? r.folder.filename().string() + "/" + r.name : r.name);

  const bool by_tokens = o.x == "tokens";
  std::vector<Curve> curves;
  for (const RunMetrics& r : runs) {
    Curve c;
    std::vector<double> raw;
    for (const RunMetrics::Step& s : r.steps) {
      c.x.push_back(static_cast<double>(by_tokens ? s.tokens : s.step));
      raw.push_back(s.loss);
    }
    c.y = o.smooth > 0 ? ema(raw, o.smooth) : raw;
    curves.push_back(std::move(c));
  }

  const std::string x_label = by_tokens ? "tokens" : "step";
  const std::string smoothing = o.smooth > 0 ? " (EMA " + fixed(o.smooth, "%g") + "), validation loss as dots" : ", validation loss as dots";
  train::Figure fig;
  train::PlotPanel loss{"training loss" + smoothing, x_label, "loss", {}, false};
  train::PlotPanel gap{"loss relative to " + runs[0].name + (o.paired ? " of the same seed set" : "") +
                           ": (loss - baseline) / baseline",
                       x_label, "gap (%)", {}, true};
  for (size_t r = 0; r < runs.size(); ++r) {
    const size_t b = base[r];
    std::map<double, double> base_val;
    for (const RunMetrics::Val& v : runs[b].val) base_val[static_cast<double>(by_tokens ? v.tokens : v.step)] = v.loss;
    fig.legend.push_back(label[r] + (runs[r].recipe.empty() ? "" : " (" + runs[r].recipe + ")"));
    loss.lines.push_back({curves[r].x, curves[r].y, r, false});
    train::PlotLine val{{}, {}, r, true}, val_gap{{}, {}, r, true};
    train::PlotLine g{curves[r].x, relative_gap(curves[b].x, curves[b].y, curves[r].x, curves[r].y), r, false};
    for (const RunMetrics::Val& v : runs[r].val) {
      const double x = static_cast<double>(by_tokens ? v.tokens : v.step);
      val.x.push_back(x), val.y.push_back(v.loss);
      const auto it = base_val.find(x);
      if (it != base_val.end()) val_gap.x.push_back(x), val_gap.y.push_back(relative_percent(v.loss, it->second));
    }
    gap.lines.push_back(std::move(g));
    if (!val.x.empty()) loss.lines.push_back(std::move(val));
    if (!val_gap.x.empty()) gap.lines.push_back(std::move(val_gap));
  }
  fig.panels = {std::move(loss), std::move(gap)};
  {
    const std::string svg = train::render_svg(fig);
    AtomicFileWriter w(o.out);
    w.write(svg.data(), svg.size());
    w.commit();
  }

  std::vector<CompareRow> rows;
  for (size_t r = 0; r < runs.size(); ++r)
    rows.push_back({label[r], runs[r].recipe.empty() ? "-" : runs[r].recipe, runs[r].steps.back().tokens,
                    runs[r].steps.back().loss, runs[r].val.empty() ? kNaN : runs[r].val.back().loss, kNaN,
                    base[r] == r});
  for (size_t r = 0; r < runs.size(); ++r)
    if (!rows[r].baseline) rows[r].val_gap = relative_percent(rows[r].val_loss, rows[base[r]].val_loss);
  size_t name_w = 3, recipe_w = 6;
  for (const CompareRow& r : rows) name_w = std::max(name_w, r.name.size()), recipe_w = std::max(recipe_w, r.recipe.size());
  char buf[512];
  const auto print = [&](const std::string& a, const std::string& b, const std::string& c, const std::string& d,
                         const std::string& e, const std::string& f) {
    std::snprintf(buf, sizeof buf, "  %-*s  %-*s  %12s  %10s  %9s  %s\n", static_cast<int>(name_w), a.c_str(),
                  static_cast<int>(recipe_w), b.c_str(), c.c_str(), d.c_str(), e.c_str(), f.c_str());
    out << buf;
  };
  print("run", "recipe", "tokens", "train loss", "val loss", "val loss vs " + runs[0].name);
  for (const CompareRow& r : rows)
    print(r.name, r.recipe, std::to_string(r.tokens), fixed(r.train_loss, "%.4f"), fixed(r.val_loss, "%.4f"),
          r.baseline ? "(baseline)" : fixed(r.val_gap, "%+.2f%%"));
  if (o.paired) {
    const std::vector<SeedSummary> seeds = summarize_seeds(runs, rows);
    out << "  over the seed sets (each gap against " << runs[0].name << " of the same set):\n";
    std::snprintf(buf, sizeof buf, "  %-*s  %4s  %13s  %8s  %7s  %s\n", static_cast<int>(name_w), "run", "sets",
                  "mean val loss", "mean gap", "std", "range");
    out << buf;
    for (const SeedSummary& s : seeds) {
      std::snprintf(buf, sizeof buf, "  %-*s  %4d  %13.4f  %+7.2f%%  %6.2f%%  [%+.2f%%, %+.2f%%]\n",
                    static_cast<int>(name_w), s.name.c_str(), s.sets, s.mean_val_loss, s.mean_gap, s.gap_std,
                    s.min_gap, s.max_gap);
      out << buf;
    }
    if (summary) *summary = seeds;
  }
  out << "  plot: " << o.out.string() << "\n";
  return rows;
}

void add_compare_command(CLI::App& app) {
  auto o = std::make_shared<CompareOptions>();
  auto baseline = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "compare",
      "Compare training runs: plot their losses and their relative gap to a baseline run into one SVG, and print "
      "their final losses");
  cmd->add_option("runs", o->runs, "Run directories (each with metrics.jsonl, as `nibble train --out` writes)")
      ->required();
  cmd->add_option("--baseline", *baseline, "Run the gaps are relative to (default: the first run)");
  cmd->add_option("--out", o->out, "SVG file to write")->capture_default_str();
  cmd->add_option("--x", o->x, "x axis, and what losses are matched on: tokens | step")
      ->check(CLI::IsMember({"tokens", "step"}))
      ->capture_default_str();
  cmd->add_option("--smooth", o->smooth, "EMA factor of the plotted training loss, in [0, 1) (0: raw)")
      ->check(CLI::Range(0.0, 0.999))
      ->capture_default_str();
  cmd->add_flag("--paired", o->paired,
                 "Runs over several seeds (SEEDSET/RUN folders): gaps against the baseline's namesake in the same "
                 "folder, and each run name's mean gap and spread over the sets");
  cmd->callback([o, baseline] {
    if (!baseline->empty()) o->baseline = *baseline;
    run_compare(*o, std::cout);
  });
}

}  // namespace nibble::cli
