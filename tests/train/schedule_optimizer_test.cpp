// Learning-rate schedules and AdamW against formulas evaluated here in double.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <numbers>
#include <random>

#include "nibble/train/optimizer.h"
#include "nibble/train/schedule.h"
#include "nn/nn_test_util.h"

namespace nibble::train {
namespace {

TEST(LrSchedule, CosineWarmsUpThenDecaysToMin) {
  const LrSchedule s{ScheduleKind::kCosine, 1e-3, 1e-4, 10, 110, 0};
  s.validate();
  EXPECT_DOUBLE_EQ(s.at(0), 1e-4);   // 1/10 of the peak
  EXPECT_DOUBLE_EQ(s.at(9), 1e-3);
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);  // cosine starts at the peak
  EXPECT_NEAR(s.at(10 + 99 / 2), 1e-4 + 0.5 * 9e-4 * (1 + std::cos(std::numbers::pi * 49.0 / 99.0)), 1e-15);
  EXPECT_DOUBLE_EQ(s.at(109), 1e-4);
  for (int64_t i = 11; i < 110; ++i) EXPECT_LE(s.at(i), s.at(i - 1)) << i;
}

TEST(LrSchedule, WarmupStableDecay) {
  const LrSchedule s{ScheduleKind::kWsd, 2e-3, 0.0, 5, 100, 20};
  s.validate();
  EXPECT_DOUBLE_EQ(s.at(4), 2e-3);
  for (int64_t i = 5; i < 80; ++i) EXPECT_DOUBLE_EQ(s.at(i), 2e-3) << i;
  EXPECT_DOUBLE_EQ(s.at(80), 2e-3 * 19.0 / 20.0);
  EXPECT_DOUBLE_EQ(s.at(89), 2e-3 * 0.5);
  EXPECT_DOUBLE_EQ(s.at(99), 0.0);
}

TEST(LrSchedule, ConstantAndValidation) {
  const LrSchedule c{ScheduleKind::kConstant, 1e-3, 0.0, 0, 10, 0};
  EXPECT_DOUBLE_EQ(c.at(0), 1e-3);
  EXPECT_DOUBLE_EQ(c.at(9), 1e-3);
  EXPECT_THROW((LrSchedule{ScheduleKind::kCosine, 1e-3, 2e-3, 0, 10, 0}.validate()), std::invalid_argument);
  EXPECT_THROW((LrSchedule{ScheduleKind::kWsd, 1e-3, 0, 5, 10, 6}.validate()), std::invalid_argument);
  EXPECT_THROW((LrSchedule{ScheduleKind::kCosine, 1e-3, 0, 11, 10, 0}.validate()), std::invalid_argument);
  EXPECT_THROW(parse_schedule_kind("linear"), std::invalid_argument);
  EXPECT_EQ(parse_schedule_kind("wsd"), ScheduleKind::kWsd);
}

TEST(AdamW, MatchesTheFormulaAndSkipsDecayWhereAsked) {
  std::mt19937_64 rng(nn::test::fresh_seed());
  const int64_t n = 50;
  auto w0 = nn::test::random_normal(rng, n), b0 = nn::test::random_normal(rng, n);
  std::vector<float> w = w0, b = b0;
  std::vector<std::vector<float>> gw(3), gb(3);
  for (int t = 0; t < 3; ++t) gw[t] = nn::test::random_normal(rng, n), gb[t] = nn::test::random_normal(rng, n);
  const AdamWOptions o{0.9f, 0.95f, 1e-8f, 0.1f};
  AdamW opt(o);
  const double lrs[3] = {1e-2, 5e-3, 2e-3};
  const float mult[3] = {1.0f, 0.5f, 0.25f};
  std::vector<double> mw(n), vw(n), mb(n), vb(n), rw(w0.begin(), w0.end()), rb(b0.begin(), b0.end());
  for (int t = 0; t < 3; ++t) {
    std::vector<model::Parameter> ps = {{"w", {n}, w, gw[t], true}, {"b", {n}, b, gb[t], false}};
    opt.step(ps, lrs[t], mult[t]);
    const double c1 = 1 - std::pow(0.9, t + 1), c2 = 1 - std::pow(0.95, t + 1);
    for (int64_t i = 0; i < n; ++i) {
      for (int k = 0; k < 2; ++k) {
        auto& m = k ? mb : mw;
        auto& v = k ? vb : vw;
        auto& p = k ? rb : rw;
        const double g = static_cast<double>((k ? gb : gw)[t][i]) * mult[t];
        m[i] = 0.9 * m[i] + 0.1 * g;
        v[i] = 0.95 * v[i] + 0.05 * g * g;
        p[i] -= lrs[t] * ((m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-8) + (k ? 0.0 : 0.1 * p[i]));
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(w[i], rw[i], 1e-5) << i;
    EXPECT_NEAR(b[i], rb[i], 1e-5) << i;
  }
  EXPECT_EQ(opt.steps(), 3);
}

// A checkpoint written before the first update (every step skipped as non-finite) has a step count
// of 0 and no moments; it loads back, and the next update starts from zero moments.
TEST(AdamW, StateBeforeTheFirstUpdateLoadsBack) {
  std::vector<float> w{0.5f, -1.0f}, g{0.1f, 0.2f};
  std::vector<model::Parameter> params{{"w", {2}, w, g, true}};
  AdamW fresh(AdamWOptions{});
  const auto path = std::filesystem::temp_directory_path() / ("nibble-adamw-" + std::to_string(::getpid()) + ".safetensors");
  write_safetensors(path, fresh.state());
  AdamW loaded(AdamWOptions{});
  SafetensorsReader reader(path);
  EXPECT_NO_THROW(loaded.load_state(reader, params));
  std::filesystem::remove(path);
  EXPECT_EQ(loaded.steps(), 0);
  std::vector<float> w2 = w;
  std::vector<model::Parameter> params2{{"w", {2}, w2, g, true}};
  fresh.step(params, 1e-2, 1.0f);
  loaded.step(params2, 1e-2, 1.0f);
  EXPECT_EQ(w, w2);
}

TEST(AdamW, GlobalGradNorm) {
  std::vector<float> a = {3.0f, 0.0f}, b = {4.0f}, va(2), vb(1);
  std::vector<model::Parameter> ps = {{"a", {2}, va, a, true}, {"b", {1}, vb, b, false}};
  EXPECT_DOUBLE_EQ(global_grad_norm(ps), 5.0);
}

}  // namespace
}  // namespace nibble::train
