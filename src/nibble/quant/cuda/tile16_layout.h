// Data layout of the NVFP4 16x16 weight quantizer (nvfp4_tile16_kernel in nvfp4_tile16.cuh):
// which elements each lane of a warp holds, and the nibble transpose that turns W's codes into
// W^T's. Host and device code, so that a CPU test (tests/quant/tile16_layout_test.cpp) can run the
// same index math and transpose steps lane by lane, with the shuffles emulated.
//
// A warp quantizes a "warp tile" of 32 rows x 64 columns of W: 2 x 4 tiles of 16 x 16. Lane
// l = 8p + o (p = 0..3, o = 0..7) holds the 8 elements in columns 8o .. 8o+7 of rows p + 4i,
// i = 0..7: one 16-byte load per i for BF16 (two for float), so that each warp-wide load reads 4
// whole 128-byte rows. Their 8 E2M1 codes are the lane's word i (element k in nibble k), which
// is also W's packed output for those elements. Word i lies in tile row i / 4 and tile column o / 2;
// the 8 lanes of one tile column (lane bits 0, 3, 4 vary) hold its 2 tiles.
//
// W^T's codes are the same codes transposed (same tile scale, same values), so the words are
// transposed as 16 x 16 nibble matrices. In a tile, word i of lane (p, o) is row rr = p + 4j
// (j = i % 4) and columns 8h .. 8h+7 (h = o % 2). Exchanging bit b of the row index with bit b of
// the column index, for b = 0, 1, 2, 3, transposes the tile; we do it for b = 0, 1, 2 only:
//   b = 2: row bit 2 = bit 0 of j, column bit 2 = the word's upper 16 bits: two words of the lane;
//   b = 1: row bit 1 = lane bit 4, column bit 1 = byte 1 of each half: lanes l and l ^ 16;
//   b = 0: row bit 0 = lane bit 3, column bit 0 = the upper nibble of each byte: lanes l and l ^ 8.
// Word i of lane (p, o) then holds column 8h + p + 4 (j % 2) of the tile in rows 8 (j / 2) .. +7,
// that is W^T row 8o + p + 4 (j % 2) (relative to the warp tile) in elements 16 (i / 4) + 8 (j / 2)
// .. +7: each lane ends with two whole 32-element rows of W^T, 16 contiguous bytes each, without
// the bit-3 exchange (it would move words between lanes l and l ^ 1 only to move them back).
#pragma once

#include <cstdint>

#include "nibble/formats/host_device.h"

namespace nibble::tile16 {

inline constexpr int kWarpRows = 32;
inline constexpr int kWarpCols = 64;
inline constexpr int kWords = 8;  // words (8 codes each) per lane and warp tile

NIBBLE_HD int64_t warp_tiles_x(int64_t cols) { return (cols + kWarpCols - 1) / kWarpCols; }
NIBBLE_HD int64_t warp_tiles(int64_t rows, int64_t cols) {
  return warp_tiles_x(cols) * ((rows + kWarpRows - 1) / kWarpRows);
}

// First row and column of W in warp tile `index` (row-major over warp tiles).
struct WarpTile {
  int64_t r0, c0;
};
NIBBLE_HD WarpTile warp_tile(int64_t index, int64_t cols) {
  const int64_t tx = warp_tiles_x(cols);
  return WarpTile{(index / tx) * kWarpRows, (index % tx) * kWarpCols};
}

// Position of word i of `lane` in the warp tile (before the transpose): its row, its first column.
NIBBLE_HD int word_row(int lane, int i) { return (lane >> 3) + 4 * i; }
NIBBLE_HD int word_col(int lane) { return 8 * (lane & 7); }
NIBBLE_HD int tile_col(int lane) { return (lane & 7) >> 1; }  // of every word of the lane
NIBBLE_HD int tile_row(int i) { return i >> 2; }

// The 8 lanes that hold the same tiles differ in lane bits 0, 3 and 4: a tile's amax is reduced by
// exchanges with lane ^ tile_lane_mask(k), k = 0..2.
inline constexpr int kTileLanesLog2 = 3;
NIBBLE_HD int tile_lane_mask(int k) { return k == 0 ? 1 : k == 1 ? 8 : 16; }

// PTX prmt / __byte_perm with byte selectors 0..7: byte k of the result is byte sel[4k+2:4k] of
// the 8 bytes {b:a}.
NIBBLE_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) r |= static_cast<uint32_t>((ab >> (8 * ((sel >> (4 * k)) & 7))) & 0xFFu) << (8 * k);
  return r;
#endif
}

// Step b = 2, inside the lane: words 4t + 2m and 4t + 2m + 1 (rows with bit 2 clear and set)
// trade the upper 16 bits of the first for the lower 16 bits of the second.
NIBBLE_HD void transpose_step2(uint32_t w[kWords]) {
  NIBBLE_UNROLL
  for (int i = 0; i < kWords; i += 2) {
    const uint32_t a = w[i], b = w[i + 1];
    w[i] = byte_perm(a, b, 0x5410u);      // a.lo16, b.lo16
    w[i + 1] = byte_perm(a, b, 0x7632u);  // a.hi16, b.hi16
  }
}

// Step b = 1: `partner` is the same word of lane ^ 16. The lane with bit 4 clear holds the row
// with bit 1 clear: it keeps bytes 0 and 2 and takes the partner's bytes 0 and 2 as its bytes 1 and
// 3; the other lane keeps bytes 1 and 3 and takes the partner's bytes 1 and 3 as its bytes 0 and 2.
NIBBLE_HD uint32_t transpose_step1(uint32_t own, uint32_t partner, int lane) {
  return byte_perm(own, partner, (lane & 16) ? 0x3715u : 0x6240u);
}

// Step b = 0: `partner` is the same word of lane ^ 8. The lane with bit 3 clear keeps the lower
// nibble of each byte and takes the partner's lower nibble as its upper one; the other keeps the
// upper nibbles and takes the partner's upper nibbles as its lower ones.
NIBBLE_HD uint32_t transpose_step0(uint32_t own, uint32_t partner, int lane) {
  const bool upper = (lane & 8) != 0;
  const uint32_t keep = upper ? 0xF0F0F0F0u : 0x0F0F0F0Fu;
  const uint32_t moved = upper ? (partner >> 4) : (partner << 4);
  return (own & keep) | (moved & ~keep);
}

// After the three steps: lane's W^T row (relative to the warp tile's first column) for half
// m = 0, 1, whose 32 elements (the warp tile's rows 0..31) are words m, 2 + m, 4 + m, 6 + m.
NIBBLE_HD int transposed_row(int lane, int m) { return 8 * (lane & 7) + (lane >> 3) + 4 * m; }

}  // namespace nibble::tile16
