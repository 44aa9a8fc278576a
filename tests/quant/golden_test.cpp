// Hand-worked golden examples of every quantizer: the arithmetic is written out in the comments
// (float32 results where rounding matters), and the tests check the packed bytes and scale codes
// as well as the dequantized values.
//
// E2M1 codes: 0:0 1:0.5 2:1 3:1.5 4:2 5:3 6:4 7:6, plus 8 for the sign (so 0xD = -3, 0x8 = -0).
// Two codes per byte, element 2i in the low nibble: codes (7, 0xD) pack to 0xD7.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "nibble/quant/quantize.h"
#include "quant/test_inputs.h"

namespace nibble {
namespace {


void expect_values(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i], want[i]) << "element " << i;
    EXPECT_EQ(std::signbit(got[i]), std::signbit(want[i])) << "sign of element " << i;
  }
}

// ---- NVFP4, 1x16 blocks: one row of 32 = two blocks ----
//
// amax = 21, so S = 2688 / 21 = 128 exactly and g = 1/128.  S * (1/6) = 128 * 0.16666667f
// = 21.333334f (exact: times a power of two).
//
// Block 0 (elements 0..15), amax_b = 21:
//   21 * 21.333334 = 448.000013 -> float 448.0; min(448, 448) = 448 = E4M3 0x7E (1.75 * 2^8).
//   e_b = 1 / (448 * (1/128)) = 1/3.5 = 0.28571430f (2/7 rounded up).
//   Each value is 3.5 * (an E2M1 value or a tie), so x * e_b lands on or near the E2M1 grid:
//     x       x*e_b (float)   code   dequantized = value * 448 / 128
//     21      6.0000005 ->6   0x7    21
//    -10.5   -3.0000002       0xD   -10.5
//     7       2.0             0x4    7
//     1.75    0.5             0x1    1.75
//     0.875   0.25 (tie)      0x0    0       ties to the even code 0
//     4.375   1.25 (tie)      0x2    3.5     1.25000006 rounds to the float 1.25: a tie, -> 1
//     2.625   0.75000006      0x2    3.5     just above 0.75 -> 1
//     12.25   3.5000002       0x6    14
//    -17.5   -5.0 (tie)       0xE   -14      ties to 4 (even), not 6
//     14      4.0             0x6    14
//     1       0.2857143       0x1    1.75
//    -0.8    -0.2285714       0x8   -0       rounds to zero, keeps its sign
//     5       1.4285715       0x3    5.25
//     9       2.5714288       0x5    10.5
//    -19     -5.4285717       0xF   -21
//     0       0               0x0    0
//   bytes: D7 14 20 62 6E 81 53 0F
//
// Block 1 (elements 16..31), amax_b = 3:
//   3 * 21.333334 = 64.0000019 -> float 64.0 = E4M3 0x68 (2^6: field 13, mantissa 0).
//   e_b = 1 / (64 / 128) = 2 exactly, so x * e_b = 2x is exact and every tie is a true tie:
//     x      2x     code  dequantized = value * 64 / 128
//     3      6      0x7    3
//    -0.125 -0.25   0x8   -0      tie -> 0 (even), sign kept
//     0.375  0.75   0x2    0.5    tie -> 1 (even code 2)
//     0.625  1.25   0x2    0.5    tie -> 1
//     0.875  1.75   0x4    1      tie -> 2
//    -1.25  -2.5    0xC   -1      tie -> 2
//     1.75   3.5    0x6    2      tie -> 4
//     2.5    5      0x6    2      tie -> 4
//     0.13   0.26   0x1    0.25   just above the 0.25 tie
//     0      0      0x0    0
//    -2.9   -5.8    0xF   -3
//     0.7    1.4    0x3    0.75
//    -0.6   -1.2    0xA   -0.5
//     1.1    2.2    0x4    1
//    -1.6   -3.2    0xD   -1.5
//     2.2    4.4    0x6    2
//   bytes: 87 22 C4 66 01 3F 4A 6D
TEST(Golden, Nvfp4Row1x16) {
  const std::vector<float> x = {21,    -10.5f, 7,     1.75f,  0.875f, 4.375f, 2.625f, 12.25f,
                                -17.5f, 14,    1,     -0.8f,  5,      9,      -19,    0,
                                3,     -0.125f, 0.375f, 0.625f, 0.875f, -1.25f, 1.75f, 2.5f,
                                0.13f, 0,      -2.9f, 0.7f,   -0.6f,  1.1f,   -1.6f,  2.2f};
  const QuantizedTensor q = quantize(x, 1, 32, make_spec(Format::kNvfp4, Block::k1x16));
  EXPECT_EQ(q.amax, 21.0f);
  EXPECT_EQ(q.decode_scale, 1.0f / 128);
  EXPECT_EQ(q.scales, (std::vector<uint8_t>{0x7E, 0x68}));
  EXPECT_EQ(q.data, (std::vector<uint8_t>{0xD7, 0x14, 0x20, 0x62, 0x6E, 0x81, 0x53, 0x0F,  //
                                          0x87, 0x22, 0xC4, 0x66, 0x01, 0x3F, 0x4A, 0x6D}));
  expect_values(dequantize(q), {21, -10.5f, 7, 1.75f, 0, 3.5f, 3.5f, 14, -14, 14, 1.75f, -0.0f, 5.25f, 10.5f, -21, 0,
                                3, -0.0f, 0.5f, 0.5f, 1, -1, 2, 2, 0.25f, 0, -3, 0.75f, -0.5f, 1, -1.5f, 2});
}

// ---- NVFP4, 16x16 tiles: a 16x32 matrix = two tiles side by side ----
//
// Tile 0 (columns 0..15): x[r][c] = +-3.5 * E2M1[(r + c) % 8], negative on odd rows. Its amax is
//   3.5 * 6 = 21 = the tensor amax, so as above: S = 128, g = 1/128, scale 448 = 0x7E,
//   e_b = 0.28571430f, and each x * e_b = value * (1 + 5e-8) rounds back to its own code
//   (6.0000005 clamps to 6): code = (r + c) % 8, | 8 on odd rows; dequantized = x exactly.
//   Row 0: codes 0 1 2 3 4 5 6 7 0 1 ... -> bytes 10 32 54 76 10 32 54 76.
//   Row 1: codes 9 A B C D E F 8 9 ...  -> bytes A9 CB ED 8F A9 CB ED 8F (0x8: -0 from -3.5 * 0).
// Tile 1 (columns 16..31): x[r][c] = +-0.5 * E2M1[(r + 2c) % 8], negative where c % 3 == 0, except
//   row 15, which holds 0.1 everywhere. Tile amax = 0.5 * 6 = 3 -> scale 64 = 0x68, e_b = 2.
//   Rows 0..14: 2x is the E2M1 value itself: code = (r + 2c) % 8 | (8 if c % 3 == 0); dequantized = x.
//   Row 15: 0.1 * 2 = 0.2 < 0.25 -> code 0, dequantized 0: the tile's one scale (set by the 3s in
//   the other rows) is too coarse for it. With 1x16 blocks that row gets its own scale instead:
//   amax_b = 0.1: 0.1 * 21.333334 = 2.1333334 -> E4M3 2.25 = 0x41 (2.1333 is past the midpoint
//   2.125); e_b = 1 / (2.25 / 128) = 56.888889; 0.1 * 56.89 = 5.69 -> 6 -> 6 * 2.25 / 128 = 0.10546875.
float tile_pair_value(int r, int c) {
  static constexpr float kE2M1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  if (c < 16) return (r % 2 ? -3.5f : 3.5f) * kE2M1[(r + c) % 8];
  if (r == 15) return 0.1f;
  return (c % 3 == 0 ? -0.5f : 0.5f) * kE2M1[(r + 2 * c) % 8];
}

uint8_t tile_pair_code(int r, int c) {
  if (c < 16) return static_cast<uint8_t>((r + c) % 8 | (r % 2 ? 8 : 0));
  if (r == 15) return 0;
  return static_cast<uint8_t>((r + 2 * c) % 8 | (c % 3 == 0 ? 8 : 0));
}

TEST(Golden, Nvfp4Tiles16x16) {
  std::vector<float> x(16 * 32);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 32; ++c) x[r * 32 + c] = tile_pair_value(r, c);
  const QuantizedTensor q = quantize(x, 16, 32, make_spec(Format::kNvfp4, Block::k16x16));
  EXPECT_EQ(q.amax, 21.0f);
  EXPECT_EQ(q.decode_scale, 1.0f / 128);
  ASSERT_EQ(q.scale_rows(), 1);
  ASSERT_EQ(q.scale_cols(), 2);
  EXPECT_EQ(q.scales, (std::vector<uint8_t>{0x7E, 0x68}));
  // Rows 0 and 1 of tile 0 by hand (bytes 0..7 and 16..23 of the 16-byte rows).
  const std::vector<uint8_t> row0(q.data.begin(), q.data.begin() + 8);
  const std::vector<uint8_t> row1(q.data.begin() + 16, q.data.begin() + 24);
  EXPECT_EQ(row0, (std::vector<uint8_t>{0x10, 0x32, 0x54, 0x76, 0x10, 0x32, 0x54, 0x76}));
  EXPECT_EQ(row1, (std::vector<uint8_t>{0xA9, 0xCB, 0xED, 0x8F, 0xA9, 0xCB, 0xED, 0x8F}));
  // Row 0 of tile 1: c = 16..31 -> (2c) % 8 = 0 2 4 6 0 2 ..., negative at c = 18, 21, 24, 27, 30:
  //   codes 0 2 C 6 0 A 4 6 8 2 4 E 0 2 C 6 -> bytes 20 6C A0 64 28 E4 20 6C.
  const std::vector<uint8_t> row0_tile1(q.data.begin() + 8, q.data.begin() + 16);
  EXPECT_EQ(row0_tile1, (std::vector<uint8_t>{0x20, 0x6C, 0xA0, 0x64, 0x28, 0xE4, 0x20, 0x6C}));
  // Every element by the rule above.
  const std::vector<float> deq = dequantize(q);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 32; ++c) {
      EXPECT_EQ(fp4_code_at(q.data, r * 32 + c), tile_pair_code(r, c)) << r << "," << c;
      const float want = r == 15 && c >= 16 ? 0.0f : x[r * 32 + c];
      EXPECT_EQ(deq[r * 32 + c], want) << r << "," << c;
    }
  }
  // The same row 15 with 1x16 blocks keeps its small values.
  const QuantizedTensor q1 = quantize(x, 16, 32, make_spec(Format::kNvfp4, Block::k1x16));
  EXPECT_EQ(q1.scales[15 * 2 + 1], 0x41);
  EXPECT_EQ(dequantize(q1)[15 * 32 + 20], 0.10546875f);
}

// ---- MXFP4: one row of 64 = two 32-element blocks, E8M0 scales ----
//
// Block 0, amax_b = 14: floor(log2 14) = 3, X = 2^(3 - 2) = 2 = E8M0 code 127 + 1 = 0x80.
//   x / X is exact (a power of two); values past 6 * X = 12 saturate to 6:
//     x     x/2    code  dequantized (value * 2)
//     14    7->6   0x7   12      beyond 6X: saturates
//    -13   -6.5    0xF  -12      beyond 6X: saturates
//     12    6      0x7   12
//     11    5.5    0x7   12      above the midpoint 5
//     10    5      0x6   8       tie -> 4 (even)
//    -9    -4.5    0xE  -8
//     7     3.5    0x6   8       tie -> 4
//     5     2.5    0x4   4       tie -> 2
//     3     1.5    0x3   3
//     0.5   0.25   0x0   0       tie -> 0
//    -1.5  -0.75   0xA  -2       tie -> 1
//     2.5   1.25   0x2   2       tie -> 1
//     3.5   1.75   0x4   4       tie -> 2
//     0.6   0.3    0x1   1
//   elements 14..31: x = +-2 * E2M1[i % 8], negative for odd i, so x / 2 is on the grid:
//   code i % 8 | 8 for odd i (6 F 0 9 2 B 4 D 6 F ...), dequantized = x.
//   bytes: F7 77 E6 46 03 2A 14 F6, then 90 B2 D4 F6 repeating.
// Block 1, amax_b = 0.3: floor(log2 0.3) = -2, X = 2^-4 = code 123 = 0x7B; x * 16:
//     0.3       4.8    0x6   0.25    (4.8 < 5)
//    -0.3      -4.8    0xE  -0.25
//     0.28125   4.5    0x6   0.25
//     0.15625   2.5    0x4   0.125   tie -> 2
//     0.01      0.16   0x0   0
//    -0.01     -0.16   0x8  -0
//     0.046875  0.75   0x2   0.0625  tie -> 1
//   elements 39..63: 0 -> code 0.
//   bytes: E6 46 80 02, then zeros.
TEST(Golden, Mxfp4TwoBlocks) {
  std::vector<float> x = {14, -13, 12, 11, 10, -9, 7, 5, 3, 0.5f, -1.5f, 2.5f, 3.5f, 0.6f};
  static constexpr float kE2M1[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int i = 14; i < 32; ++i) x.push_back((i % 2 ? -2.0f : 2.0f) * kE2M1[i % 8]);
  for (const float v : {0.3f, -0.3f, 0.28125f, 0.15625f, 0.01f, -0.01f, 0.046875f}) x.push_back(v);
  x.resize(64, 0.0f);
  const QuantizedTensor q = quantize(x, 1, 64, make_spec(Format::kMxfp4, Block::k1x32));
  EXPECT_EQ(q.scales, (std::vector<uint8_t>{0x80, 0x7B}));
  EXPECT_EQ(q.decode_scale, 1.0f);
  // Block 0 codes: 7 F 7 7 6 E 6 4 3 0 A 2 4 1, then i = 14..31: 6 F 0 9 2 B 4 D 6 F 0 9 2 B 4 D 6 F
  // Block 1 codes: 6 E 6 4 0 8 2, then 0 x 25.
  const std::vector<uint8_t> want_bytes = {0xF7, 0x77, 0xE6, 0x46, 0x03, 0x2A, 0x14, 0xF6,  //
                                           0x90, 0xB2, 0xD4, 0xF6, 0x90, 0xB2, 0xD4, 0xF6,  //
                                           0xE6, 0x46, 0x80, 0x02, 0x00, 0x00, 0x00, 0x00,  //
                                           0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  EXPECT_EQ(q.data, want_bytes);
  std::vector<float> want = {12, -12, 12, 12, 8, -8, 8, 4, 3, 0, -2, 2, 4, 1};
  for (int i = 14; i < 32; ++i) want.push_back(x[i]);
  for (const float v : {0.25f, -0.25f, 0.25f, 0.125f, 0.0f, -0.0f, 0.0625f}) want.push_back(v);
  want.resize(64, 0.0f);
  expect_values(dequantize(q), want);
}

// ---- FP8 E4M3, per-tensor current scaling ----
//
// amax = 7: S = 448 / 7 = 64 exactly, g = 1/64. y = 64x, then E4M3 RNE:
//   x          y               code  why
//   7          448             0x7E  max: field 15, mantissa 6
//  -7         -448             0xFE
//   1          64              0x68  2^6: field 13
//  -0.5       -32              0xE0  2^5: field 12, sign
//   1.0625     68              0x68  tie between 64 (m=0) and 72 (m=1) -> 64
//   1.1875     76              0x6A  tie between 72 (m=1) and 80 (m=2) -> 80
//   2^-15      2^-9            0x01  smallest subnormal
//   2^-16      2^-10           0x00  tie between 0 and 2^-9 -> 0
//  -3*2^-16   -1.5 * 2^-9      0x82  tie between 1 and 2 subnormal steps -> 2
//   0.1        6.4000001       0x4D  step 0.5 in [4, 8): 6.5 = 1.625 * 4 (field 9, m=5)
//   3.3        211.2           0x75  step 16 in [128, 256): 208 = 1.625 * 128 (field 14, m=5)
//   0          0               0x00
// Dequantized: E4M3 value / 64.
TEST(Golden, Fp8E4M3PerTensor) {
  const std::vector<float> x = {7, -7, 1, -0.5f, 1.0625f, 1.1875f, std::ldexp(1.0f, -15), std::ldexp(1.0f, -16),
                                -3 * std::ldexp(1.0f, -16), 0.1f, 3.3f, 0};
  const QuantizedTensor q = quantize(x, 2, 6, make_spec(Format::kFp8E4M3, Block::kTensor));
  EXPECT_EQ(q.amax, 7.0f);
  EXPECT_EQ(q.decode_scale, 1.0f / 64);
  EXPECT_TRUE(q.scales.empty());
  EXPECT_EQ(q.data, (std::vector<uint8_t>{0x7E, 0xFE, 0x68, 0xE0, 0x68, 0x6A, 0x01, 0x00, 0x82, 0x4D, 0x75, 0x00}));
  expect_values(dequantize(q), {7, -7, 1, -0.5f, 1, 1.25f, std::ldexp(1.0f, -15), 0, -std::ldexp(1.0f, -14),
                                6.5f / 64, 208.0f / 64, 0});
}

// ---- FP8 E5M2, per-tensor current scaling ----
//
// amax = 7: S = 57344 / 7 = 8192 = 2^13 exactly, g = 2^-13. y = 8192x, then E5M2 RNE:
//   x          y                     code  why
//   7          57344                 0x7B  max: field 30, mantissa 3
//   1          2^13                  0x70  field 28
//  -0.5       -2^12                  0xEC  field 27, sign
//   1.125      1.125 * 2^13          0x70  tie between 1.0 (m=0) and 1.25 (m=1) -> 1.0
//   1.375      1.375 * 2^13          0x72  tie between 1.25 (m=1) and 1.5 (m=2) -> 1.5
//   2^-29      2^-16                 0x01  smallest subnormal
//   2^-30      2^-17                 0x00  tie -> 0
//  -3*2^-30   -1.5 * 2^-16           0x82  tie -> 2 subnormal steps
//   0.1        819.2                 0x62  step 128 in [512, 1024): 768 = 1.5 * 512 (field 24, m=2)
//  -6.9       -56524.8               0xFB  step 8192 in [32768, 65536): 57344 is nearer than 49152
//   0          0                     0x00
//   2          16384                 0x74  field 29
TEST(Golden, Fp8E5M2PerTensor) {
  const std::vector<float> x = {7, 1, -0.5f, 1.125f, 1.375f, std::ldexp(1.0f, -29), std::ldexp(1.0f, -30),
                                -3 * std::ldexp(1.0f, -30), 0.1f, -6.9f, 0, 2};
  const QuantizedTensor q = quantize(x, 3, 4, make_spec(Format::kFp8E5M2, Block::kTensor));
  EXPECT_EQ(q.amax, 7.0f);
  EXPECT_EQ(q.decode_scale, 1.0f / 8192);
  EXPECT_EQ(q.data, (std::vector<uint8_t>{0x7B, 0x70, 0xEC, 0x70, 0x72, 0x01, 0x00, 0x82, 0x62, 0xFB, 0x00, 0x74}));
  expect_values(dequantize(q), {7, 1, -0.5f, 1, 1.5f, std::ldexp(1.0f, -29), 0, -std::ldexp(1.0f, -28),
                                768.0f / 8192, -7, 0, 2});
}

}  // namespace
}  // namespace nibble
