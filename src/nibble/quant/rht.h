// Random Hadamard Transform on 16-element blocks (NVFP4 paper, Wgrad inputs):
//   y = x_block @ (diag(signs) @ H16) / 4,   H16 the 16x16 Sylvester Hadamard matrix (+-1 entries).
// (diag(s) H16) / 4 is orthogonal, so applying it to both Wgrad operands along the reduction
// dimension leaves dW unchanged in exact arithmetic while spreading outliers across the block.
//
// Float32 order of operations (identical on every backend, so CUDA equals the CPU bit for bit):
// multiply by the signs (exact), a 4-stage in-place fast Walsh-Hadamard butterfly with strides
// 1, 2, 4, 8 (v[j], v[j+h] <- v[j] + v[j+h], v[j] - v[j+h]), then multiply by 0.25 (exact).
// TransformerEngine computes the same transform with tensor-core MMAs whose accumulation order is
// not specified, so our RHT outputs agree with theirs only to float rounding.
#pragma once

#include <cstdint>

#include "nibble/formats/host_device.h"
#include "nibble/quant/philox.h"

namespace nibble {

inline constexpr int kRhtBlock = 16;

// One sign per row of H16, bit i set means sign[i] = -1.
struct RhtSigns {
  uint16_t negative_mask;

  NIBBLE_HD float sign(int i) const { return (negative_mask >> i) & 1u ? -1.0f : 1.0f; }
};

// TransformerEngine's default sign vector [+1,+1,+1,-1,+1,-1,-1,-1,-1,-1,-1,+1,-1,+1,-1,-1],
// used by default so results can be compared with theirs.
inline constexpr RhtSigns kDefaultRhtSigns{static_cast<uint16_t>(
    (1u << 3) | (1u << 5) | (1u << 6) | (1u << 7) | (1u << 8) | (1u << 9) | (1u << 10) | (1u << 12) |
    (1u << 14) | (1u << 15))};

// Stream of the sign draw (see philox.h).
inline constexpr uint32_t kRhtSignStream = 0x52485400u;  // "RHT"

// A sign vector drawn from a seed: 16 independent fair signs from one Philox word.
inline RhtSigns rht_signs_from_seed(uint64_t seed) {
  return RhtSigns{static_cast<uint16_t>(random_word(seed, kRhtSignStream, 0) & 0xFFFFu)};
}

// In-place transform of one block of 16 floats.
NIBBLE_HD void rht16(float v[kRhtBlock], RhtSigns signs) {
NIBBLE_UNROLL
  for (int i = 0; i < kRhtBlock; ++i) v[i] *= signs.sign(i);
NIBBLE_UNROLL
  for (int stage = 0; stage < 4; ++stage) {  // stride h = 1, 2, 4, 8
    const int h = 1 << stage;
NIBBLE_UNROLL
    for (int k = 0; k < kRhtBlock / 2; ++k) {  // the 8 pairs (j, j + h) of this stage
      const int j = (k / h) * 2 * h + k % h;
      const float a = v[j], b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
  }
NIBBLE_UNROLL
  for (int i = 0; i < kRhtBlock; ++i) v[i] *= 0.25f;
}

}  // namespace nibble
