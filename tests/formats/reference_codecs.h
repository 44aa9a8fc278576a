// Independent double-precision references for the small float formats, used to check the codecs
// in nibble/formats and the quantizers built on them. Nothing here calls the code under test:
// values come from a hand table (E2M1) or from sign/exponent/mantissa in double arithmetic, and
// rounding is a nearest search over the sorted list of representable values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace nibble::test {

enum class RefNonFinite { kNone, kNanOnly, kIeee };

// A sign-magnitude minifloat described by its field widths, decoded in double.
struct RefMinifloat {
  int exp_bits;
  int man_bits;
  int bias;
  RefNonFinite non_finite;

  int bits() const { return 1 + exp_bits + man_bits; }
  uint32_t sign_bit() const { return 1u << (exp_bits + man_bits); }
  uint32_t num_codes() const { return 1u << bits(); }
  int field(uint32_t code) const { return static_cast<int>((code >> man_bits) & ((1u << exp_bits) - 1)); }
  int mant(uint32_t code) const { return static_cast<int>(code & ((1u << man_bits) - 1)); }

  bool is_nan(uint32_t code) const {
    const bool top = field(code) == (1 << exp_bits) - 1;
    if (non_finite == RefNonFinite::kNanOnly) return top && mant(code) == (1 << man_bits) - 1;
    if (non_finite == RefNonFinite::kIeee) return top && mant(code) != 0;
    return false;
  }
  bool is_inf(uint32_t code) const {
    return non_finite == RefNonFinite::kIeee && field(code) == (1 << exp_bits) - 1 && mant(code) == 0;
  }
  bool is_finite(uint32_t code) const { return !is_nan(code) && !is_inf(code); }

  // (-1)^s * 2^(1-bias) * m/2^M for subnormals, (-1)^s * 2^(e-bias) * (1 + m/2^M) for normals.
  double decode(uint32_t code) const {
    const double sign = (code & sign_bit()) ? -1.0 : 1.0;
    if (is_nan(code)) return std::numeric_limits<double>::quiet_NaN();
    if (is_inf(code)) return sign * std::numeric_limits<double>::infinity();
    const int e = field(code);
    const double m = static_cast<double>(mant(code)) / static_cast<double>(1 << man_bits);
    if (e == 0) return sign * std::ldexp(m, 1 - bias);
    return sign * std::ldexp(1.0 + m, e - bias);
  }

  // Finite non-negative values with their codes, ascending (code 0 = +0 first).
  struct Entry {
    double value;
    uint32_t code;
  };
  std::vector<Entry> magnitudes() const {
    std::vector<Entry> out;
    for (uint32_t c = 0; c < sign_bit(); ++c)
      if (is_finite(c)) out.push_back({decode(c), c});
    std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.value < b.value; });
    return out;
  }
  double max_value() const { return magnitudes().back().value; }
  uint32_t max_code() const { return magnitudes().back().code; }

  // Saturating round-to-nearest, ties to the even code, of a finite or infinite (not NaN) x.
  // A negative x keeps its sign even when it rounds to zero.
  uint32_t round_nearest_even(double x) const {
    const std::vector<Entry> mags = magnitudes();
    return round_nearest_even(x, mags);
  }
  uint32_t round_nearest_even(double x, const std::vector<Entry>& mags) const {
    const uint32_t sign = std::signbit(x) ? sign_bit() : 0u;
    const double a = std::fabs(x);
    if (a >= mags.back().value) return sign | mags.back().code;
    // First entry above a: the neighbours are it and the one before.
    const auto hi = std::upper_bound(mags.begin(), mags.end(), a,
                                     [](double v, const Entry& e) { return v < e.value; });
    const auto lo = hi - 1;
    const double dlo = a - lo->value, dhi = hi->value - a;
    if (dlo < dhi) return sign | lo->code;
    if (dhi < dlo) return sign | hi->code;
    return sign | ((lo->code & 1u) == 0 ? lo->code : hi->code);
  }

  // The representable neighbours lo <= |x| <= hi (equal when |x| is representable or beyond max).
  void neighbours(double a, const std::vector<Entry>& mags, Entry& lo, Entry& hi) const {
    if (a >= mags.back().value) {
      lo = hi = mags.back();
      return;
    }
    const auto up = std::lower_bound(mags.begin(), mags.end(), a,
                                     [](const Entry& e, double v) { return e.value < v; });
    hi = *up;
    lo = up->value == a ? *up : *(up - 1);
  }
};

// E2M1's values by hand, indexed by magnitude code (the OCP MX v1.0 table).
inline constexpr double kE2M1Table[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};

inline const RefMinifloat kRefE2M1{2, 1, 1, RefNonFinite::kNone};
inline const RefMinifloat kRefE4M3{4, 3, 7, RefNonFinite::kNanOnly};
inline const RefMinifloat kRefE5M2{5, 2, 15, RefNonFinite::kIeee};

// Spacing of E2M1 around a magnitude a in [0, 6]: 0.5 below 2, 1 in [2, 4), 2 in [4, 6].
inline double e2m1_spacing(double a) { return a < 2.0 ? 0.5 : a < 4.0 ? 1.0 : 2.0; }

// E2M1 round-to-nearest-even by the hand table (saturating at 6).
inline uint32_t ref_e2m1_rne(double x) {
  static const std::vector<RefMinifloat::Entry> mags = [] {
    std::vector<RefMinifloat::Entry> m;
    for (uint32_t c = 0; c < 8; ++c) m.push_back({kE2M1Table[c], c});
    return m;
  }();
  return kRefE2M1.round_nearest_even(x, mags);
}

// Value of a BF16 code from its fields in double (Inf/NaN included).
inline double ref_bf16_decode(uint32_t code) {
  const double sign = (code & 0x8000u) ? -1.0 : 1.0;
  const int e = static_cast<int>((code >> 7) & 0xFF);
  const int m = static_cast<int>(code & 0x7F);
  if (e == 0xFF) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  if (e == 0) return sign * std::ldexp(m / 128.0, -126);
  return sign * std::ldexp(1.0 + m / 128.0, e - 127);
}

}  // namespace nibble::test
