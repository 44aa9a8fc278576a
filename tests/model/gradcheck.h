// Finite-difference gradient checks for layers that compute in FP32.
//
// The scalar under test is L = sum_i r_i f_i(x) with fresh random weights r, evaluated in double
// from the layer's float outputs. Central differences (L(v + h) - L(v - h)) / (v+ - v-) use the
// perturbations actually stored in float. Their error has two parts: truncation, O(h^2 |f'''|), and
// the float rounding inside the layer, about u * sum |r_i f_i| / h with u = 2^-24. With h ~ 1e-2 and
// O(1) values both are around 1e-4 of the gradient's scale, so the check allows 1e-3 of the largest
// sampled gradient plus 1e-2 relative; a wrong backward (a missing term, a transposed index) is off
// by the size of the gradient itself. In a whole model either error can exceed that on a rare
// element (strong curvature through the softmax, a kink of ReLU^2 within h; or rounding on a tiny
// gradient), and the two move opposite ways with h: an element that disagrees at h is measured again
// at h/4 and passes if it agrees there. A wrong backward disagrees at every h.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace nibble::model::test {

struct GradCheckTolerance {
  float h = 1e-2f;
  double scale_frac = 1e-3;  // of the largest |analytic| among the sampled coordinates
  double rel = 1e-2;
};

// `analytic` holds dL/dv for every element of v; `loss` re-evaluates L with v's current values.
inline void check_gradient(std::span<float> v, std::span<const float> analytic, const std::function<double()>& loss,
                           std::mt19937_64& rng, int samples, const std::string& what,
                           GradCheckTolerance tol = {}) {
  ASSERT_EQ(v.size(), analytic.size()) << what;
  ASSERT_FALSE(v.empty()) << what;
  std::uniform_int_distribution<size_t> pick(0, v.size() - 1);
  std::vector<size_t> idx;
  for (int s = 0; s < samples; ++s) idx.push_back(pick(rng));
  const auto central_difference = [&](size_t i, float h) {
    const float keep = v[i];
    v[i] = keep + h;
    const double up_v = v[i];
    const double up = loss();
    v[i] = keep - h;
    const double down_v = v[i];
    const double down = loss();
    v[i] = keep;
    return (up - down) / (up_v - down_v);
  };
  std::vector<double> fd(idx.size());
  for (size_t s = 0; s < idx.size(); ++s) fd[s] = central_difference(idx[s], tol.h);
  double scale = 0.0;
  for (size_t s = 0; s < idx.size(); ++s) scale = std::max(scale, std::fabs(static_cast<double>(analytic[idx[s]])));
  scale = std::max(scale, 1e-30);
  int bad = 0;
  std::string first_bad;
  for (size_t s = 0; s < idx.size(); ++s) {
    const double an = analytic[idx[s]];
    const auto agrees = [&](double f) { return std::fabs(f - an) <= tol.scale_frac * scale + tol.rel * std::fabs(an); };
    if (!agrees(fd[s]) && agrees(central_difference(idx[s], tol.h / 4))) continue;
    if (!agrees(fd[s])) {
      if (bad++ == 0)
        first_bad = "element " + std::to_string(idx[s]) + ": analytic " + std::to_string(an) + ", finite difference " +
                    std::to_string(fd[s]);
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << idx.size() << " sampled gradients disagree; first: " << first_bad
                    << " (gradient scale " << scale << ")";
  // A check that passes on all-zero gradients would prove nothing.
  EXPECT_GT(scale, 1e-6) << what << ": the sampled gradients are all (near) zero";
}

// sum_i r_i y_i in double.
inline double dot(std::span<const float> r, std::span<const float> y) {
  double s = 0.0;
  for (size_t i = 0; i < r.size(); ++i) s += static_cast<double>(r[i]) * y[i];
  return s;
}

}  // namespace nibble::model::test
