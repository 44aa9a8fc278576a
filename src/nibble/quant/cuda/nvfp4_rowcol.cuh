// The fused NVFP4 rowwise + columnwise (+RHT) pass (nvfp4_rowcol_kernel) and the device helpers
// the other quantizer kernels of quantize_cuda.cu share with it. Included by quantize_cuda.cu, and
// compiled as host C++ by tests/cuda_emulation/quantize_emulation_test.cpp
// (NIBBLE_ROWCOL_HOST_EMULATION, which brings its own versions of the PTX wrapper below and of the
// CUDA intrinsics), so that the kernel's bits are checked against the CPU reference without a GPU.
#pragma once

#include <cstdint>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/cuda/amax_device.cuh"
#include "nibble/quant/cuda/e2m1_pack.cuh"
#include "nibble/quant/cuda/fp4_decode_store.cuh"
#include "nibble/quant/cuda/quantize_cuda.h"
#include "nibble/quant/fp4_decode_bf16.h"
#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"
#include "nibble/quant/rht.h"
#include "nibble/quant/scaling.h"

namespace nibble::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Device helpers

// 16 consecutive elements as loaded from memory with 16-byte loads: kept raw until needed, so that
// a thread can have all its loads in flight before it uses the first one.
template <typename T>
struct Raw16 {
  static constexpr int kVecs = 16 * sizeof(T) / 16;
  uint4 vec[kVecs];
};

template <typename T>
__device__ __forceinline__ Raw16<T> load_raw16(const T* p) {  // p 16-byte aligned
  Raw16<T> r;
#pragma unroll
  for (int i = 0; i < Raw16<T>::kVecs; ++i) r.vec[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}

template <int kN>
__device__ __forceinline__ uint32_t max_abs_bits(const float* v) {
  uint32_t a = 0;
#pragma unroll
  for (int i = 0; i < kN; ++i) a = max(a, abs_bits(v[i]));
  return a;
}

// max |v| of finite values (one FMNMX per element, where abs_bits + integer max take two). Equal
// to bits_float(max_abs_bits(v)) whenever every v is finite, which the quantizers check first.
template <int kN>
__device__ __forceinline__ float max_abs_finite(const float* v) {
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < kN; ++i) a = fmaxf(a, fabsf(v[i]));
  return a;
}


// Encodes kN (16 or 32) FP4 elements with one element scale and packs them (element 2i in the low
// nibble of byte i) into kN/8 32-bit words. `index0` is the row-major index of v[0] in the
// quantized matrix; it is a multiple of 16, so the Philox groups (16 elements) line up with the CPU's.
template <int kN, Rounding kRounding>
__device__ __forceinline__ void encode_fp4(const float* v, float scale, uint64_t seed, uint32_t stream,
                                           uint64_t index0, uint32_t* packed) {
#pragma unroll
  for (int w = 0; w < kN / 8; ++w) packed[w] = 0;
#pragma unroll
  for (int g = 0; g < kN / kFp4ElementsPerGroup; ++g) {
    Philox4x32 bits{{0, 0, 0, 0}};
    if constexpr (kRounding == Rounding::kStochastic)
      bits = random_words(seed, stream, index0 / kFp4ElementsPerGroup + g);
#pragma unroll
    for (int j = 0; j < kFp4ElementsPerGroup; ++j) {
      const uint32_t code = fp4_encode_element(v[16 * g + j], scale, kRounding, fp4_random_word(bits, j));
      packed[2 * g + j / 8] |= code << (4 * (j % 8));
    }
  }
}

// encode_fp4 with the spec's rounding chosen at run time (generic path).
template <int kN>
__device__ __forceinline__ void encode_fp4_any(const float* v, float scale, const QuantSpec& spec, uint64_t index0,
                                               uint32_t* packed) {
  if (spec.rounding == Rounding::kStochastic)
    encode_fp4<kN, Rounding::kStochastic>(v, scale, spec.seed, spec.stream, index0, packed);
  else
    encode_fp4<kN, Rounding::kNearestEven>(v, scale, spec.seed, spec.stream, index0, packed);
}


// ---------------------------------------------------------------------------------------------
// Fused NVFP4 rowwise + columnwise (+ RHT) pass over 64 x 128 tiles, persistent grid.
//
// Per tile, each thread block
//   1. loads the tile with 16-byte loads (every thread's loads in flight before it uses one),
//      quantizes 16-element row segments as rowwise 1x16 blocks straight from registers (with
//      stochastic rounding: from shared memory once the tile is staged, kRowsFromTile), and
//      parks the values as float32 in shared memory (the RHT signs already applied, see below);
//   2. reads the tile back by columns (two neighbouring columns per 8-byte load), applies the RHT
//      butterfly if asked, and quantizes 16-row column blocks into the columnwise copy; its decoded
//      BF16 values, where asked for, go out through shared memory (staged_chunk, kStageCol).
// The next tile's loads are issued before step 2, so they are in flight while it computes.
// The same kernel with kAmaxOnly computes the two absolute maxima that current scaling needs.
//
// The quantizing pass is bound by instruction issue, not by memory, so the inner loops are
// written for few instructions per element (see docs/benchmarks.md for the measurements):
// - E2M1 round-to-nearest-even takes three FFMAs and two or three FMNMXs (e2m1_rne_magic), and
//   the codes are packed with integer multiply-adds and byte permutes (pack8_rne); stochastic
//   rounding three FFMAs and three FADDs rounded upward, with no integer/float conversions
//   (e2m1_sr_magic, pack8_sr), and one Philox call per 16 elements (e2m1_pack.cuh);
// - the block scale is one hardware E4M3 conversion (for two blocks at once on the column side),
//   and the element encode scale a lookup in a table of its 127 possible values, which each
//   resident block computes once with the shared nvfp4_element_encode_scale;
// - the RHT signs cost nothing: they flip the float sign bit while the tile is unpacked.

constexpr int kTileRows = 64;
constexpr int kTileCols = 128;
constexpr int kRowColThreads = 128;
constexpr int kSegsPerRow = kTileCols / 16;                                   // 8
constexpr int kRowsPerPass = kRowColThreads / kSegsPerRow;                    // 16
constexpr int kRowIters = kTileRows / kRowsPerPass;                           // 4
constexpr int kColPairs = kTileCols / 2;                                      // 64
constexpr int kColBlocksPerThread = kTileRows / 16 / (kRowColThreads / kColPairs);  // 2
constexpr int kE4m3Codes = 128;  // E4M3 codes of non-negative finite values: 0 .. 0x7E (448)

// E4M3 codes of (hi, lo) in the high and low byte: round-to-nearest-even, saturating at 448.
// Equals E4M3::encode(min(v, 448), kNearestEven) for every non-negative non-NaN v (the block
// amaxes of a finite tensor), which is what nvfp4_block_scale_code computes.
#ifndef NIBBLE_ROWCOL_HOST_EMULATION
__device__ __forceinline__ uint32_t e4m3x2_rn_satfinite(float hi, float lo) {
  uint16_t d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
}
#endif

// One 1x16 block: packed codes of v * scale, elements 0-7 in .x. `amax` = max |v| (for RNE: the
// elements' |v * scale| are at most amax * scale, rounding being monotonic, so below 7 no code
// needs the saturation cap).
template <Rounding kRounding>
__device__ __forceinline__ uint2 encode16(const float v[16], float amax, float scale, const PhiloxKeys& seed_keys,
                                          uint32_t stream, uint64_t index0) {
  if constexpr (kRounding == Rounding::kNearestEven) {
    if (amax * scale < 7.0f) return make_uint2(pack8_rne<false>(v, scale), pack8_rne<false>(v + 8, scale));
    return make_uint2(pack8_rne<true>(v, scale), pack8_rne<true>(v + 8, scale));
  } else {
    // index0 is a multiple of 16: the block is one Philox group
    const Philox4x32 group = random_words(seed_keys, stream, index0 / kFp4ElementsPerGroup);
    return make_uint2(pack8_sr<0>(v, scale, group), pack8_sr<1>(v + 8, scale, group));
  }
}


// Shared-memory position of column c's float in a tile row. The row pass stores 16-byte chunks
// with 8 threads of a row at once (one per 16-column segment), whose chunks would share banks
// pairwise; rotating the 4 chunks of segment s by s/2 spreads them over all 32 banks. The column
// pass reads 8-byte pairs along a row, which stay conflict-free.
__device__ __forceinline__ int tile_col(int c) {
  const int s = c / 16, j = (c / 4) % 4;
  return s * 16 + ((j + s / 2) % 4) * 4 + c % 4;
}

// The columnwise copy's decoded BF16 values leave through shared memory, so that a warp's global
// stores fill whole 128-byte lines (a thread's own values are 32 bytes of each of two X^T rows, and
// storing them directly puts 32 rows into every store instruction). Once the tile's floats are read,
// its first 16 KiB hold the tile's 128 X^T rows of 64 BF16 (8 chunks of 16 bytes each); chunk j of
// row r sits at chunk j ^ ((r ^ r >> 3) % 8), which keeps both the writes (8 lanes: 8 even or 8 odd
// rows, one chunk column) and the reads (8 lanes: one row, all its chunks) free of bank conflicts.
__device__ __forceinline__ int staged_chunk(int r, int j) { return r * 8 + (j ^ ((r ^ (r >> 3)) & 7)); }

// Which thread encodes which column blocks. A thread takes two neighbouring columns and two 16-row
// blocks of each: 32 contiguous rows, 16 bytes of each of two X^T rows and 2 of their scale bytes.
// kPairLanes: the threads with the tile's rows 0-31 and 32-63 of the same columns are neighbouring
// lanes of one warp (pair t / 2, rows 32 (t % 2) on), so that one store instruction writes whole
// 32-byte sectors of X^T and whole 4-byte groups of its scales; otherwise (pair t % 64, rows
// 32 (t / 64) on) the two halves of every sector come from two warps, and the columnwise copy's
// stores take twice the L2 write requests (measured, 8192^2 BF16 on an H200: X pass 0.126 ->
// 0.105 ms, X with the decoded rows 0.180 -> 0.136 ms; docs/benchmarks.md, session 18). The
// kernels that write the decoded columns through shared memory (kStageCol) keep the second
// assignment: in training they write no packed columns, and the per-lane block index costs them
// registers (dY with decoded copies only, 0.167 -> 0.184 ms with pair lanes).
// With pair lanes a half-warp's 8-byte column reads cover 16 columns in rows of both halves, which
// would share banks; rows 32-63 hold the two 16-column halves of each 32-column group swapped, so
// that they land in the other 16 banks. tile_pos(h, c) is column c's position in a row of half h.
template <bool kPairLanes>
__device__ __forceinline__ int tile_pos(int h, int c) {
  return kPairLanes ? tile_col(c ^ (h << 4)) : tile_col(c);
}

// 16 elements of a row segment as float32, their sign bits XORed with `flip` (0 or 0x80000000).
__device__ __forceinline__ void unpack16(const Raw16<bf16_t>& r, uint32_t flip, float v[16]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t w[4] = {r.vec[i].x, r.vec[i].y, r.vec[i].z, r.vec[i].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[8 * i + 2 * j] = bits_float((w[j] << 16) + flip);  // + flip == ^ flip on bit 31
      v[8 * i + 2 * j + 1] = bits_float((w[j] & 0xFFFF0000u) ^ flip);
    }
  }
}
__device__ __forceinline__ void unpack16(const Raw16<float>& r, uint32_t flip, float v[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w[4] = {r.vec[i].x, r.vec[i].y, r.vec[i].z, r.vec[i].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) v[4 * i + j] = bits_float(w[j] ^ flip);
  }
}

// Per-tensor constants of one output copy.
struct SideScale {
  float k;     // S * (1/6): block amax -> E4M3 block scale
  bool ok;     // tensor amax finite (otherwise the copy is all zeros, decode scale NaN)
};

// Resident blocks per SM that the register allocation must allow, and whether a block loads its
// next tile while it works on the columns of this one (32 more registers with BF16 input, 64 with
// float). Chosen by measurement with BF16 input on an H200 (docs/benchmarks.md): round-to-nearest
// runs best with 5 blocks (96 registers) and, since the pair lanes (tile_pos), without the
// prefetch (below; 4 blocks with it: no faster); stochastic rounding, since its encoder has no
// conversions (2026-12-02), with 4 blocks (128 registers) and the prefetch: SR pass 0.247 -> 0.225
// ms and with both decoded copies 0.397 -> 0.328 ms against 6 blocks without it (5 blocks: 0.237 /
// 0.374). Float input (not measured) takes 4 blocks and no prefetch, which keeps its spills small.
template <Rounding kRowRounding, Rounding kColRounding>
constexpr bool kAnyStochastic = kRowRounding == Rounding::kStochastic || kColRounding == Rounding::kStochastic;
template <typename T, Rounding kRowRounding, Rounding kColRounding>
constexpr int kMinBlocksPerSm = sizeof(T) == 4 ? 4 : kAnyStochastic<kRowRounding, kColRounding> ? 4 : 5;
// The round-to-nearest quantizing kernels (the X pass) do better without it since the pair lanes:
// X with the decoded rows 0.136-0.137 -> 0.131-0.132 ms, the other lines unchanged (2026-12-04);
// the amax pass keeps it (0.044 -> 0.046 ms without).
template <typename T, bool kAmaxOnly, Rounding kRowRounding, Rounding kColRounding>
constexpr bool kPrefetchTile = sizeof(T) == 2 && (kAmaxOnly || kAnyStochastic<kRowRounding, kColRounding>);

// kStageCol: the columnwise copy's decoded values leave through shared memory (staged_chunk); a
// variant of its own, as the staging keeps the column codes in registers past a barrier, which the
// kernels that write no decoded columns cannot spare (they spill). stage_col_decode says which
// launches take it: BF16 input (the training step's) with decoded columns asked for; float input
// stores its decoded columns directly.
template <typename T>
bool stage_col_decode(const RowColSpec& spec, const QuantBuffers& col) {
  return sizeof(T) == 2 && spec.columnwise && col.decoded != nullptr;
}
// kFullTiles: every tile is whole (rows a multiple of 64, columns of 128: all of GPT-2's shapes), so
// the kernel carries no partial-tile checks (8192^2 BF16 on an H200, X pass: 0.103-0.106 -> 0.100-
// 0.104 ms; docs/benchmarks.md, session 19). BF16 input only (training's), to keep the float
// kernels at one copy each; and not for the rowwise copy alone, where the pass writing the decoded
// rows (a layer's Fprop outside training) measured slower without the checks (0.082-0.088 against
// 0.078-0.079 ms).
template <typename T>
bool full_tiles(const RowColSpec& spec, int64_t rows, int64_t cols) {
  return sizeof(T) == 2 && spec.columnwise && rows % kTileRows == 0 && cols % kTileCols == 0;
}
// RowColSpec::tail_decode, by a block after its tiles: rows blockIdx.x, + gridDim.x, ..., each a
// thread's 16-element block at a time, as the separate decode pass does (no divisions).
__device__ __forceinline__ void decode_tail(const TailDecode& d, int t) {
  const int64_t segs = d.cols / 16;
  for (int64_t r = blockIdx.x; r < d.rows; r += gridDim.x)
    for (int64_t seg = t; seg < segs; seg += kRowColThreads) {
      const int64_t i0 = r * d.cols + seg * 16;
      store_decoded16(d.out + i0, *reinterpret_cast<const uint2*>(d.data + i0 / 2),
                      d.scales[(d.tiles16 ? r / 16 : r) * segs + seg]);
    }
}

template <typename T, bool kAmaxOnly, Rounding kRowRounding, Rounding kColRounding, bool kRht, bool kStageCol = false,
          bool kFullTiles = false>
__global__ void __launch_bounds__(kRowColThreads, (kMinBlocksPerSm<T, kRowRounding, kColRounding>))
    nvfp4_rowcol_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, RowColSpec spec,
                        AmaxSlots amax_out, const uint32_t* __restrict__ amax_in, QuantBuffers row,
                        QuantBuffers col) {
  __shared__ __align__(16) float tile[kTileRows][kTileCols];
  __shared__ float enc_scale[2][kE4m3Codes];  // element encode scale e_b by E4M3 code: row, col
  const int t = threadIdx.x;
  // Tile indices in 32 bits (launch_rowcol checks that they fit): a 64-bit division per tile is
  // dozens of instructions.
  const uint32_t tiles_x = static_cast<uint32_t>((cols + kTileCols - 1) / kTileCols);
  const uint32_t tiles = tiles_x * static_cast<uint32_t>((rows + kTileRows - 1) / kTileRows);

  SideScale rs{}, cs{};
  // The seed's Philox round keys, once per thread (uniform across the grid) rather than per call.
  const PhiloxKeys seed_keys = philox_round_keys(spec.seed);
  if constexpr (!kAmaxOnly) {
    rs.ok = amax_is_finite(amax_in[0]);
    cs.ok = amax_is_finite(amax_in[1]);
    const TensorScale row_ts = nvfp4_tensor_scale(bits_float(amax_in[0]));
    const TensorScale col_ts = nvfp4_tensor_scale(bits_float(amax_in[1]));
    rs.k = row_ts.encode * (1.0f / kE2M1Max);  // the float ops of nvfp4_block_scale_code
    cs.k = col_ts.encode * (1.0f / kE2M1Max);
    for (int i = t; i < 2 * kE4m3Codes; i += kRowColThreads) {
      const int code = i % kE4m3Codes;
      enc_scale[i / kE4m3Codes][code] =
          nvfp4_element_encode_scale(static_cast<uint8_t>(code), i < kE4m3Codes ? row_ts.decode : col_ts.decode);
    }
    if (blockIdx.x == 0 && t == 0) {
      const float row_decode = rs.ok ? row_ts.decode : __int_as_float(0x7FC00000);
      const float col_decode = cs.ok ? col_ts.decode : __int_as_float(0x7FC00000);
      if (spec.rowwise) *row.decode_scale = row_decode;
      if (spec.columnwise) *col.decode_scale = col_decode;
      if (spec.rowwise && row.alpha != nullptr) *row.alpha = row_decode * *row.alpha_partner;
      if (spec.columnwise && col.alpha != nullptr) *col.alpha = col_decode * *col.alpha_partner;
    }
    __syncthreads();
  }

  // The columnwise pass needs the tile in shared memory (the amax pass only when the RHT is on).
  const bool stage_tile = spec.columnwise && (!kAmaxOnly || kRht);
  const bool encode_rows = !kAmaxOnly && spec.rowwise;
  const int seg = t % kSegsPerRow;
  // RHT: row lr of the tile takes sign (lr % 16) of the vector; this thread's rows all have
  // lr % 16 == t / kSegsPerRow. Flipping the sign bit is the multiplication by -1 of rht16, and the
  // rowwise copy encodes the flipped values and flips its sign bits back (both E2M1 encoders,
  // RNE and SR, treat the sign separately from the magnitude).
  const uint32_t flip = kRht && stage_tile && ((spec.rht_signs.negative_mask >> (t / kSegsPerRow)) & 1u)
                            ? 0x80000000u : 0u;
  const uint32_t code_flip = flip ? 0x88888888u : 0u;
  constexpr bool kPairLanes = !kStageCol;  // which thread takes which column blocks: see tile_pos
  static_assert(kRowColThreads == 2 * kColPairs && kTileRows == 64, "two threads a column pair, 32 rows each");
  const int pair = kPairLanes ? t / 2 : t % kColPairs;
  const int first_block = (kPairLanes ? t % 2 : t / kColPairs) * kColBlocksPerThread;
  const int tcol = tile_pos<kPairLanes>(first_block / 2, 2 * pair);
  // Position in its tile row of chunk j (4 floats) of this thread's row segment i, whose row lr has
  // the half lr / 32 = i * kRowsPerPass / 32 (t / kSegsPerRow < kRowsPerPass): known at compile time
  // in an unrolled loop.
  const auto segment_chunk = [&](int i, int j) {
    return tile_pos<kPairLanes>(i * kRowsPerPass / 32, seg * 16 + 4 * j);
  };
  float row_amax = 0.0f, col_amax = 0.0f;  // kAmaxOnly; col_amax before the RHT's 1/4

  Raw16<T> raw[kRowIters];
  // The quantizing pass walks the tiles from the last one back: the amax pass before it read them
  // first to last, so the end of a tensor larger than the L2 cache is still there when it starts.
  const auto tile_at = [&](uint32_t step) { return kAmaxOnly ? step : tiles - 1 - step; };
  const auto load_tile = [&](uint32_t step) {
    const uint32_t tile_index = tile_at(step);
    const int64_t r0 = static_cast<int64_t>(tile_index / tiles_x) * kTileRows;
    const int64_t c0 = static_cast<int64_t>(tile_index % tiles_x) * kTileCols;
#pragma unroll
    for (int i = 0; i < kRowIters; ++i) {
      const int64_t r = r0 + t / kSegsPerRow + i * kRowsPerPass, c = c0 + seg * 16;
      if (kFullTiles || (r < rows && c < cols)) raw[i] = load_raw16(x + r * cols + c);
    }
  };
  constexpr bool kPrefetch = kPrefetchTile<T, kAmaxOnly, kRowRounding, kColRounding>;
  if (kPrefetch && blockIdx.x < tiles) load_tile(blockIdx.x);

  for (uint32_t step = blockIdx.x; step < tiles; step += gridDim.x) {
    if (!kPrefetch) load_tile(step);
    const uint32_t tile_index = tile_at(step);
    const int64_t r0 = static_cast<int64_t>(tile_index / tiles_x) * kTileRows;
    const int64_t c0 = static_cast<int64_t>(tile_index % tiles_x) * kTileCols;
    const int tile_rows = kFullTiles || rows - r0 >= kTileRows ? kTileRows : static_cast<int>(rows - r0);
    const int tile_cols = kFullTiles || cols - c0 >= kTileCols ? kTileCols : static_cast<int>(cols - c0);
    const bool seg_ok = seg * 16 < tile_cols;

    // One row segment's rowwise copy: codes, scale, and the decoded values where asked for.
    const auto encode_row_segment = [&](int lr, const float* v) {
      const uint64_t gi = static_cast<uint64_t>(r0 + lr) * static_cast<uint64_t>(cols) + c0 + seg * 16;
      uint2 packed = make_uint2(0, 0);
      uint32_t code = 0;
      if (rs.ok) {
        const float amax = max_abs_finite<16>(v);
        code = e4m3x2_rn_satfinite(amax * rs.k, amax * rs.k) & 0xFFu;
        packed = encode16<kRowRounding>(v, amax, enc_scale[0][code], seed_keys, spec.row_stream, gi);
        packed.x ^= code_flip;
        packed.y ^= code_flip;
      }
      if (row.data != nullptr) {  // nullptr: only the decoded values (QuantBuffers::data)
        *reinterpret_cast<uint2*>(row.data + gi / 2) = packed;
        row.scales[gi / 16] = static_cast<uint8_t>(code);
      }
      // Decoded from the codes as stored (sign flips of the RHT trick undone), zeros when !rs.ok.
      if (row.decoded != nullptr) store_decoded16(row.decoded + gi, packed, code);
    };

    // ---- rows: one 16-element segment per step, from registers. With stochastic rounding, where
    // the tile is staged for the columns, the rows are encoded after it, from shared memory, in a
    // loop that is not unrolled: the encoders and their Philox calls are most of the kernel's code,
    // and one copy of them in place of kRowIters keeps the hot loop within the instruction cache
    // (measured: dY pass 0.262 -> 0.244 ms; the round-to-nearest X pass is faster unrolled).
    constexpr bool kRowsFromTile = kRowRounding == Rounding::kStochastic;
#pragma unroll
    for (int i = 0; i < kRowIters; ++i) {
      const int lr = t / kSegsPerRow + i * kRowsPerPass;
      if (lr >= tile_rows || !seg_ok) continue;
      float v[16];
      unpack16(raw[i], flip, v);
      if (stage_tile) {
        float* dst = &tile[lr][0];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          *reinterpret_cast<float4*>(dst + segment_chunk(i, j)) =
              make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
      }
      if constexpr (kAmaxOnly) {
        row_amax = max_abs_nan<16>(row_amax, v);
      } else if (encode_rows && !(kRowsFromTile && stage_tile)) {
        encode_row_segment(lr, v);
      }
    }

    // The registers of this tile are consumed: start loading the next one.
    if (kPrefetch && step + gridDim.x < tiles) load_tile(step + gridDim.x);
    if (!stage_tile) continue;
    __syncthreads();
    if (kRowsFromTile && encode_rows) {
#pragma unroll 1
      for (int i = 0; i < kRowIters; ++i) {
        const int lr = t / kSegsPerRow + i * kRowsPerPass;
        if (lr >= tile_rows || !seg_ok) continue;
        float v[16];
        const float* src = &tile[lr][0];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float4 w = *reinterpret_cast<const float4*>(src + segment_chunk(i, j));
          v[4 * j] = w.x, v[4 * j + 1] = w.y, v[4 * j + 2] = w.z, v[4 * j + 3] = w.w;
        }
        encode_row_segment(lr, v);
      }
    }

    // ---- columns: two neighbouring columns, blocks of 16 rows
    uint2 packed[2][kColBlocksPerThread];  // [column][block], set where 2 * pair < tile_cols
    uint32_t codes[kColBlocksPerThread] = {};  // E4M3 codes of both columns (low byte: column 2*pair)
    if (2 * pair < tile_cols) {
      // X^T index of this thread's first element in column 2*pair; column 2*pair + 1 is `rows` later.
      const uint64_t q0 = static_cast<uint64_t>(c0 + 2 * pair) * static_cast<uint64_t>(rows) +
                          static_cast<uint64_t>(r0 + first_block * 16);
      // With stochastic rounding the block loop runs rolled: one copy of the encoders and their
      // Philox calls per column instead of one per block, which keeps the per-tile loop closer to
      // the instruction cache's size. (Rolled, the round-to-nearest kernels spill at 96 registers.)
      static_assert(kColBlocksPerThread == 2, "the loop below keeps two blocks in registers");
      [[maybe_unused]] constexpr int kColUnroll = kColRounding == Rounding::kStochastic ? 1 : kColBlocksPerThread;
#pragma unroll kColUnroll
      for (int bi = 0; bi < kColBlocksPerThread; ++bi) {
        const int b = first_block + bi;
        uint2 pa = make_uint2(0, 0), pb = make_uint2(0, 0);
        uint32_t code = 0;
        if (b * 16 < tile_rows) {
          float va[16], vb[16];  // columns 2*pair and 2*pair + 1
#pragma unroll
          for (int k = 0; k < 16; ++k) {
            const float2 w = *reinterpret_cast<const float2*>(&tile[b * 16 + k][tcol]);
            va[k] = w.x;
            vb[k] = w.y;
          }
          if constexpr (kRht) {
            rht16_butterfly<!kAmaxOnly>(va);
            rht16_butterfly<!kAmaxOnly>(vb);
          }
          if constexpr (kAmaxOnly) {
            col_amax = max_abs_nan<16>(max_abs_nan<16>(col_amax, va), vb);
          } else if (cs.ok) {
            const float amax_a = max_abs_finite<16>(va), amax_b = max_abs_finite<16>(vb);
            code = e4m3x2_rn_satfinite(amax_b * cs.k, amax_a * cs.k);
            const uint64_t qi = q0 + static_cast<uint64_t>(bi * 16);
            pa = encode16<kColRounding>(va, amax_a, enc_scale[1][code & 0xFFu], seed_keys, spec.col_stream, qi);
            pb = encode16<kColRounding>(vb, amax_b, enc_scale[1][code >> 8], seed_keys, spec.col_stream,
                                        qi + static_cast<uint64_t>(rows));
          }
        }
        if (bi == 0) {
          packed[0][0] = pa, packed[1][0] = pb, codes[0] = code;
        } else {
          packed[0][1] = pa, packed[1][1] = pb, codes[1] = code;
        }
      }
      if (!kAmaxOnly && first_block * 16 < tile_rows) {
        // A column's two blocks are 16 contiguous bytes of X^T (and 2 of its scales): one store each
        // where they are aligned, which they are when rows % 32 == 0 (q0 is then a multiple of 32).
        const bool both = (first_block + 1) * 16 < tile_rows;
#pragma unroll
        for (int side = 0; side < 2; ++side) {
          const uint64_t q = q0 + side * static_cast<uint64_t>(rows);
          uint8_t* data = col.data + q / 2;
          uint8_t* scales = col.scales + q / 16;
          const uint32_t c0s = (codes[0] >> (8 * side)) & 0xFFu, c1s = (codes[1] >> (8 * side)) & 0xFFu;
          if (col.data == nullptr) {  // only the decoded values (QuantBuffers::data)
          } else if (both && (kFullTiles || rows % 32 == 0)) {
            *reinterpret_cast<uint4*>(data) =
                make_uint4(packed[side][0].x, packed[side][0].y, packed[side][1].x, packed[side][1].y);
            *reinterpret_cast<uint16_t*>(scales) = static_cast<uint16_t>(c0s | c1s << 8);
          } else {
            *reinterpret_cast<uint2*>(data) = packed[side][0];
            scales[0] = static_cast<uint8_t>(c0s);
            if (both) {
              *reinterpret_cast<uint2*>(data + 8) = packed[side][1];
              scales[1] = static_cast<uint8_t>(c1s);
            }
          }
          if (!kStageCol && col.decoded != nullptr) {  // q is a multiple of 16: 32-byte aligned blocks
            store_decoded16(col.decoded + q, packed[side][0], c0s);
            if (both) store_decoded16(col.decoded + q + 16, packed[side][1], c1s);
          }
        }
      }
    }
    if (kStageCol && col.decoded != nullptr) {
      __syncthreads();  // every thread has read its columns out of the tile
      uint4* stage = reinterpret_cast<uint4*>(&tile[0][0]);
      if (2 * pair < tile_cols) {
#pragma unroll
        for (int side = 0; side < 2; ++side)
#pragma unroll
          for (int bi = 0; bi < kColBlocksPerThread; ++bi) {
            const int r = 2 * pair + side, j = 2 * (first_block + bi);
            decode16_bf16(packed[side][bi], (codes[bi] >> (8 * side)) & 0xFFu, stage[staged_chunk(r, j)],
                          stage[staged_chunk(r, j + 1)]);
          }
      }
      __syncthreads();
      // Thread t copies chunk j = t % 8 of the tile's X^T rows t / 8 + 16 k: X^T row c0 + r, elements
      // r0 + 8 j .. + 7, 16-byte aligned as rows % 16 == 0. The address steps by 16 rows.
      constexpr int kCopyRows = kRowColThreads / 8;
      const int j = t % 8, r_first = t / 8;
      const uint64_t step = kCopyRows * static_cast<uint64_t>(rows);
      uint16_t* dst = col.decoded + static_cast<uint64_t>(c0 + r_first) * static_cast<uint64_t>(rows) +
                      static_cast<uint64_t>(r0 + 8 * j);
#pragma unroll
      for (int k = 0; k < kTileCols / kCopyRows; ++k, dst += step) {
        const int r = r_first + kCopyRows * k;
        if (r < tile_cols && 8 * j < tile_rows) *reinterpret_cast<uint4*>(dst) = stage[staged_chunk(r, j)];
      }
    }
    __syncthreads();  // the tile's shared memory is overwritten next iteration
  }

  if constexpr (kAmaxOnly) {
    finish_amax(row_amax, col_amax, amax_out, kRht, spec.columnwise);
  } else if (spec.tail_decode.out != nullptr) {
    decode_tail(spec.tail_decode, t);
  }
}

}  // namespace
}  // namespace nibble::cuda
