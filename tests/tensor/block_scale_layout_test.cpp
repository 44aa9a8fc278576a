// cuBLASLt's tiled block-scale layout (tensor/block_scale_layout.h), the index map that the
// Blackwell NVFP4 GEMM path depends on: hand-worked positions from the documented formula, a
// bijection of the padded scale matrix onto the buffer for aligned and unaligned shapes, and the
// rearrangement of real quantizer output (1x16 blocks and 16x16 tiles) read back as cuBLASLt
// would read it.
#include "nibble/tensor/block_scale_layout.h"

#include <gtest/gtest.h>

#include <random>
#include <set>
#include <vector>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/quantize.h"
#include "test_seed.h"

namespace nibble {
namespace {

// Positions worked by hand from the documented layout: tiles of 128 rows x 4 scales (512 bytes),
// row-major over (row tile, column tile); inside a tile (r, c) -> (r % 32) * 16 + (r / 32) * 4 + c.
// With K/16 = 10 scales per row the columns pad to 12, i.e. 3 column tiles per row tile.
TEST(BlockScaleLayout, HandWorkedPositions) {
  const int64_t sc = 10;
  EXPECT_EQ(tiled_scale_offset(0, 0, sc), 0);
  EXPECT_EQ(tiled_scale_offset(1, 0, sc), 16);                     // (1 % 32) * 16
  EXPECT_EQ(tiled_scale_offset(32, 0, sc), 4);                     // (32 / 32) * 4
  EXPECT_EQ(tiled_scale_offset(33, 2, sc), 22);                    // 1 * 16 + 1 * 4 + 2
  EXPECT_EQ(tiled_scale_offset(127, 3, sc), 511);                  // 31 * 16 + 3 * 4 + 3: last byte of tile 0
  EXPECT_EQ(tiled_scale_offset(0, 4, sc), 512);                    // tile 0 * 3 + 1
  EXPECT_EQ(tiled_scale_offset(5, 9, sc), 1105);                   // tile 2: 1024 + 5 * 16 + 0 * 4 + 1
  EXPECT_EQ(tiled_scale_offset(130, 6, sc), 2082);                 // tile 1 * 3 + 1 = 4: 2048 + 2 * 16 + 0 + 2
  EXPECT_EQ(tiled_scale_offset(200, 0, sc), 1672);                 // tile 3: 1536 + (72 % 32) * 16 + (72 / 32) * 4
  EXPECT_EQ(tiled_scale_offset(255, 11, sc), 6 * 512 - 1);         // the last padded slot: the last byte
  // One scale per row (K = 16): a single column tile, the 3 padding columns still take their bytes.
  EXPECT_EQ(tiled_scale_offset(64, 0, 1), 8);                      // (64 / 32) * 4
  EXPECT_EQ(tiled_scale_offset(128, 0, 1), 512);                   // row tile 1, column tile 0 of 1
  // Sizes: rows and scale columns rounded up to 128 and 4.
  EXPECT_EQ(tiled_scale_bytes(1, 1), 512);
  EXPECT_EQ(tiled_scale_bytes(128, 4), 512);
  EXPECT_EQ(tiled_scale_bytes(129, 5), 256 * 8);
  EXPECT_EQ(tiled_scale_bytes(768, 48), 768 * 48);                 // GPT-2's aligned shapes: no padding
}

// The 16 bytes at 16 i of a tile hold rows i, i + 32, i + 64, i + 96 (four scales each): the
// documented "32 x 16 bytes" view of a 128 x 4 tile.
TEST(BlockScaleLayout, SixteenByteLinesHoldRowsThirtyTwoApart) {
  for (int64_t i = 0; i < 32; ++i)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t c = 0; c < 4; ++c) EXPECT_EQ(tiled_scale_offset(i + 32 * j, c, 8), 16 * i + 4 * j + c);
}

// Every slot of the padded matrix lands on its own byte and the buffer is covered exactly, so the
// non-padding slots map one-to-one onto distinct bytes (and the kernel, one thread per slot, writes
// every byte once).
TEST(BlockScaleLayout, BijectionOntoTheBuffer) {
  for (const int64_t rows : {1, 16, 100, 128, 129, 256, 300}) {
    for (const int64_t sc : {1, 2, 3, 4, 5, 10, 48, 64}) {
      const int64_t bytes = tiled_scale_bytes(rows, sc);
      std::vector<int> hits(static_cast<size_t>(bytes), 0);
      for (int64_t r = 0; r < tiled_scale_rows(rows); ++r)
        for (int64_t kb = 0; kb < tiled_scale_cols(sc); ++kb) {
          const int64_t off = tiled_scale_offset(r, kb, sc);
          ASSERT_GE(off, 0);
          ASSERT_LT(off, bytes) << "rows " << rows << " scale cols " << sc << " at (" << r << ", " << kb << ")";
          ++hits[static_cast<size_t>(off)];
        }
      for (int64_t i = 0; i < bytes; ++i)
        ASSERT_EQ(hits[static_cast<size_t>(i)], 1) << "rows " << rows << " scale cols " << sc << " byte " << i;
    }
  }
}

// Random nonzero scale codes (so that padding zeros are told apart) through tile_block_scales:
// each one is found at its offset, with 1 and with 16 rows per scale row, and the rest is zero.
TEST(BlockScaleLayout, TilesRandomScalesAndZeroesThePadding) {
  std::mt19937_64 rng(test::fresh_seed());
  std::uniform_int_distribution<int> code(1, 0x7E);  // positive finite E4M3 codes
  for (const int64_t rows_per : {1, 16}) {
    for (const auto& [rows, sc] : {std::pair<int64_t, int64_t>{48, 3}, {160, 10}, {256, 8}, {400, 7}}) {
      const int64_t scale_rows = (rows + rows_per - 1) / rows_per;
      std::vector<uint8_t> scales(static_cast<size_t>(scale_rows * sc));
      for (uint8_t& s : scales) s = static_cast<uint8_t>(code(rng));
      const std::vector<uint8_t> tiled = tile_block_scales(scales.data(), rows, sc, rows_per);
      ASSERT_EQ(static_cast<int64_t>(tiled.size()), tiled_scale_bytes(rows, sc));
      std::vector<bool> used(tiled.size(), false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t kb = 0; kb < sc; ++kb) {
          const auto off = static_cast<size_t>(tiled_scale_offset(r, kb, sc));
          ASSERT_EQ(tiled[off], scales[static_cast<size_t>((r / rows_per) * sc + kb)])
              << "rows " << rows << " (" << r << ", " << kb << ") rows per scale row " << rows_per;
          used[off] = true;
        }
      for (size_t i = 0; i < tiled.size(); ++i)
        if (!used[i]) {
          ASSERT_EQ(tiled[i], 0) << "padding byte " << i << " of rows " << rows << " x " << sc;
        }
    }
  }
}

// The quantizer's own output, decoded the way cuBLASLt's block-scaled GEMM reads it (code x the
// scale found at tiled_scale_offset x g), equals dequantize() bit for bit: for activations (1x16),
// for weights in 16x16 tiles, and for a columnwise copy (scales then run along the source's rows).
TEST(BlockScaleLayout, QuantizerOutputDecodesThroughTheTiledLayout) {
  std::mt19937_64 rng(test::fresh_seed());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rows = 144, cols = 96;  // 144 = 128 + 16 rows: one full and one partial row tile
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) v = normal(rng);
  for (const QuantSpec& spec :
       {make_spec(Format::kNvfp4, Block::k1x16), make_spec(Format::kNvfp4, Block::k16x16),
        make_spec(Format::kNvfp4, Block::k1x16, Rounding::kNearestEven, /*columnwise=*/true)}) {
    const QuantizedTensor q = quantize(x, rows, cols, spec);
    const int64_t sc = q.cols / 16;
    const int64_t rows_per = spec.block == Block::k16x16 ? 16 : 1;
    const std::vector<uint8_t> tiled = tile_block_scales(q.scales.data(), q.rows, sc, rows_per);
    const std::vector<float> want = dequantize(q);
    int mismatches = 0;
    for (int64_t r = 0; r < q.rows; ++r)
      for (int64_t c = 0; c < q.cols; ++c) {
        const float scale = E4M3::decode(tiled[static_cast<size_t>(tiled_scale_offset(r, c / 16, sc))]);
        const float got = E2M1::decode(fp4_code_at(q.data, r * q.cols + c)) * scale * q.decode_scale;
        if (got != want[static_cast<size_t>(r * q.cols + c)] && ++mismatches <= 3)
          ADD_FAILURE() << describe(spec) << " (" << r << ", " << c << "): " << got << " vs "
                        << want[static_cast<size_t>(r * q.cols + c)];
      }
    EXPECT_EQ(mismatches, 0) << describe(spec);
  }
}

}  // namespace
}  // namespace nibble
