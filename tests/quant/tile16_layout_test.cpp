// The NVFP4 16x16 weight kernel's layout (quant/cuda/tile16_layout.h) run on the CPU: the warp's
// 32 lanes emulated in lockstep (a shuffle reads every lane's value before any lane changes it),
// with the kernel's index math and nibble transpose steps, and the shared scalar encoders in place
// of its packed E2M1 arithmetic. The emulated kernel must give the CPU reference's bits for W and
// W^T on shapes that leave partial warp tiles; the device test (tests/cuda/quantize_cuda_test.cpp)
// then checks the kernel itself.
#include "nibble/quant/cuda/tile16_layout.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "nibble/quant/quantize.h"
#include "nibble/quant/scaling.h"
#include "test_seed.h"

namespace nibble {
namespace {

using Words = std::array<std::array<uint32_t, tile16::kWords>, 32>;  // [lane][word]

// The three transpose steps of the kernel, over a whole warp.
void transpose(Words& w) {
  for (auto& lane_words : w) tile16::transpose_step2(lane_words.data());
  for (int mask : {16, 8}) {
    const Words before = w;
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < tile16::kWords; ++i)
        w[l][i] = mask == 16 ? tile16::transpose_step1(before[l][i], before[l ^ 16][i], l)
                             : tile16::transpose_step0(before[l][i], before[l ^ 8][i], l);
  }
}

uint32_t nibble_of(uint32_t word, int k) { return (word >> (4 * k)) & 0xFu; }

// Every nibble of a warp tile ends where W^T needs it: element (r, c) of the warp tile (nibble k of
// word i of the lane that loaded it) at W^T row c, element r.
TEST(Tile16Layout, TransposeStepsTransposeTheWarpTile) {
  std::mt19937_64 rng(test::fresh_seed());
  Words w{};
  for (auto& lane_words : w)
    for (auto& word : lane_words) word = static_cast<uint32_t>(rng());
  uint32_t m[tile16::kWarpRows][tile16::kWarpCols];  // nibble at (row, col) of the warp tile
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < tile16::kWords; ++i)
      for (int k = 0; k < 8; ++k) m[tile16::word_row(l, i)][tile16::word_col(l) + k] = nibble_of(w[l][i], k);
  transpose(w);
  int checked = 0;
  for (int l = 0; l < 32; ++l) {
    for (int half = 0; half < 2; ++half) {
      const int c = tile16::transposed_row(l, half);
      const int words[4] = {half, 2 + half, 4 + half, 6 + half};  // elements 0-7, 8-15, 16-23, 24-31
      for (int q = 0; q < 4; ++q)
        for (int k = 0; k < 8; ++k) {
          ASSERT_EQ(nibble_of(w[l][words[q]], k), m[8 * q + k][c])
              << "lane " << l << " W^T row " << c << " element " << 8 * q + k;
          ++checked;
        }
    }
  }
  EXPECT_EQ(checked, tile16::kWarpRows * tile16::kWarpCols);
}

// Each element of the warp tile is loaded by exactly one lane and word, and the words of one tile
// are held by the 8 lanes that tile_lane_mask connects.
TEST(Tile16Layout, LanesCoverTheWarpTileOnceAndTilesStayTogether) {
  int seen[tile16::kWarpRows][tile16::kWarpCols] = {};
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < tile16::kWords; ++i) {
      const int r = tile16::word_row(l, i), c = tile16::word_col(l);
      ASSERT_LT(r, tile16::kWarpRows);
      ASSERT_LE(c + 8, tile16::kWarpCols);
      EXPECT_EQ(r / 16, tile16::tile_row(i));
      EXPECT_EQ(c / 16, tile16::tile_col(l));
      for (int k = 0; k < 8; ++k) ++seen[r][c + k];
    }
  for (const auto& row : seen)
    for (int n : row) EXPECT_EQ(n, 1);
  for (int l = 0; l < 32; ++l) {
    int group = 0;  // lanes reachable through the masks: must be the 8 lanes of l's tile column
    for (int other = 0; other < 32; ++other) {
      const int d = l ^ other;
      const bool reachable =
          (d & ~(tile16::tile_lane_mask(0) | tile16::tile_lane_mask(1) | tile16::tile_lane_mask(2))) == 0;
      EXPECT_EQ(reachable, tile16::tile_col(other) == tile16::tile_col(l)) << l << " " << other;
      group += reachable;
    }
    EXPECT_EQ(group, 8);
  }
}

// The kernel on one warp at a time: loads, tile amaxes through the lane exchanges, scale codes traded
// with lane ^ 8, encoding, W's stores, the transpose, W^T's stores; outputs start poisoned.
std::pair<QuantizedTensor, QuantizedTensor> emulate(const std::vector<float>& x, int64_t rows, int64_t cols) {
  QuantizedTensor w, wt;
  w.spec = make_spec(Format::kNvfp4, Block::k16x16);
  wt.spec = make_spec(Format::kNvfp4, Block::k16x16, Rounding::kNearestEven, true);
  w.rows = wt.cols = rows;
  w.cols = wt.rows = cols;
  w.data.assign(static_cast<size_t>(rows * cols / 2), 0xA5);
  wt.data = w.data;
  w.scales.assign(static_cast<size_t>(rows * cols / 256), 0xA5);
  wt.scales = w.scales;
  uint32_t amax_bits = 0;
  for (float v : x) amax_bits = std::max(amax_bits, abs_bits(v));
  const bool finite = amax_is_finite(amax_bits);
  const TensorScale ts = nvfp4_tensor_scale(bits_float(amax_bits));
  w.amax = wt.amax = bits_float(amax_bits);
  w.decode_scale = wt.decode_scale = finite ? ts.decode : NAN;

  for (int64_t index = 0; index < tile16::warp_tiles(rows, cols); ++index) {
    const tile16::WarpTile t = tile16::warp_tile(index, cols);
    const bool row1_ok = t.r0 + 16 < rows;
    float v[32][tile16::kWords][8] = {};
    float amax[32][2] = {};
    bool col_ok[32];
    for (int l = 0; l < 32; ++l) {
      col_ok[l] = t.c0 + tile16::word_col(l) < cols;
      for (int i = 0; i < tile16::kWords; ++i) {
        if (!(finite && col_ok[l] && (tile16::tile_row(i) == 0 || row1_ok))) continue;
        for (int k = 0; k < 8; ++k) {
          v[l][i][k] = x[static_cast<size_t>((t.r0 + tile16::word_row(l, i)) * cols + t.c0 + tile16::word_col(l) + k)];
          amax[l][tile16::tile_row(i)] = std::fmax(amax[l][tile16::tile_row(i)], std::fabs(v[l][i][k]));
        }
      }
    }
    for (int k = 0; k < tile16::kTileLanesLog2; ++k) {
      float before[32][2];
      std::copy(&amax[0][0], &amax[0][0] + 64, &before[0][0]);
      for (int l = 0; l < 32; ++l)
        for (int tr = 0; tr < 2; ++tr)
          amax[l][tr] = std::fmax(before[l][tr], before[l ^ tile16::tile_lane_mask(k)][tr]);
    }
    uint32_t own[32], code[32][2];
    for (int l = 0; l < 32; ++l) own[l] = finite ? nvfp4_block_scale_code(amax[l][(l & 8) ? 1 : 0], ts.encode) : 0u;
    for (int l = 0; l < 32; ++l) {
      const bool odd = (l & 8) != 0;
      code[l][0] = odd ? own[l ^ 8] : own[l];
      code[l][1] = odd ? own[l] : own[l ^ 8];
    }
    Words words{};
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < tile16::kWords; ++i) {
        const float e = nvfp4_element_encode_scale(static_cast<uint8_t>(code[l][tile16::tile_row(i)]), ts.decode);
        for (int k = 0; k < 8; ++k)
          words[l][i] |= static_cast<uint32_t>(fp4_encode_element(v[l][i][k], e, Rounding::kNearestEven, 0)) << (4 * k);
      }
    const auto put = [](std::vector<uint8_t>& out, int64_t byte, uint32_t word) {
      for (int b = 0; b < 4; ++b) out.at(static_cast<size_t>(byte + b)) = static_cast<uint8_t>(word >> (8 * b));
    };
    for (int l = 0; l < 32; ++l) {
      if (!col_ok[l]) continue;
      for (int i = 0; i < tile16::kWords; ++i) {
        if (tile16::tile_row(i) == 1 && !row1_ok) continue;
        put(w.data, ((t.r0 + tile16::word_row(l, i)) * cols + t.c0 + tile16::word_col(l)) / 2, words[l][i]);
      }
      const int tc = tile16::tile_col(l);
      if (l == 2 * tc) {
        const int64_t s = (t.r0 / 16) * (cols / 16) + t.c0 / 16 + tc;
        w.scales.at(static_cast<size_t>(s)) = static_cast<uint8_t>(code[l][0]);
        if (row1_ok) w.scales.at(static_cast<size_t>(s + cols / 16)) = static_cast<uint8_t>(code[l][1]);
        const int64_t st = (t.c0 / 16 + tc) * (rows / 16) + t.r0 / 16;
        wt.scales.at(static_cast<size_t>(st)) = static_cast<uint8_t>(code[l][0]);
        if (row1_ok) wt.scales.at(static_cast<size_t>(st + 1)) = static_cast<uint8_t>(code[l][1]);
      }
    }
    transpose(words);
    for (int l = 0; l < 32; ++l) {
      if (!col_ok[l]) continue;
      for (int m = 0; m < 2; ++m) {
        const int64_t byte = ((t.c0 + tile16::transposed_row(l, m)) * rows + t.r0) / 2;
        // The kernel's 16-byte store needs rows % 32 == 0; its two 8-byte stores write the same bytes.
        put(wt.data, byte, words[l][m]);
        put(wt.data, byte + 4, words[l][2 + m]);
        if (row1_ok) {
          put(wt.data, byte + 8, words[l][4 + m]);
          put(wt.data, byte + 12, words[l][6 + m]);
        }
      }
    }
  }
  return {w, wt};
}

::testing::AssertionResult same_bits(const QuantizedTensor& ref, const QuantizedTensor& got) {
  if (float_bits(ref.decode_scale) != float_bits(got.decode_scale) &&
      !(ref.decode_scale != ref.decode_scale && got.decode_scale != got.decode_scale))
    return ::testing::AssertionFailure() << "decode scale " << ref.decode_scale << " vs " << got.decode_scale;
  if (ref.scales.size() != got.scales.size() || ref.data.size() != got.data.size())
    return ::testing::AssertionFailure() << "sizes differ";
  for (size_t i = 0; i < ref.scales.size(); ++i)
    if (ref.scales[i] != got.scales[i])
      return ::testing::AssertionFailure()
             << "scale " << i << ": " << int(ref.scales[i]) << " vs " << int(got.scales[i]);
  for (size_t i = 0; i < ref.data.size(); ++i)
    if (ref.data[i] != got.data[i])
      return ::testing::AssertionFailure()
             << "data byte " << i << ": " << int(ref.data[i]) << " vs " << int(got.data[i]);
  return ::testing::AssertionSuccess();
}

// Shapes with every remainder of rows mod 32 and cols mod 64, and tiles over E4M3's whole range
// (subnormal and zero scales, saturating elements), zeros and non-finite tensors.
TEST(Tile16Layout, EmulatedKernelEqualsCpuReferenceForWAndWt) {
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::pair<int64_t, int64_t> shapes[] = {{16, 16},  {32, 64},  {48, 80}, {16, 96},
                                                {96, 112}, {80, 208}, {144, 48}};
  int compared = 0;
  for (const auto& [rows, cols] : shapes) {
    for (int dist = 0; dist < 4; ++dist) {
      std::vector<float> x(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          float v = normal(rng);
          if (dist == 1) v = std::ldexp(v, -static_cast<int>((r / 16 * 7 + c / 16 * 13) % 41));  // wide tile range
          if (dist == 2) v = 0.0f;
          x[static_cast<size_t>(r * cols + c)] = v;
        }
      if (dist == 3) x[rng() % x.size()] = (rng() & 1) ? NAN : -INFINITY;
      SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols) + " dist " + std::to_string(dist));
      const auto [w, wt] = emulate(x, rows, cols);
      EXPECT_TRUE(same_bits(quantize(std::span<const float>(x), rows, cols, w.spec), w)) << "W";
      EXPECT_TRUE(same_bits(quantize(std::span<const float>(x), rows, cols, wt.spec), wt)) << "W^T";
      compared += 2;
    }
  }
  EXPECT_EQ(compared, 56);
}

}  // namespace
}  // namespace nibble
