// Helpers of the nn tests: random matrices, and a double-precision
// NT GEMM with the per-element sums that bound float accumulation error.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "test_seed.h"

namespace nibble::nn::test {

using nibble::test::fresh_seed;  // printed per test; NIBBLE_TEST_SEED=<seed> replays it

inline std::vector<float> random_normal(std::mt19937_64& rng, int64_t n, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// Row-major transpose of a rows x cols matrix.
template <typename T>
std::vector<T> transpose(std::span<const T> x, int64_t rows, int64_t cols) {
  std::vector<T> t(x.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = x[r * cols + c];
  return t;
}

// C = A B^T in double (A: m x k, B: n x k), and sum_k |a_ik b_jk| per element (the scale of the
// rounding error of any float evaluation of that dot product).
struct DoubleGemm {
  std::vector<double> c, abs_sum;
};
template <typename T>
DoubleGemm gemm_nt_double(std::span<const T> a, std::span<const T> b, int64_t m, int64_t n, int64_t k) {
  DoubleGemm g{std::vector<double>(static_cast<size_t>(m * n)), std::vector<double>(static_cast<size_t>(m * n))};
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0, s_abs = 0.0;
      for (int64_t t = 0; t < k; ++t) {
        const double p = static_cast<double>(a[i * k + t]) * static_cast<double>(b[j * k + t]);
        s += p;
        s_abs += std::fabs(p);
      }
      g.c[i * n + j] = s;
      g.abs_sum[i * n + j] = s_abs;
    }
  }
  return g;
}

inline constexpr double kU = 5.9604644775390625e-08;  // 2^-24, float's unit roundoff

// Expects |got - want| <= rel * abs_sum + abs_tol element by element; reports the worst element.
inline void expect_within(std::span<const float> got, const std::vector<double>& want,
                          const std::vector<double>& abs_sum, double rel, double abs_tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0.0;
  size_t worst_i = 0;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double tol = rel * abs_sum[i] + abs_tol;
    if (!(err <= tol)) ++bad;
    const double ratio = err / (tol > 0 ? tol : 1.0);
    if (ratio > worst || std::isnan(err)) worst = std::isnan(err) ? INFINITY : ratio, worst_i = i;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " elements out of tolerance; worst at " << worst_i << ": got "
                    << got[worst_i] << ", want " << want[worst_i] << " (error/tolerance " << worst << ")";
}

}  // namespace nibble::nn::test
