// Random test matrices for the quantizer tests: awkward shapes, several value distributions
// (heavy tails and outliers included), and small helpers to compare quantized tensors bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "test_seed.h"
#include "nibble/formats/minifloat.h"
#include "nibble/quant/quantize.h"

namespace nibble::test {

enum class Dist {
  kNormal,      // N(0, 1)
  kUniform,     // U(-3, 3)
  kHeavyTail,   // Student-t with 1.5 degrees of freedom: occasional values in the thousands
  kOutliers,    // N(0, 1) with every 23rd column scaled by 300 and rare single spikes of 1e4
  kLogUniform,  // random sign times 2^U(-30, 20): magnitudes across 50 binades, some blocks tiny
};
inline constexpr Dist kAllDists[] = {Dist::kNormal, Dist::kUniform, Dist::kHeavyTail, Dist::kOutliers,
                                     Dist::kLogUniform};

inline const char* dist_name(Dist d) {
  switch (d) {
    case Dist::kNormal: return "normal";
    case Dist::kUniform: return "uniform";
    case Dist::kHeavyTail: return "student-t(1.5)";
    case Dist::kOutliers: return "normal+outliers";
    case Dist::kLogUniform: return "log-uniform";
  }
  return "?";
}

struct Shape {
  int64_t rows;
  int64_t cols;
};
// Multiples of 16 that are not powers of two, thin and wide.
inline constexpr Shape kAwkwardShapes[] = {{48, 80}, {16, 1040}, {112, 48}, {32, 2064}};
// The same spirit for 32-wide MXFP4 blocks (and 16-row columnwise copies).
inline constexpr Shape kAwkwardShapes32[] = {{48, 96}, {16, 1056}, {112, 64}, {32, 2080}};

inline std::vector<float> draw_matrix(int64_t rows, int64_t cols, Dist d, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(-3.0f, 3.0f);
  std::student_t_distribution<float> student(1.5f);
  std::uniform_real_distribution<float> log2mag(-30.0f, 20.0f);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float v = 0;
      switch (d) {
        case Dist::kNormal: v = normal(rng); break;
        case Dist::kUniform: v = uniform(rng); break;
        case Dist::kHeavyTail: v = student(rng); break;
        case Dist::kOutliers:
          v = normal(rng) * (c % 23 == 7 ? 300.0f : 1.0f);
          if (rng() % 1000 == 0) v *= 1e4f;
          break;
        case Dist::kLogUniform: v = ((rng() & 1) ? -1.0f : 1.0f) * std::exp2(log2mag(rng)); break;
      }
      x[static_cast<size_t>(r * cols + c)] = v;
    }
  }
  return x;
}

inline std::vector<float> transpose(const std::vector<float>& x, int64_t rows, int64_t cols) {
  std::vector<float> t(x.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[static_cast<size_t>(c * rows + r)] = x[static_cast<size_t>(r * cols + c)];
  return t;
}

inline uint32_t float_bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Equal bits, or both NaN.
inline bool same_float(float a, float b) { return float_bits_of(a) == float_bits_of(b) || (a != a && b != b); }

// Bitwise equality of everything a quantizer outputs, with the first difference in the message.
inline ::testing::AssertionResult same_quantized(const QuantizedTensor& a, const QuantizedTensor& b) {
  if (a.rows != b.rows || a.cols != b.cols) return ::testing::AssertionFailure() << "shapes differ";
  if (!same_float(a.decode_scale, b.decode_scale))
    return ::testing::AssertionFailure() << "decode scale " << a.decode_scale << " vs " << b.decode_scale;
  if (!same_float(a.amax, b.amax)) return ::testing::AssertionFailure() << "amax " << a.amax << " vs " << b.amax;
  if (a.scales != b.scales) {
    for (size_t i = 0; i < a.scales.size(); ++i)
      if (a.scales[i] != b.scales[i])
        return ::testing::AssertionFailure() << "scale " << i << ": " << int(a.scales[i]) << " vs " << int(b.scales[i]);
  }
  if (a.data != b.data) {
    for (size_t i = 0; i < a.data.size(); ++i)
      if (a.data[i] != b.data[i])
        return ::testing::AssertionFailure() << "data byte " << i << ": " << int(a.data[i]) << " vs " << int(b.data[i]);
  }
  return ::testing::AssertionSuccess();
}

// The code of element i of a quantized tensor (FP4 unpacked, FP8 as stored).
inline uint8_t code_at(const QuantizedTensor& q, int64_t i) {
  if (q.spec.format == Format::kNvfp4 || q.spec.format == Format::kMxfp4) return fp4_code_at(q.data, i);
  return q.data[static_cast<size_t>(i)];
}

// The scale code that covers element (r, c) of the quantized matrix.
inline uint8_t scale_at(const QuantizedTensor& q, int64_t r, int64_t c) {
  switch (q.spec.block) {
    case Block::k16x16: return q.scales[static_cast<size_t>((r / 16) * q.scale_cols() + c / 16)];
    case Block::k1x16: return q.scales[static_cast<size_t>(r * q.scale_cols() + c / 16)];
    case Block::k1x32: return q.scales[static_cast<size_t>(r * q.scale_cols() + c / 32)];
    case Block::kTensor: break;
  }
  return 0;
}

// x rounded to BF16, nearest even (the quantizers' BF16 input).
inline std::vector<bf16_t> to_bf16(const std::vector<float>& x) {
  std::vector<bf16_t> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i].bits = BF16::encode(x[i], Rounding::kNearestEven);
  return y;
}

// The BF16 decode of a packed NVFP4 copy with 1x16 blocks or 16x16 tiles (code x block scale,
// without the tensor scale): exact in BF16, so the upper half of the float32 product; what the
// quantizers' decoded outputs hold (zeros for a non-finite tensor, whose codes and scales are zero).
inline std::vector<uint16_t> nvfp4_decoded_bf16(const QuantizedTensor& q) {
  std::vector<uint16_t> out(static_cast<size_t>(q.numel()));
  const bool tiles = q.spec.block == Block::k16x16;
  for (int64_t i = 0; i < q.numel(); ++i) {
    const int64_t r = i / q.cols, c = i % q.cols;
    const int64_t s = tiles ? (r / 16) * (q.cols / 16) + c / 16 : i / 16;
    const float value = E2M1::decode(fp4_code_at(q.data, i)) * E4M3::decode(q.scales[static_cast<size_t>(s)]);
    out[static_cast<size_t>(i)] = static_cast<uint16_t>(float_bits_of(value) >> 16);
  }
  return out;
}

}  // namespace nibble::test
