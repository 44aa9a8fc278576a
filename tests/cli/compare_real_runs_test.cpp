// Issue 7's CI check: `nibble compare` on two real (short) CPU training runs, bf16 and nvfp4, both
// made by the `nibble train` command body, gives an SVG plot with both runs and a table naming
// both with finite final losses. (compare_command_test.cpp covers the command on synthetic logs.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <set>
#include <sstream>

#include "nibble/cli/commands.h"
#include "nibble/data/token_formats.h"
#include "tensor/tensor_test_util.h"

namespace nibble::cli {
namespace {

namespace fs = std::filesystem;

void run_command(void (*add)(CLI::App&), std::vector<std::string> args) {
  CLI::App app;
  add(app);
  std::reverse(args.begin(), args.end());  // CLI11 takes them last-first
  app.parse(args);
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(CompareRealRuns, Bf16AndNvfp4RunsGivePlotAndTable) {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  test::TempDir dir;
  // Random tokens over a 64-id vocabulary: the loss falls from ln(64) towards the data's entropy.
  std::vector<uint32_t> tokens(20000);
  for (auto& t : tokens) t = static_cast<uint32_t>(rng() % 64);
  data::write_llmc_file((dir / "train.bin").string(), tokens, 64);
  data::write_llmc_file((dir / "val.bin").string(), std::vector<uint32_t>(tokens.begin(), tokens.begin() + 3000), 64);
  // A tiny GPT (d_model 64, 2 blocks): nvfp4's blocks need widths that are multiples of 16.
  std::ofstream(dir / "model.toml") << "name = \"ci-tiny\"\nvocab_size = 64\nseq_len = 32\nd_model = 64\nn_layers = 2\n"
                                       "n_heads = 4\n";
  for (const std::string recipe : {"bf16", "nvfp4"}) {
    run_command(add_train_command,
                {"train", "--config", (dir / "model.toml").string(), "--recipe", recipe, "--data",
                 (dir / "train.bin").string(), "--val-data", (dir / "val.bin").string(), "--out",
                 (dir / recipe).string(), "--steps", "12", "--batch-size", "4", "--val-every", "6", "--val-batches",
                 "2", "--lr", "3e-3", "--progress", "quiet", "--seed", std::to_string(seed % 1000000)});
  }

  // The compare command as a user runs it; its table goes to stdout.
  const fs::path svg_path = dir / "compare.svg";
  std::ostringstream table;
  std::streambuf* const saved = std::cout.rdbuf(table.rdbuf());
  try {
    run_command(add_compare_command, {"compare", (dir / "bf16").string(), (dir / "nvfp4").string(), "--out",
                                      svg_path.string()});
  } catch (...) {
    std::cout.rdbuf(saved);
    throw;
  }
  std::cout.rdbuf(saved);
  std::cout << table.str();

  // The plot: one SVG document, both runs in the legend, and per run one training-loss line and
  // one gap line (4 polylines) in two distinct colors, plus validation markers.
  ASSERT_TRUE(fs::exists(svg_path));
  std::ifstream in(svg_path);
  const std::string svg{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  EXPECT_EQ(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0), 0u);
  EXPECT_EQ(count(svg, "<svg"), 1u);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  EXPECT_EQ(count(svg, ">bf16 (bf16)</text>"), 1u);
  EXPECT_EQ(count(svg, ">nvfp4 (nvfp4)</text>"), 1u);
  EXPECT_EQ(count(svg, "<polyline"), 4u);
  std::set<std::string> colors;
  for (size_t at = svg.find("<polyline"); at != std::string::npos; at = svg.find("<polyline", at + 1)) {
    const size_t s = svg.find("stroke=\"", at) + 8;
    colors.insert(svg.substr(s, svg.find('"', s) - s));
  }
  EXPECT_EQ(colors.size(), 2u) << "two series";
  EXPECT_GE(count(svg, "<circle"), 4u) << "validation losses at steps 6 and 12 of each run";

  // The table: a header, a row per run (baseline first) with finite train and validation losses.
  std::istringstream lines(table.str());
  std::string line;
  std::vector<std::vector<std::string>> rows;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::vector<std::string> w{std::istream_iterator<std::string>(words), std::istream_iterator<std::string>()};
    if (!w.empty() && (w[0] == "bf16" || w[0] == "nvfp4")) rows.push_back(w);
  }
  ASSERT_EQ(rows.size(), 2u) << table.str();
  EXPECT_EQ(rows[0][0], "bf16");
  EXPECT_EQ(rows[1][0], "nvfp4");
  for (const auto& r : rows) {
    ASSERT_GE(r.size(), 6u) << table.str();
    EXPECT_EQ(r[1], r[0]) << "recipe column";
    EXPECT_EQ(r[2], std::to_string(12 * 4 * 32)) << "tokens";
    const double train = std::stod(r[3]), val = std::stod(r[4]);
    EXPECT_TRUE(std::isfinite(train) && train > 0 && train < 2 * std::log(64.0)) << r[3];
    EXPECT_TRUE(std::isfinite(val) && val > 0 && val < 2 * std::log(64.0)) << r[4];
  }
  EXPECT_EQ(rows[0][5], "(baseline)");
  EXPECT_NE(rows[1][5].find('%'), std::string::npos) << "relative gap of nvfp4 to bf16";
  EXPECT_NE(table.str().find("plot: " + svg_path.string()), std::string::npos);
}

}  // namespace
}  // namespace nibble::cli
