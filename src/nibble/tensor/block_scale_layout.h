// The layout in which cuBLASLt's block-scaled GEMMs (Blackwell, CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3)
// read an operand's block scales, and the rearrangement of ours into it.
//
// Ours (QuantizedTensor): an operand of `rows` rows with the reduction dimension K contiguous has
// one scale per 16 elements along K, row-major [rows x K/16] (a 16x16-tile weight stores
// [rows/16 x K/16]: one scale shared by 16 consecutive rows).
//
// cuBLASLt's ("1D block scaling factors layout" in the cuBLAS documentation): the scale matrix,
// with rows padded to a multiple of 128 and scale columns (K/16) to a multiple of 4, is cut into
// 128 x 4 tiles of 512 bytes each. Tiles are stored row-major over (row tile, column tile), that is
// column tiles (along K) adjacent. Inside a tile, scale (r, c) (r < 128, c < 4) sits at
//     (r % 32) * 16 + (r / 32) * 4 + c
// so the 16 bytes at 16 * i hold rows i, i + 32, i + 64, i + 96, four scales each. Padding slots
// are never read for a result that exists; we fill them with zero.
//
// Header-only and host/device: the CUDA kernel that rearranges scales (tensor/cuda/gemm_cuda.h)
// and the CPU tests use the same functions.
#pragma once

#include <cstdint>
#include <vector>

#include "nibble/formats/host_device.h"

namespace nibble {

inline constexpr int64_t kScaleTileRows = 128;  // operand rows per tile
inline constexpr int64_t kScaleTileCols = 4;    // scales (of 16 elements each) along K per tile
inline constexpr int64_t kScaleTileBytes = kScaleTileRows * kScaleTileCols;

NIBBLE_HD int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Padded extents of the scale matrix of an operand with `rows` rows and `scale_cols` = K/16 scales per row.
NIBBLE_HD int64_t tiled_scale_rows(int64_t rows) { return round_up(rows, kScaleTileRows); }
NIBBLE_HD int64_t tiled_scale_cols(int64_t scale_cols) { return round_up(scale_cols, kScaleTileCols); }
// Bytes of the tiled scale buffer (padding included).
NIBBLE_HD int64_t tiled_scale_bytes(int64_t rows, int64_t scale_cols) {
  return tiled_scale_rows(rows) * tiled_scale_cols(scale_cols);
}

// Byte offset in the tiled buffer of the scale of operand row `row`, K-block `kb` (elements
// 16 kb .. 16 kb + 15 of that row), for `scale_cols` = K/16 scales per row. Defined on the padded
// extents: row < tiled_scale_rows(rows), kb < tiled_scale_cols(scale_cols).
NIBBLE_HD int64_t tiled_scale_offset(int64_t row, int64_t kb, int64_t scale_cols) {
  const int64_t col_tiles = tiled_scale_cols(scale_cols) / kScaleTileCols;
  const int64_t tile = (row / kScaleTileRows) * col_tiles + kb / kScaleTileCols;
  const int64_t r = row % kScaleTileRows, c = kb % kScaleTileCols;
  return tile * kScaleTileBytes + (r % 32) * 16 + (r / 32) * 4 + c;
}

// The scale code for (row, kb) of the padded matrix, read from our row-major scales
// [ceil(rows / rows_per_scale_row) x scale_cols] (rows_per_scale_row: 1 for 1x16 blocks, 16 for
// 16x16 tiles), or 0 in the padding.
NIBBLE_HD uint8_t source_scale(const uint8_t* scales, int64_t rows, int64_t scale_cols, int64_t rows_per_scale_row,
                               int64_t row, int64_t kb) {
  if (row >= rows || kb >= scale_cols) return 0;
  return scales[(row / rows_per_scale_row) * scale_cols + kb];
}

// The whole rearrangement on the host (tests, tools). The CUDA kernel runs the same loop body,
// one thread per slot.
inline std::vector<uint8_t> tile_block_scales(const uint8_t* scales, int64_t rows, int64_t scale_cols,
                                              int64_t rows_per_scale_row) {
  std::vector<uint8_t> out(static_cast<size_t>(tiled_scale_bytes(rows, scale_cols)));
  for (int64_t row = 0; row < tiled_scale_rows(rows); ++row)
    for (int64_t kb = 0; kb < tiled_scale_cols(scale_cols); ++kb)
      out[static_cast<size_t>(tiled_scale_offset(row, kb, scale_cols))] =
          source_scale(scales, rows, scale_cols, rows_per_scale_row, row, kb);
  return out;
}

}  // namespace nibble
