// Scalar codecs for the small floating-point formats of low-precision training:
//   E2M1 (FP4, the NVFP4/MXFP4 element), E4M3 ("fn": no infinities, max 448), E5M2 (IEEE-like),
//   E8M0 (power-of-two MX block scale) and BF16.
// Codes are held in the low bits of a uint8_t (uint16_t for BF16); the sign is the top bit of the code.
//
// Encoding is saturating for E2M1, E4M3 and E5M2 (like CUDA's __NV_SATFINITE): finite values and
// infinities beyond the largest finite value map to it with their sign; NaN maps to the format's NaN
// (E2M1 has none: NaN maps to +6, code 0x7). Negative inputs that round to zero keep their sign (-0).
// BF16 follows IEEE round-to-nearest-even (overflow gives infinity), as __float2bfloat16_rn does.
//
// All arithmetic is exact float32 work on powers of two plus one rint/floor, written for the host
// and CUDA devices alike, so both backends produce identical codes.
#pragma once

#include <cmath>
#include <cstdint>

#include "nibble/formats/host_device.h"
#include "nibble/formats/rounding.h"

namespace nibble {

// How a format spends its all-ones exponent.
enum class NonFinite : uint8_t {
  kNone,       // E2M1: every code is finite
  kNanOnly,    // E4M3 "fn": S.1111.111 is NaN, no infinity
  kIeee,       // E5M2: all-ones exponent is Inf (mantissa 0) or NaN
};

// (1 + mant/2^man) * 2^(field - bias) at compile time, for a normal code.
constexpr float minifloat_normal_value(int field, int mant, int man_bits, int bias) {
  float v = 1.0f + static_cast<float>(mant) / static_cast<float>(1 << man_bits);
  for (int i = 0; i < field - bias; ++i) v *= 2.0f;
  for (int i = 0; i > field - bias; --i) v /= 2.0f;
  return v;
}

// A sign-magnitude binary float with kExp exponent bits, kMan mantissa bits and exponent bias kBias.
template <int kExp, int kMan, int kBias, NonFinite kNonFinite>
struct Minifloat {
  static constexpr int kExpBits = kExp;
  static constexpr int kManBits = kMan;
  static constexpr int kBits = 1 + kExp + kMan;
  static constexpr uint8_t kSignBit = static_cast<uint8_t>(1u << (kExp + kMan));
  static constexpr uint8_t kMagMask = static_cast<uint8_t>(kSignBit - 1);
  static constexpr int kEmin = 1 - kBias;  // exponent of the smallest normal
  // Largest finite magnitude code.
  static constexpr uint8_t kMaxCode =
      kNonFinite == NonFinite::kNone      ? kMagMask
      : kNonFinite == NonFinite::kNanOnly ? static_cast<uint8_t>(kMagMask - 1)
                                          : static_cast<uint8_t>(((1u << kExp) - 2) << kMan | ((1u << kMan) - 1));
  static constexpr uint8_t kNanCode =
      kNonFinite == NonFinite::kNone ? kMaxCode : kMagMask;  // E2M1: NaN saturates to +max
  static constexpr uint8_t kInfCode =
      kNonFinite == NonFinite::kIeee ? static_cast<uint8_t>(((1u << kExp) - 1) << kMan) : 0;

  // Value of a magnitude code that is finite.
  NIBBLE_HD static float decode_finite_magnitude(uint8_t mag) {
    const int field = mag >> kMan;
    const int mant = mag & ((1 << kMan) - 1);
    if (field == 0) return static_cast<float>(mant) * pow2f(kEmin - kMan);
    return static_cast<float>((1 << kMan) + mant) * pow2f(field - kBias - kMan);
  }

  static constexpr float kMax = minifloat_normal_value(kMaxCode >> kMan, kMaxCode & ((1 << kMan) - 1), kMan, kBias);

  NIBBLE_HD static float decode(uint8_t code) {
    const uint8_t mag = code & kMagMask;
    const bool neg = (code & kSignBit) != 0;
    if constexpr (kNonFinite == NonFinite::kNanOnly) {
      if (mag == kMagMask) return bits_float(0x7FC00000u);
    }
    if constexpr (kNonFinite == NonFinite::kIeee) {
      if (mag >= kInfCode) {
        if (mag == kInfCode) return neg ? -INFINITY : INFINITY;
        return bits_float(0x7FC00000u);
      }
    }
    const float v = decode_finite_magnitude(mag);
    return neg ? -v : v;
  }

  // Encodes x; `random_bits` is used only with Rounding::kStochastic.
  NIBBLE_HD static uint8_t encode(float x, Rounding rounding, uint32_t random_bits = 0) {
    const uint32_t xb = float_bits(x);
    const uint8_t sign = (xb >> 31) ? kSignBit : 0;
    const uint32_t ab = xb & 0x7FFFFFFFu;
    if (ab > 0x7F800000u) return static_cast<uint8_t>(kNanCode | (kNonFinite == NonFinite::kNone ? 0 : sign));
    const float a = bits_float(ab);
    if (!(a < kMax)) return static_cast<uint8_t>(sign | kMaxCode);  // saturate (also +-Inf)
    // Exponent of a, clamped to the subnormal range of the format. Float subnormals are far below
    // 2^kEmin for every format here, so they take the clamp.
    int e = static_cast<int>(ab >> 23) - 127;
    if (e < kEmin) e = kEmin;
    // q = a / step with step = 2^(e - kMan): exact, q in [0, 2^(kMan+1)).
    const float q = a * pow2f(kMan - e);
    float qi;
    if (rounding == Rounding::kNearestEven) {
      qi = rintf(q);
    } else {
      const float fl = floorf(q);
      const float frac = q - fl;  // exact
      const float u = static_cast<float>(random_bits >> 8) * kTwoPowMinus24;
      qi = frac > u ? fl + 1.0f : fl;
    }
    int n = static_cast<int>(qi);  // integer in [0, 2^(kMan+1)]
    int field;
    if (n >= (2 << kMan)) {  // rounded up into the next binade
      field = e + 1 + kBias;
      n = 0;
    } else if (n >= (1 << kMan)) {  // normal
      field = e + kBias;
      n -= 1 << kMan;
    } else {  // subnormal (only reachable when e == kEmin)
      field = 0;
    }
    // kMax is a grid point, so a < kMax rounds to kMax at most: no second saturation is needed.
    const uint32_t mag = (static_cast<uint32_t>(field) << kMan) | static_cast<uint32_t>(n);
    return static_cast<uint8_t>(sign | mag);
  }
};

using E2M1 = Minifloat<2, 1, 1, NonFinite::kNone>;     // +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}
using E4M3 = Minifloat<4, 3, 7, NonFinite::kNanOnly>;  // max 448, min subnormal 2^-9
using E5M2 = Minifloat<5, 2, 15, NonFinite::kIeee>;    // max 57344, min subnormal 2^-16

static_assert(E2M1::kMax == 6.0f);
static_assert(E4M3::kMax == 448.0f);
static_assert(E5M2::kMax == 57344.0f);

// E2M1 round-to-nearest-even in a few integer operations: equal to E2M1::encode(x, kNearestEven)
// for every float (tested exhaustively over a range of floats); the form the CUDA kernels use in
// their inner loop. For |x| >= 1 the E2M1 grid is float32's own grid with one mantissa bit, so
// rounding the float's bits to one mantissa bit (ties to even) gives the code directly:
// (exponent field * 2 + mantissa bit) - 252 = 2e + m + 2. Below 1 the step is 0.5 (codes 0, 1, 2;
// ties 0.25 -> 0 and 0.75 -> 2 go to the even code). Beyond 6 it saturates; NaN gives +6.
NIBBLE_HD uint8_t e2m1_encode_rne_fast(float x) {
  // Branch-free: both halves are computed and one is selected (this runs twice per element in the
  // CUDA quantizers, where a branch per element costs more than the arithmetic).
  const uint32_t xb = float_bits(x);
  const uint32_t ab = xb & 0x7FFFFFFFu;
  const float a = bits_float(ab);
  const uint32_t rounded = (ab + 0x1FFFFFu + ((ab >> 22) & 1u)) >> 22;  // meaningful for a >= 1
  const uint32_t hi = (rounded < 259u ? rounded : 259u) - 252u;          // saturates at code 7 (6.0)
  const uint32_t lo = static_cast<uint32_t>(a > 0.25f) + static_cast<uint32_t>(a >= 0.75f);
  const uint32_t code = ((xb >> 28) & 0x8u) | (a >= 1.0f ? hi : lo);
  return static_cast<uint8_t>(ab > 0x7F800000u ? E2M1::kNanCode : code);
}

// E2M1 stochastic rounding in integer operations, equal to E2M1::encode(x, kStochastic, bits) for
// every float and every random word: for |x| >= 1 the fraction between the two neighbours is the
// 22 float mantissa bits below E2M1's one, and "fraction > (bits >> 8) * 2^-24" is the integer
// comparison 4 * those bits > (bits >> 8). Below 1 the step is 0.5, as in the generic encoder.
NIBBLE_HD uint8_t e2m1_encode_sr_fast(float x, uint32_t random_bits) {
  const uint32_t xb = float_bits(x);
  const uint32_t ab = xb & 0x7FFFFFFFu;
  const float a = bits_float(ab);
  const uint32_t threshold = random_bits >> 8;
  const uint32_t up_hi = ((ab & 0x3FFFFFu) << 2) > threshold ? 1u : 0u;
  const uint32_t rounded = (ab >> 22) + up_hi;                     // meaningful for a >= 1
  const uint32_t hi = (rounded < 259u ? rounded : 259u) - 252u;   // saturates at code 7 (6.0)
  const float q = fminf(a, 1.0f) * 2.0f;                          // below 1: steps of 0.5
  const float fl = floorf(q);
  const uint32_t lo = static_cast<uint32_t>(fl) +
                      ((q - fl) > static_cast<float>(threshold) * kTwoPowMinus24 ? 1u : 0u);
  const uint32_t code = ((xb >> 28) & 0x8u) | (a >= 1.0f ? hi : lo);
  return static_cast<uint8_t>(ab > 0x7F800000u ? E2M1::kNanCode : code);
}

// E8M0: an unsigned power of two 2^(code - 127), code 0..254; code 255 is NaN. No zero, no sign.
// Encoding uses |x|; values below 2^-127 (zero included) saturate to code 0, values above 2^127
// (and infinities) to code 254; NaN gives 255. Rounding is in the value domain: between 2^k and
// 2^(k+1), nearest-even rounds up above the midpoint 1.5*2^k (ties to the even code), stochastic
// rounding rounds up with probability (|x| - 2^k) / 2^k.
struct E8M0 {
  static constexpr uint8_t kNanCode = 0xFF;
  static constexpr uint8_t kMaxCode = 0xFE;

  NIBBLE_HD static float decode(uint8_t code) {
    if (code == kNanCode) return bits_float(0x7FC00000u);
    return pow2f(static_cast<int>(code) - 127);
  }

  // The code of 2^e, e clamped to the representable range [-127, 127].
  NIBBLE_HD static uint8_t from_exponent(int e) {
    if (e < -127) e = -127;
    if (e > 127) e = 127;
    return static_cast<uint8_t>(e + 127);
  }

  NIBBLE_HD static uint8_t encode(float x, Rounding rounding, uint32_t random_bits = 0) {
    const uint32_t ab = float_bits(x) & 0x7FFFFFFFu;
    if (ab > 0x7F800000u) return kNanCode;
    if (ab == 0x7F800000u) return kMaxCode;
    int e;
    uint32_t frac23;  // fractional position between 2^e and 2^(e+1), in units of 2^-23
    if ((ab >> 23) == 0) {
      if (ab == 0) return 0;
      // Float subnormal: far below 2^-127's neighbourhood except at the very top.
      int lead = 22;
      while (!((ab >> lead) & 1u)) --lead;  // leading one of the mantissa, bit 0..22
      e = lead - 149;
      frac23 = (ab - (1u << lead)) << (23 - lead);
    } else {
      e = static_cast<int>(ab >> 23) - 127;
      frac23 = ab & 0x7FFFFFu;
    }
    bool up;
    if (rounding == Rounding::kNearestEven) {
      const uint32_t half = 1u << 22;
      const int code = e + 127;  // code of 2^e (may be out of range, clamped below)
      up = frac23 > half || (frac23 == half && (code & 1));
    } else {
      up = frac23 > (random_bits >> 9);
    }
    return from_exponent(e + (up ? 1 : 0));
  }
};

// BF16: the top 16 bits of a float32. Round-to-nearest-even as __float2bfloat16_rn (overflow to
// infinity, NaN stays a quiet NaN); stochastic rounding adds 16 random bits below the kept ones
// and truncates.
struct BF16 {
  NIBBLE_HD static float decode(uint16_t code) { return bits_float(static_cast<uint32_t>(code) << 16); }

  NIBBLE_HD static uint16_t encode(float x, Rounding rounding, uint32_t random_bits = 0) {
    const uint32_t b = float_bits(x);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x0040u);
    if ((b & 0x7FFFFFFFu) == 0x7F800000u) return static_cast<uint16_t>(b >> 16);
    if (rounding == Rounding::kNearestEven) {
      return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
    return static_cast<uint16_t>((b + (random_bits & 0xFFFFu)) >> 16);
  }
};

// A BF16 value in memory (the input type of the quantizers). Plain struct so it has the same layout
// on the host and in device code.
struct bf16_t {
  uint16_t bits;
};
NIBBLE_HD float to_float(bf16_t v) { return BF16::decode(v.bits); }
NIBBLE_HD float to_float(float v) { return v; }

}  // namespace nibble
