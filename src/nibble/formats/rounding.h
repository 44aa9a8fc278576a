// Rounding modes of every encoder in nibble.
#pragma once

#include <cstdint>
#include <string_view>

namespace nibble {

enum class Rounding : uint8_t {
  kNearestEven,  // round to nearest, ties to the even code
  kStochastic,   // round up with probability equal to the distance from the lower neighbour, in steps
};

// A uniform draw in [0, 1) with 24 bits, from 32 random bits. Stochastic rounding rounds up iff the
// fractional position between the two neighbours is greater than this draw; since that fraction
// has at most 24 significant bits for every format here, the expected result equals the input.
inline constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;

constexpr std::string_view rounding_name(Rounding r) {
  return r == Rounding::kNearestEven ? "rne" : "sr";
}

}  // namespace nibble
