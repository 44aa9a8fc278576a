#include "nibble/cli/compare_command.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "nibble/train/plot_svg.h"
#include "tensor/tensor_test_util.h"

namespace nibble::cli {
namespace {

namespace fs = std::filesystem;

struct SyntheticRun {
  std::vector<double> loss;         // per step 1..n
  std::vector<double> val;          // at steps 10, 20, ...
  int64_t tokens_per_step = 512;
};

// A noisy decaying loss curve drawn from `rng`, with validation losses every 10 steps.
SyntheticRun draw_run(std::mt19937_64& rng, int steps, double offset) {
  std::uniform_real_distribution<double> noise(-0.05, 0.05);
  SyntheticRun r;
  for (int s = 1; s <= steps; ++s) r.loss.push_back(offset + 4.0 * std::exp(-s / 15.0) + noise(rng));
  for (int s = 10; s <= steps; s += 10) r.val.push_back(offset + 0.1 + 4.0 * std::exp(-s / 15.0) + noise(rng));
  return r;
}

void write_run(const fs::path& dir, const SyntheticRun& r, const std::string& recipe) {
  fs::create_directories(dir);
  std::ofstream m(dir / "metrics.jsonl");
  for (size_t i = 0; i < r.loss.size(); ++i) {
    const int64_t step = static_cast<int64_t>(i) + 1;
    m << nlohmann::json{{"step", step}, {"loss", r.loss[i]}, {"lr", 1e-3}, {"tokens", step * r.tokens_per_step}}.dump()
      << "\n";
    if (step % 10 == 0) m << nlohmann::json{{"step", step}, {"val_loss", r.val[step / 10 - 1]}}.dump() << "\n";
  }
  if (!recipe.empty()) std::ofstream(dir / "run.txt") << "model: tiny\nrecipe: " << recipe << ": fc1 x=bf16\n";
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(CompareCommand, TwoRunsGiveTableAndPlot) {
  std::mt19937_64 rng(test::fresh_seed());
  test::TempDir dir;
  const SyntheticRun a = draw_run(rng, 40, 1.0), b = draw_run(rng, 40, 1.2);
  write_run(dir / "run-a", a, "bf16");
  write_run(dir / "run-b", b, "nvfp4");
  CompareOptions o;
  o.runs = {dir / "run-a", dir / "run-b"};
  o.out = dir / "plot.svg";
  std::ostringstream out;
  const std::vector<CompareRow> rows = run_compare(o, out);

  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].name, "run-a");
  EXPECT_EQ(rows[0].recipe, "bf16");
  EXPECT_EQ(rows[1].recipe, "nvfp4");
  EXPECT_TRUE(rows[0].baseline);
  EXPECT_FALSE(rows[1].baseline);
  EXPECT_EQ(rows[1].tokens, 40 * 512);
  EXPECT_DOUBLE_EQ(rows[0].train_loss, a.loss.back());
  EXPECT_DOUBLE_EQ(rows[1].val_loss, b.val.back());
  const double gap = 100.0 * (b.val.back() - a.val.back()) / a.val.back();
  EXPECT_NEAR(rows[1].val_gap, gap, 1e-9);

  const std::string table = out.str();
  char expect[64];
  std::snprintf(expect, sizeof expect, "%+.2f%%", gap);
  EXPECT_NE(table.find(expect), std::string::npos) << table;
  std::snprintf(expect, sizeof expect, "%.4f", b.val.back());
  EXPECT_NE(table.find(expect), std::string::npos) << table;
  EXPECT_NE(table.find("(baseline)"), std::string::npos) << table;

  const std::string svg = read_text(o.out);
  EXPECT_EQ(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0), 0u);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  EXPECT_EQ(count(svg, "<polyline"), 4u) << "one per run per panel";
  // Validation dots: 4 per run in the loss panel, and 4 per run in the gap panel (same steps).
  EXPECT_EQ(count(svg, "<circle"), 16u);
  EXPECT_EQ(count(svg, ">run-b (nvfp4)</text>"), 1u) << "legend";
  EXPECT_EQ(dir.files().size(), 3u) << "no temporary file left";
}

TEST(CompareCommand, BaselineOptionPutsThatRunFirst) {
  std::mt19937_64 rng(test::fresh_seed());
  test::TempDir dir;
  const SyntheticRun a = draw_run(rng, 30, 1.0), b = draw_run(rng, 30, 0.8), c = draw_run(rng, 30, 1.1);
  write_run(dir / "a", a, "bf16");
  write_run(dir / "b", b, "");
  write_run(dir / "c", c, "fp8");
  CompareOptions o;
  o.runs = {dir / "a", dir / "c"};
  o.baseline = dir / "b";  // not among the runs: added in front
  o.out = dir / "p.svg";
  o.x = "step";
  std::ostringstream out;
  const std::vector<CompareRow> rows = run_compare(o, out);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].name, "b");
  EXPECT_EQ(rows[0].recipe, "-");
  EXPECT_EQ(rows[1].name, "a");
  EXPECT_NEAR(rows[1].val_gap, 100.0 * (a.val.back() - b.val.back()) / b.val.back(), 1e-9);
  EXPECT_NEAR(rows[2].val_gap, 100.0 * (c.val.back() - b.val.back()) / b.val.back(), 1e-9);
  EXPECT_EQ(count(read_text(o.out), "<polyline"), 6u);

  o.runs = {dir / "a", dir / "b"};  // a baseline among the runs is not listed twice
  EXPECT_EQ(run_compare(o, out).size(), 2u);
}

TEST(CompareCommand, EmaIsBiasCorrectedAndSkipsNonFinite) {
  std::mt19937_64 rng(test::fresh_seed());
  const double v = std::uniform_real_distribution<double>(1, 5)(rng);
  const std::vector<double> s = ema({v, v, NAN, v}, 0.9);
  EXPECT_NEAR(s[0], v, 1e-12) << "no pull towards 0 at the start";
  EXPECT_NEAR(s[3], v, 1e-12);
  EXPECT_TRUE(std::isnan(s[2]));
  const std::vector<double> t = ema({1.0, 3.0}, 0.5);
  EXPECT_NEAR(t[1], (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (0.5 * 0.5 + 0.5), 1e-12);
}

TEST(CompareCommand, GapIsTakenAtMatchingTokenCounts) {
  std::mt19937_64 rng(test::fresh_seed());
  std::uniform_real_distribution<double> loss(2, 6);
  // Baseline: 1024 tokens per step for 10 steps; the other run: 1536 per step, so its points fall on
  // the baseline's or halfway between two of them, and its last ones lie beyond the baseline.
  std::vector<double> bx, by, x, y;
  for (int s = 1; s <= 10; ++s) bx.push_back(1024.0 * s), by.push_back(loss(rng));
  for (int s = 1; s <= 8; ++s) x.push_back(1536.0 * s), y.push_back(loss(rng));
  by[3] = NAN;  // a non-finite baseline loss: interpolated over
  const std::vector<double> g = relative_gap(bx, by, x, y);
  ASSERT_EQ(g.size(), x.size());
  const auto at = [&](double tokens) {
    const int i = static_cast<int>(tokens / 1024) - 1;
    const double frac = tokens / 1024 - 1 - i;
    return frac == 0 ? by[i] : by[i] * (1 - frac) + by[i + 1] * frac;
  };
  EXPECT_NEAR(g[0], 100 * (y[0] - at(1536)) / at(1536), 1e-9);  // halfway between steps 1 and 2
  EXPECT_NEAR(g[1], 100 * (y[1] - by[2]) / by[2], 1e-9);         // on step 3
  const double b4 = by[2] + (by[4] - by[2]) * 0.5;               // step 4 (NaN) lies between 3 and 5
  EXPECT_NEAR(g[3], 100 * (y[3] - by[5]) / by[5], 1e-9);         // 6144 tokens: step 6
  EXPECT_NEAR(g[2], 100 * (y[2] - (b4 + by[4]) / 2) / ((b4 + by[4]) / 2), 1e-9);  // 4608: between 4 and 5
  EXPECT_NEAR(g[5], 100 * (y[5] - by[8]) / by[8], 1e-9);
  EXPECT_TRUE(std::isnan(g[6])) << "10752 tokens: beyond the baseline's 10240";
  EXPECT_TRUE(std::isnan(g[7]));
}

TEST(CompareCommand, BadInputNamesFileAndLine) {
  std::mt19937_64 rng(test::fresh_seed());
  test::TempDir dir;
  write_run(dir / "good", draw_run(rng, 20, 1.0), "bf16");
  CompareOptions o;
  o.out = dir / "p.svg";
  std::ostringstream out;
  const auto message = [&](const std::vector<fs::path>& runs) {
    o.runs = runs;
    try {
      run_compare(o, out);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({dir / "good", dir / "missing"}).find("missing/metrics.jsonl: cannot open"), std::string::npos);

  fs::create_directories(dir / "corrupt");
  std::ofstream(dir / "corrupt" / "metrics.jsonl") << "{\"step\":1,\"loss\":2.5,\"tokens\":8}\n\n{\"step\":2,\"loss\":2.\n";
  EXPECT_NE(message({dir / "good", dir / "corrupt"}).find("corrupt/metrics.jsonl:3: not a JSON object"), std::string::npos);

  std::ofstream(dir / "corrupt" / "metrics.jsonl") << "{\"step\":1,\"loss\":2.5}\n";
  EXPECT_NE(message({dir / "corrupt"}).find("metrics.jsonl:1: missing or non-integer \"tokens\""), std::string::npos);

  std::ofstream(dir / "corrupt" / "metrics.jsonl") << "{\"step\":2,\"loss\":2.5,\"tokens\":8}\n{\"step\":1,\"loss\":2,\"tokens\":4}\n";
  EXPECT_NE(message({dir / "corrupt"}).find("metrics.jsonl:2: step 1 after step 2"), std::string::npos);

  std::ofstream(dir / "corrupt" / "metrics.jsonl") << "";
  EXPECT_NE(message({dir / "corrupt"}).find("no training steps"), std::string::npos);
  EXPECT_FALSE(fs::exists(o.out)) << "nothing written on error";
}

TEST(CompareCommand, PairedGapsAreTakenWithinEachSeedSet) {
  std::mt19937_64 rng(test::fresh_seed());
  test::TempDir dir;
  // Three seed sets; the offsets differ per set so that an unpaired gap would be visibly wrong.
  const double offsets[3] = {1.0, 1.3, 0.8};
  std::vector<SyntheticRun> bf16, nvfp4;
  for (int s = 0; s < 3; ++s) {
    bf16.push_back(draw_run(rng, 40, offsets[s]));
    nvfp4.push_back(draw_run(rng, 40, offsets[s] + 0.02 * (s + 1)));
    const fs::path set = dir / ("seed" + std::to_string(s));
    write_run(set / "bf16", bf16.back(), "bf16");
    write_run(set / "nvfp4", nvfp4.back(), "nvfp4");
  }
  CompareOptions o;
  o.runs = {dir / "seed0/nvfp4", dir / "seed1/bf16", dir / "seed1/nvfp4", dir / "seed2/nvfp4", dir / "seed2/bf16"};
  o.baseline = dir / "seed0/bf16";
  o.paired = true;
  o.out = dir / "paired.svg";
  std::ostringstream out;
  std::vector<SeedSummary> summary;
  const std::vector<CompareRow> rows = run_compare(o, out, &summary);

  ASSERT_EQ(rows.size(), 6u);
  std::vector<double> gaps;
  for (const CompareRow& r : rows) {
    const int set = r.name[4] - '0';
    ASSERT_TRUE(set >= 0 && set < 3) << r.name;
    const bool is_base = r.name.substr(6) == "bf16";
    EXPECT_EQ(r.baseline, is_base) << r.name;
    if (is_base) continue;
    const double want = 100.0 * (nvfp4[set].val.back() - bf16[set].val.back()) / bf16[set].val.back();
    EXPECT_NEAR(r.val_gap, want, 1e-9) << r.name;
    gaps.push_back(want);
  }
  ASSERT_EQ(gaps.size(), 3u);
  ASSERT_EQ(summary.size(), 1u);
  EXPECT_EQ(summary[0].name, "nvfp4");
  EXPECT_EQ(summary[0].sets, 3);
  const double mean = (gaps[0] + gaps[1] + gaps[2]) / 3;
  double sq = 0;
  for (double g : gaps) sq += (g - mean) * (g - mean);
  EXPECT_NEAR(summary[0].mean_gap, mean, 1e-9);
  EXPECT_NEAR(summary[0].gap_std, std::sqrt(sq / 2), 1e-9);
  EXPECT_DOUBLE_EQ(summary[0].min_gap, *std::min_element(gaps.begin(), gaps.end()));
  EXPECT_DOUBLE_EQ(summary[0].max_gap, *std::max_element(gaps.begin(), gaps.end()));
  EXPECT_NEAR(summary[0].mean_val_loss,
              (nvfp4[0].val.back() + nvfp4[1].val.back() + nvfp4[2].val.back()) / 3, 1e-12);
  EXPECT_NE(out.str().find("over the seed sets"), std::string::npos) << out.str();
  EXPECT_EQ(count(read_text(o.out), ">seed2/nvfp4 (nvfp4)</text>"), 1u) << "repeated names carry their folder";

  // A run without its set's baseline is an error naming the missing folder; nothing is written.
  write_run(dir / "seed3/nvfp4", draw_run(rng, 40, 1.0), "nvfp4");
  o.runs.push_back(dir / "seed3/nvfp4");
  o.out = dir / "other.svg";
  try {
    run_compare(o, out);
    ADD_FAILURE() << "a run without a baseline beside it was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("seed3"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(o.out));
}

TEST(PlotSvg, TicksAreRoundAndCoverTheRange) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int trial = 0; trial < 50; ++trial) {
    const double lo = std::uniform_real_distribution<double>(-1e3, 1e3)(rng);
    const double hi = lo + std::exp(std::uniform_real_distribution<double>(-5, 15)(rng));
    const std::vector<double> t = train::nice_ticks(lo, hi, 6);
    ASSERT_GE(t.size(), 3u) << lo << " " << hi;
    ASSERT_LE(t.size(), 12u) << lo << " " << hi;
    const double step = t[1] - t[0];
    const double mantissa = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    EXPECT_TRUE(std::abs(mantissa - 1) < 1e-6 || std::abs(mantissa - 2) < 1e-6 || std::abs(mantissa - 5) < 1e-6)
        << step;
    EXPECT_GE(t.front(), lo - step * 1e-6);
    EXPECT_LE(t.back(), hi + step * 1e-6);
    EXPECT_LT(t.front() - step, lo) << "no tick left out at the start";
  }
  EXPECT_EQ(train::tick_label(1500000), "1.5M");
  EXPECT_EQ(train::tick_label(20000), "20k");
  EXPECT_EQ(train::tick_label(0.25), "0.25");
}

TEST(PlotSvg, LongLegendsWrapInsideTheFigure) {
  train::Figure fig;
  for (int i = 0; i < 9; ++i) fig.legend.push_back("nvfp4_bf16_switch_" + std::to_string(i) + " (nvfp4+no_rht)");
  fig.panels.push_back({"loss", "tokens", "loss", {{{0, 1}, {2, 1}, 0, false}}, false});
  const std::string svg = train::render_svg(fig);
  const double width = 900;  // the figure's width (plot_svg.cpp)
  size_t rows_seen = 0, labels = 0;
  double last_y = -1;
  for (size_t at = svg.find("<text x=\""); at != std::string::npos; at = svg.find("<text x=\"", at + 1)) {
    const double x = std::stod(svg.substr(at + 9));
    const size_t y_at = svg.find("y=\"", at) + 3;
    const double y = std::stod(svg.substr(y_at));
    const size_t open = svg.find('>', at) + 1;
    const std::string label = svg.substr(open, svg.find('<', open) - open);
    if (label.rfind("nvfp4_bf16_switch_", 0) != 0) continue;
    ++labels;
    EXPECT_LE(x + 7.0 * static_cast<double>(label.size()), width) << label << " runs off the figure";
    if (y != last_y) ++rows_seen, last_y = y;
  }
  EXPECT_EQ(labels, 9u);
  EXPECT_GE(rows_seen, 3u) << "nine 33-character labels need at least three rows at 900 px";
}

}  // namespace
}  // namespace nibble::cli
