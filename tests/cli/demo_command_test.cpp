#include "nibble/cli/demo_command.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "tensor/tensor_test_util.h"

namespace nibble::cli {
namespace {

TEST(DemoCommand, PrintsEveryRowWithSaneNumbers) {
  DemoOptions o;
  o.rows = 256;
  o.cols = 512;
  o.seed = test::fresh_seed();
  std::ostringstream out;
  const std::vector<DemoRow> rows = run_demo(o, out);
  const std::string text = out.str();
  const std::vector<std::string> labels = {
      "bf16 (baseline)",       "fp8_e4m3 per-tensor",       "mxfp4 1x32 (E8M0 scales)",
      "nvfp4 1x16 (activations)", "nvfp4 16x16 (weights)", "nvfp4 1x16 sr (gradients)",
      "nvfp4 1x16 columnwise", "nvfp4 1x16 columnwise rht (Wgrad)"};
  ASSERT_EQ(rows.size(), labels.size());
  const double n = 256.0 * 512.0;
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].label, labels[i]);
    EXPECT_NE(text.find(labels[i]), std::string::npos) << text;
    EXPECT_TRUE(std::isfinite(rows[i].relative_rms) && rows[i].relative_rms > 0) << labels[i];
    EXPECT_NEAR(rows[i].snr_db, -20 * std::log10(rows[i].relative_rms), 1e-9);
  }
  EXPECT_EQ(rows[0].bits_per_element, 16.0);
  EXPECT_EQ(rows[1].bits_per_element, 8.0 + 32.0 / n);
  EXPECT_EQ(rows[2].bits_per_element, 4.25);
  EXPECT_EQ(rows[3].bits_per_element, 4.5 + 32.0 / n);
  EXPECT_EQ(rows[4].bits_per_element, 4.0 + 8.0 / 256 + 32.0 / n);
  // More bits, less error: bf16 < fp8 < nvfp4 1x16 < mxfp4 (E8M0 scales waste up to a binade).
  EXPECT_LT(rows[0].relative_rms, rows[1].relative_rms);
  EXPECT_LT(rows[1].relative_rms, rows[3].relative_rms);
  EXPECT_LT(rows[3].relative_rms, rows[2].relative_rms);
  EXPECT_LT(rows[3].relative_rms, rows[5].relative_rms) << "SR adds variance";
}

TEST(DemoCommand, ActivationsAreReproducibleAndHaveOutlierChannels) {
  const uint64_t seed = test::fresh_seed();
  const int64_t rows = 64, cols = 2048;
  const std::vector<float> a = demo_activations(rows, cols, seed);
  EXPECT_EQ(a, demo_activations(rows, cols, seed));
  EXPECT_NE(a, demo_activations(rows, cols, seed + 1));
  std::vector<double> channel_rms(cols);
  for (int64_t c = 0; c < cols; ++c) {
    double s = 0;
    for (int64_t r = 0; r < rows; ++r) s += double(a[r * cols + c]) * a[r * cols + c];
    channel_rms[c] = std::sqrt(s / rows);
  }
  std::vector<double> sorted = channel_rms;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[cols / 2];
  const auto outliers = std::count_if(channel_rms.begin(), channel_rms.end(), [&](double v) { return v > 8 * median; });
  // About 1% of 2048 channels (20) are scaled by 10..100; 5 or fewer would be a 1-in-10^4 event.
  EXPECT_GT(outliers, 5);
  EXPECT_LT(outliers, 50);
}

TEST(DemoCommand, RejectsShapesTheBlocksDoNotFit) {
  std::ostringstream out;
  test::expect_error([&] { run_demo({.rows = 100, .cols = 256, .seed = 0}, out); }, {"multiples of 32"});
}

}  // namespace
}  // namespace nibble::cli
