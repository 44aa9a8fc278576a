// CUDA quantizers; see quantize_cuda.h. The per-element and per-block math is the shared code of
// scaling.h / minifloat.h / rht.h / philox.h, so each kernel computes the CPU reference's bits.
#include "nibble/quant/cuda/quantize_cuda.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "nibble/quant/fp4_decode_bf16.h"
#include "nibble/quant/cuda/e2m1_pack.cuh"
#include "nibble/quant/cuda/tile16_layout.h"
#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"
#include "nibble/quant/rht.h"
#include "nibble/quant/scaling.h"

namespace nibble::cuda {

namespace {

void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + ": " +
                             cudaGetErrorString(e));
}
#define NIBBLE_CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)

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
// quantized matrix; it is a multiple of 16, so the Philox groups line up with the CPU's.
template <int kN, Rounding kRounding>
__device__ __forceinline__ void encode_fp4(const float* v, float scale, uint64_t seed, uint32_t stream,
                                           uint64_t index0, uint32_t* packed) {
#pragma unroll
  for (int w = 0; w < kN / 8; ++w) packed[w] = 0;
#pragma unroll
  for (int g = 0; g < kN / 8; ++g) {
    Philox4x32 bits{{0, 0, 0, 0}};
    if constexpr (kRounding == Rounding::kStochastic) bits = random_words(seed, stream, (index0 >> 3) + g);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t code = fp4_encode_element(v[8 * g + j], scale, kRounding, fp4_random_word(bits, j));
      packed[g] |= code << (4 * j);
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

// Max over the thread block, then atomicMax into *out. Called by all threads of the block.
__device__ __forceinline__ void block_max_to_global(uint32_t v, uint32_t* out) {
  __shared__ uint32_t warp_max[32];
  __syncthreads();  // warp_max may still be read by an earlier call
  v = __reduce_max_sync(0xFFFFFFFFu, v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) / 32;
    uint32_t m = lane < nwarps ? warp_max[lane] : 0;
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    if (lane == 0 && m != 0) atomicMax(out, m);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused NVFP4 rowwise + columnwise (+ RHT) pass over 64 x 128 tiles, persistent grid.
//
// Per tile, each thread block
//   1. loads the tile with 16-byte loads (every thread's loads in flight before it uses one),
//      quantizes 16-element row segments as rowwise 1x16 blocks straight from registers, and
//      parks the values as float32 in shared memory (the RHT signs already applied, see below);
//   2. reads the tile back by columns (two neighbouring columns per 8-byte load), applies the RHT
//      butterfly if asked, and quantizes 16-row column blocks into the columnwise copy.
// The next tile's loads are issued before step 2, so they are in flight while it computes.
// The same kernel with kAmaxOnly computes the two absolute maxima that current scaling needs.
//
// The quantizing pass is bound by instruction issue, not by memory, so the inner loops are
// written for few instructions per element (see docs/benchmarks.md for the measurements):
// - E2M1 round-to-nearest-even takes three FFMAs and two or three FMNMXs (e2m1_rne_magic), and
//   the codes are packed with integer multiply-adds and byte permutes (pack8_rne); stochastic
//   rounding three FFMAs and three FADDs rounded upward, with no integer/float conversions
//   (e2m1_sr_magic, pack8_sr), and one Philox call per 8 elements (e2m1_pack.cuh);
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
__device__ __forceinline__ uint32_t e4m3x2_rn_satfinite(float hi, float lo) {
  uint16_t d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
}

// One 1x16 block: packed codes of v * scale, elements 0-7 in .x. `amax` = max |v| (for RNE: the
// elements' |v * scale| are at most amax * scale, rounding being monotonic, so below 7 no code
// needs the saturation cap).
template <Rounding kRounding>
__device__ __forceinline__ uint2 encode16(const float v[16], float amax, float scale, uint64_t seed,
                                          uint32_t stream, uint64_t index0) {
  if constexpr (kRounding == Rounding::kNearestEven) {
    if (amax * scale < 7.0f) return make_uint2(pack8_rne<false>(v, scale), pack8_rne<false>(v + 8, scale));
    return make_uint2(pack8_rne<true>(v, scale), pack8_rne<true>(v + 8, scale));
  } else {
    const uint64_t group = index0 >> 3;  // index0 is a multiple of 16: two whole Philox groups
    return make_uint2(pack8_sr(v, scale, random_words(seed, stream, group)),
                      pack8_sr(v + 8, scale, random_words(seed, stream, group + 1)));
  }
}

// rht16 (rht.h) without its first step, the multiplication by the signs, which the fused pass
// applies while staging the tile: the same float32 operations in the same order.
__device__ __forceinline__ void rht16_butterfly(float v[16]) {
#pragma unroll
  for (int stage = 0; stage < 4; ++stage) {
    const int h = 1 << stage;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int j = (k / h) * 2 * h + k % h;
      const float a = v[j], b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] *= 0.25f;
}

// Shared-memory position of column c's float in a tile row. The row pass stores 16-byte chunks
// with 8 threads of a row at once (one per 16-column segment), whose chunks would share banks
// pairwise; rotating the 4 chunks of segment s by s/2 spreads them over all 32 banks. The column
// pass reads 8-byte pairs along a row, which stay conflict-free.
__device__ __forceinline__ int tile_col(int c) {
  const int s = c / 16, j = (c / 4) % 4;
  return s * 16 + ((j + s / 2) % 4) * 4 + c % 4;
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

// The BF16 decode of one 1x16 block (QuantBuffers::decoded) from the block's final packed codes
// (elements 0-7 in .x) and E4M3 scale code: two 16-byte stores to dst, which is 32-byte aligned.
// About 2.5 instructions per element (fp4_decode_bf16.h), from registers the encoder has just filled.
__device__ __forceinline__ void store_decoded16(uint16_t* dst, uint2 packed, uint32_t scale_code) {
  const uint32_t scale2 = e4m3_scale_bf16x2(scale_code);
  uint32_t lo[4], hi[4];
  decode8_bf16(packed.x, scale2, lo);
  decode8_bf16(packed.y, scale2, hi);
  uint4* d = reinterpret_cast<uint4*>(dst);
  d[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  d[1] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}

// Per-tensor constants of one output copy.
struct SideScale {
  float k;     // S * (1/6): block amax -> E4M3 block scale
  bool ok;     // tensor amax finite (otherwise the copy is all zeros, decode scale NaN)
};

// Resident blocks per SM that the register allocation must allow, and whether a block loads its
// next tile while it works on the columns of this one (32 more registers with BF16 input, 64 with
// float). Chosen by measurement with BF16 input on an H200 (docs/benchmarks.md): round-to-nearest
// runs best with 5 blocks (96 registers, no spills) and the prefetch (2026-11-23); stochastic
// rounding, since its encoder has no conversions (2026-12-02), with 4 blocks (128 registers) and
// the prefetch: SR pass 0.247 -> 0.225 ms and with both decoded copies 0.397 -> 0.328 ms against
// 6 blocks without it (5 blocks: 0.237 / 0.374). Float input (not measured) takes 4 blocks and no
// prefetch, which keeps its spills small.
template <Rounding kRowRounding, Rounding kColRounding>
constexpr bool kAnyStochastic = kRowRounding == Rounding::kStochastic || kColRounding == Rounding::kStochastic;
template <typename T, Rounding kRowRounding, Rounding kColRounding>
constexpr int kMinBlocksPerSm = sizeof(T) == 4 ? 4 : kAnyStochastic<kRowRounding, kColRounding> ? 4 : 5;
template <typename T>
constexpr bool kPrefetchTile = sizeof(T) == 2;

template <typename T, bool kAmaxOnly, Rounding kRowRounding, Rounding kColRounding, bool kRht>
__global__ void __launch_bounds__(kRowColThreads, (kMinBlocksPerSm<T, kRowRounding, kColRounding>))
    nvfp4_rowcol_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, RowColSpec spec,
                        uint32_t* __restrict__ amax_out, const uint32_t* __restrict__ amax_in, QuantBuffers row,
                        QuantBuffers col) {
  __shared__ __align__(16) float tile[kTileRows][kTileCols];
  __shared__ float enc_scale[2][kE4m3Codes];  // element encode scale e_b by E4M3 code: row, col
  const int t = threadIdx.x;
  const int64_t tiles_x = (cols + kTileCols - 1) / kTileCols;
  const int64_t tiles = tiles_x * ((rows + kTileRows - 1) / kTileRows);

  SideScale rs{}, cs{};
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
      if (spec.rowwise) *row.decode_scale = rs.ok ? row_ts.decode : __int_as_float(0x7FC00000);
      if (spec.columnwise) *col.decode_scale = cs.ok ? col_ts.decode : __int_as_float(0x7FC00000);
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
  const int pair = t % kColPairs;
  const int first_block = (t / kColPairs) * kColBlocksPerThread;
  const int tcol = tile_col(2 * pair);
  uint32_t row_amax = 0, col_amax = 0;

  Raw16<T> raw[kRowIters];
  const auto load_tile = [&](int64_t tile_index) {
    const int64_t r0 = (tile_index / tiles_x) * kTileRows, c0 = (tile_index % tiles_x) * kTileCols;
#pragma unroll
    for (int i = 0; i < kRowIters; ++i) {
      const int64_t r = r0 + t / kSegsPerRow + i * kRowsPerPass, c = c0 + seg * 16;
      if (r < rows && c < cols) raw[i] = load_raw16(x + r * cols + c);
    }
  };
  constexpr bool kPrefetch = kPrefetchTile<T>;
  if (kPrefetch && blockIdx.x < tiles) load_tile(blockIdx.x);

  for (int64_t tile_index = blockIdx.x; tile_index < tiles; tile_index += gridDim.x) {
    if (!kPrefetch) load_tile(tile_index);
    const int64_t r0 = (tile_index / tiles_x) * kTileRows, c0 = (tile_index % tiles_x) * kTileCols;
    const int tile_rows = rows - r0 < kTileRows ? static_cast<int>(rows - r0) : kTileRows;
    const int tile_cols = cols - c0 < kTileCols ? static_cast<int>(cols - c0) : kTileCols;
    const bool seg_ok = seg * 16 < tile_cols;

    // ---- rows: one 16-element segment per step
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
          *reinterpret_cast<float4*>(dst + tile_col(seg * 16 + 4 * j)) =
              make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
      }
      if constexpr (kAmaxOnly) {
        row_amax = max(row_amax, max_abs_bits<16>(v));
      } else if (encode_rows) {
        const uint64_t gi = static_cast<uint64_t>(r0 + lr) * static_cast<uint64_t>(cols) + c0 + seg * 16;
        uint2 packed = make_uint2(0, 0);
        uint32_t code = 0;
        if (rs.ok) {
          const float amax = max_abs_finite<16>(v);
          code = e4m3x2_rn_satfinite(amax * rs.k, amax * rs.k) & 0xFFu;
          packed = encode16<kRowRounding>(v, amax, enc_scale[0][code], spec.seed, spec.row_stream, gi);
          packed.x ^= code_flip;
          packed.y ^= code_flip;
        }
        *reinterpret_cast<uint2*>(row.data + gi / 2) = packed;
        row.scales[gi / 16] = static_cast<uint8_t>(code);
        // Decoded from the codes as stored (sign flips of the RHT trick undone), zeros when !rs.ok.
        if (row.decoded != nullptr) store_decoded16(row.decoded + gi, packed, code);
      }
    }

    // The registers of this tile are consumed: start loading the next one.
    if (kPrefetch && tile_index + gridDim.x < tiles) load_tile(tile_index + gridDim.x);
    if (!stage_tile) continue;
    __syncthreads();

    // ---- columns: two neighbouring columns, blocks of 16 rows
    if (2 * pair < tile_cols) {
      // X^T index of this thread's first element in column 2*pair; column 2*pair + 1 is `rows` later.
      const uint64_t q0 = static_cast<uint64_t>(c0 + 2 * pair) * static_cast<uint64_t>(rows) +
                          static_cast<uint64_t>(r0 + first_block * 16);
      uint2 packed[2][kColBlocksPerThread];  // [column][block]
      uint32_t codes[kColBlocksPerThread];   // E4M3 codes of both columns (low byte: column 2*pair)
#pragma unroll
      for (int bi = 0; bi < kColBlocksPerThread; ++bi) {
        const int b = first_block + bi;
        packed[0][bi] = packed[1][bi] = make_uint2(0, 0);
        codes[bi] = 0;
        if (b * 16 < tile_rows) {
          float va[16], vb[16];  // columns 2*pair and 2*pair + 1
#pragma unroll
          for (int k = 0; k < 16; ++k) {
            const float2 w = *reinterpret_cast<const float2*>(&tile[b * 16 + k][tcol]);
            va[k] = w.x;
            vb[k] = w.y;
          }
          if constexpr (kRht) {
            rht16_butterfly(va);
            rht16_butterfly(vb);
          }
          if constexpr (kAmaxOnly) {
            col_amax = max(col_amax, max(max_abs_bits<16>(va), max_abs_bits<16>(vb)));
          } else if (cs.ok) {
            const float amax_a = max_abs_finite<16>(va), amax_b = max_abs_finite<16>(vb);
            codes[bi] = e4m3x2_rn_satfinite(amax_b * cs.k, amax_a * cs.k);
            const uint64_t qi = q0 + bi * 16;
            packed[0][bi] = encode16<kColRounding>(va, amax_a, enc_scale[1][codes[bi] & 0xFFu], spec.seed,
                                                   spec.col_stream, qi);
            packed[1][bi] = encode16<kColRounding>(vb, amax_b, enc_scale[1][codes[bi] >> 8], spec.seed,
                                                   spec.col_stream, qi + static_cast<uint64_t>(rows));
          }
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
          if (both && rows % 32 == 0) {
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
          if (col.decoded != nullptr) {  // q is a multiple of 16: the blocks' 32-byte rows are aligned
            store_decoded16(col.decoded + q, packed[side][0], c0s);
            if (both) store_decoded16(col.decoded + q + 16, packed[side][1], c1s);
          }
        }
      }
    }
    __syncthreads();  // the tile's shared memory is overwritten next iteration
  }

  if constexpr (kAmaxOnly) {
    block_max_to_global(row_amax, amax_out);
    if constexpr (kRht) block_max_to_global(col_amax, amax_out + 1);
  }
}

// ---------------------------------------------------------------------------------------------
// NVFP4 16x16 tiles, round-to-nearest-even (the paper's weights): W and, in the same pass, W^T.
//
// Each warp quantizes 32 x 64 warp tiles of W (layout in tile16_layout.h): it loads them with
// whole-row 16-byte loads, reduces each tile's amax over the 8 lanes that hold the tile, encodes
// every element once (its 8 codes per word are W's packed output as they stand), and transposes
// the words as 16 x 16 nibble matrices for W^T: the same codes, since a tile of W^T has the tile's
// scale and values. No shared memory but the encode-scale table and no block barriers in the
// loop; grid-stride over warp tiles (persistent grid), so each block builds the table once.
// The tile scale is the shared nvfp4_block_scale_code, the element encode scale the shared
// nvfp4_element_encode_scale (looked up by code), the elements pack8_rne as in the fused pass.

constexpr int kTile16Threads = 128;
constexpr int kTile16Warps = kTile16Threads / 32;

// 8 elements of one word: one 16-byte vector of BF16, two of float.
template <typename T>
struct Raw8 {
  static constexpr int kVecs = 8 * sizeof(T) / 16;
  uint4 vec[kVecs];
};

__device__ __forceinline__ void unpack8(const Raw8<bf16_t>& r, float v[8]) {
  const uint32_t w[4] = {r.vec[0].x, r.vec[0].y, r.vec[0].z, r.vec[0].w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = bits_float(w[j] << 16);
    v[2 * j + 1] = bits_float(w[j] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float v[8]) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    v[4 * q] = bits_float(r.vec[q].x);
    v[4 * q + 1] = bits_float(r.vec[q].y);
    v[4 * q + 2] = bits_float(r.vec[q].z);
    v[4 * q + 3] = bits_float(r.vec[q].w);
  }
}

// max |v| over the 8 elements of a word, for a finite tensor. BF16: the 16-bit halves compared as
// unsigned integers with their sign bits cleared (the order of the values, for non-NaN), which
// needs neither the float values nor a float max per element.
__device__ __forceinline__ float max_abs8(const Raw8<bf16_t>& r) {
  const uint32_t w[4] = {r.vec[0].x, r.vec[0].y, r.vec[0].z, r.vec[0].w};
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) m = __vmaxu2(m, w[j] & 0x7FFF7FFFu);
  return fmaxf(bits_float(m << 16), bits_float(m & 0xFFFF0000u));
}
__device__ __forceinline__ float max_abs8(const Raw8<float>& r) {
  float v[8];
  unpack8(r, v);
  return max_abs_finite<8>(v);
}

// Resident blocks per SM the register allocation must allow: 20 warps for BF16 input (96
// registers), 16 for float, whose 8 words in flight take 64 registers (128): enough loads in
// flight either way to cover the memory latency.
template <typename T>
constexpr int kTile16MinBlocks = sizeof(T) == 2 ? 5 : 4;

// w_out: W's codes and tile scales (rows/16 x cols/16); t_out: W^T's (cols/16 x rows/16). A side
// whose data pointer is null is not written. amax_in: max |x| bits of the whole tensor.
template <typename T>
__global__ void __launch_bounds__(kTile16Threads, kTile16MinBlocks<T>)
    nvfp4_tile16_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, const uint32_t* __restrict__ amax_in,
                        QuantBuffers w_out, QuantBuffers t_out) {
  __shared__ float enc_scale[kE4m3Codes];  // element encode scale e_b by E4M3 code
  const uint32_t amax_bits = *amax_in;
  const bool finite = amax_is_finite(amax_bits);
  const TensorScale ts = nvfp4_tensor_scale(bits_float(amax_bits));
  for (int c = threadIdx.x; c < kE4m3Codes; c += kTile16Threads)
    enc_scale[c] = nvfp4_element_encode_scale(static_cast<uint8_t>(c), ts.decode);
  const bool rowwise = w_out.data != nullptr, colwise = t_out.data != nullptr;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const float g = finite ? ts.decode : __int_as_float(0x7FC00000);
    if (rowwise) *w_out.decode_scale = g;
    if (colwise) *t_out.decode_scale = g;
  }
  __syncthreads();

  constexpr uint32_t kAll = 0xFFFFFFFFu;
  const int lane = threadIdx.x % 32;
  const int tc = tile16::tile_col(lane);
  const int64_t scale_cols = cols / 16, t_scale_cols = rows / 16;
  const int64_t count = tile16::warp_tiles(rows, cols);
  // Warp-uniform loop (every lane of a warp takes the same trips), so the shuffles see full warps.
  for (int64_t wt = static_cast<int64_t>(blockIdx.x) * kTile16Warps + threadIdx.x / 32; wt < count;
       wt += static_cast<int64_t>(gridDim.x) * kTile16Warps) {
    const tile16::WarpTile t = tile16::warp_tile(wt, cols);
    const bool col_ok = t.c0 + tile16::word_col(lane) < cols;  // this lane's tile column exists
    const bool row1_ok = t.r0 + 16 < rows;                     // tile row 1 exists (row 0 always)

    Raw8<T> raw[tile16::kWords];
#pragma unroll
    for (int i = 0; i < tile16::kWords; ++i) {
      const bool ok = finite && col_ok && (tile16::tile_row(i) == 0 || row1_ok);
      const T* p = x + (t.r0 + tile16::word_row(lane, i)) * cols + t.c0 + tile16::word_col(lane);
#pragma unroll
      for (int q = 0; q < Raw8<T>::kVecs; ++q)
        raw[i].vec[q] = ok ? __ldg(reinterpret_cast<const uint4*>(p) + q) : make_uint4(0, 0, 0, 0);
    }

    // Tile amaxes (finite tensor: float max of |v|), over the lane's words, then its tile's lanes.
    float amax[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < tile16::kWords; ++i) {
      const int tr = tile16::tile_row(i);
      amax[tr] = fmaxf(amax[tr], max_abs8(raw[i]));
    }
#pragma unroll
    for (int k = 0; k < tile16::kTileLanesLog2; ++k) {
      amax[0] = fmaxf(amax[0], __shfl_xor_sync(kAll, amax[0], tile16::tile_lane_mask(k)));
      amax[1] = fmaxf(amax[1], __shfl_xor_sync(kAll, amax[1], tile16::tile_lane_mask(k)));
    }
    // Each lane encodes one of its two tile scales and trades it with lane ^ 8 (same tiles).
    const bool odd = (lane & 8) != 0;
    const uint32_t own = finite ? nvfp4_block_scale_code(odd ? amax[1] : amax[0], ts.encode) : 0u;
    const uint32_t other = __shfl_xor_sync(kAll, own, 8);
    const uint32_t code[2] = {odd ? other : own, odd ? own : other};
    const float e[2] = {enc_scale[code[0] & 0x7Fu], enc_scale[code[1] & 0x7Fu]};
    // Below 7 no element needs E2M1's saturation (see encode16).
    const bool saturate[2] = {!(amax[0] * e[0] < 7.0f), !(amax[1] * e[1] < 7.0f)};

    uint32_t w[tile16::kWords];
#pragma unroll
    for (int i = 0; i < tile16::kWords; ++i) {
      float v[8];
      unpack8(raw[i], v);
      const int tr = tile16::tile_row(i);
      w[i] = saturate[tr] ? pack8_rne<true>(v, e[tr]) : pack8_rne<false>(v, e[tr]);
    }
    // Tile scales: one lane per tile column writes both tile rows' (lane 2 tc).
    const bool scale_lane = col_ok && lane == 2 * tc;

    if (rowwise && col_ok) {
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i) {
        if (tile16::tile_row(i) == 1 && !row1_ok) continue;
        const int64_t r = t.r0 + tile16::word_row(lane, i);
        *reinterpret_cast<uint32_t*>(w_out.data + (r * cols + t.c0 + tile16::word_col(lane)) / 2) = w[i];
      }
    }
    if (rowwise && scale_lane) {
      const int64_t s = (t.r0 / 16) * scale_cols + t.c0 / 16 + tc;
      w_out.scales[s] = static_cast<uint8_t>(code[0]);
      if (row1_ok) w_out.scales[s + scale_cols] = static_cast<uint8_t>(code[1]);
    }

    if (colwise) {
      tile16::transpose_step2(w);
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i)
        w[i] = tile16::transpose_step1(w[i], __shfl_xor_sync(kAll, w[i], 16), lane);
#pragma unroll
      for (int i = 0; i < tile16::kWords; ++i)
        w[i] = tile16::transpose_step0(w[i], __shfl_xor_sync(kAll, w[i], 8), lane);
      if (col_ok) {
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          // W^T row t.c0 + transposed_row, elements t.r0 .. t.r0 + 31: 16 bytes, or 8 when tile row
          // 1 is missing; 16-byte aligned when rows % 32 == 0, 8-byte aligned always.
          uint8_t* dst = t_out.data + ((t.c0 + tile16::transposed_row(lane, m)) * rows + t.r0) / 2;
          if (row1_ok && rows % 32 == 0) {
            *reinterpret_cast<uint4*>(dst) = make_uint4(w[m], w[2 + m], w[4 + m], w[6 + m]);
          } else {
            *reinterpret_cast<uint2*>(dst) = make_uint2(w[m], w[2 + m]);
            if (row1_ok) *reinterpret_cast<uint2*>(dst + 8) = make_uint2(w[4 + m], w[6 + m]);
          }
        }
      }
      if (scale_lane) {
        const int64_t s = (t.c0 / 16 + tc) * t_scale_cols + t.r0 / 16;
        t_out.scales[s] = static_cast<uint8_t>(code[0]);
        if (row1_ok) t_out.scales[s + 1] = static_cast<uint8_t>(code[1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Generic path: one thread per block segment of kW elements along the quantized matrix's
// contiguous dimension; for 16x16 tiles, 16 neighbouring lanes hold the 16 rows of one tile.

struct SegmentGeometry {
  int64_t qrows, qcols;  // quantized matrix
  int64_t count;         // number of segments
  bool tile16;
};

template <int kW>
__device__ __forceinline__ bool segment_coords(const SegmentGeometry& g, int64_t s, int64_t& qr, int64_t& qc0) {
  if (s >= g.count) return false;
  if (g.tile16) {
    const int64_t tile = s / 16, tiles_per_row = g.qcols / 16;
    qr = (tile / tiles_per_row) * 16 + s % 16;
    qc0 = (tile % tiles_per_row) * 16;
  } else {
    const int64_t per_row = g.qcols / kW;
    qr = s / per_row;
    qc0 = (s % per_row) * kW;
  }
  return true;
}

template <int kW, typename T>
__device__ __forceinline__ void load_segment(const T* x, int64_t cols, bool columnwise, bool rht, RhtSigns signs,
                                             int64_t qr, int64_t qc0, float* v) {
#pragma unroll
  for (int k = 0; k < kW; ++k)
    v[k] = to_float(columnwise ? x[(qc0 + k) * cols + qr] : x[qr * cols + qc0 + k]);
  if (rht) {
#pragma unroll
    for (int k = 0; k < kW; k += 16) rht16(v + k, signs);
  }
}

template <int kW, typename T>
__global__ void segment_amax_kernel(const T* __restrict__ x, int64_t cols, QuantSpec spec, SegmentGeometry g,
                                    uint32_t* __restrict__ amax_out) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t qr = 0, qc0 = 0;
  uint32_t m = 0;
  if (segment_coords<kW>(g, s, qr, qc0)) {
    float v[kW];
    load_segment<kW>(x, cols, spec.columnwise, spec.rht, spec.rht_signs, qr, qc0, v);
    m = max_abs_bits<kW>(v);
  }
  block_max_to_global(m, amax_out);
}

template <int kW, typename T>
__global__ void segment_quantize_kernel(const T* __restrict__ x, int64_t cols, QuantSpec spec, SegmentGeometry g,
                                        const uint32_t* __restrict__ amax_in, QuantBuffers out) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t qr = 0, qc0 = 0;
  const bool valid = segment_coords<kW>(g, s, qr, qc0);
  const bool finite = amax_is_finite(*amax_in);
  const bool fp8 = spec.format == Format::kFp8E4M3 || spec.format == Format::kFp8E5M2;
  const float fp8_max = spec.format == Format::kFp8E4M3 ? E4M3::kMax : E5M2::kMax;
  const TensorScale ts = fp8 ? fp8_tensor_scale(bits_float(*amax_in), fp8_max) : nvfp4_tensor_scale(bits_float(*amax_in));
  if (s == 0) {
    const bool tensor_scaled = spec.format != Format::kMxfp4;
    *out.decode_scale = !tensor_scaled ? 1.0f : finite ? ts.decode : __int_as_float(0x7FC00000);
  }
  float v[kW] = {};
  if (valid) load_segment<kW>(x, cols, spec.columnwise, spec.rht, spec.rht_signs, qr, qc0, v);
  const int64_t index0 = qr * g.qcols + qc0;

  if (spec.format == Format::kNvfp4) {
    uint32_t bamax = max_abs_bits<kW>(v);
    if (g.tile16) {  // all lanes take part, valid or not
#pragma unroll
      for (int off = 1; off < 16; off *= 2) bamax = max(bamax, __shfl_xor_sync(0xFFFFFFFFu, bamax, off));
    }
    if (!valid) return;
    uint32_t p[kW / 8] = {};
    uint8_t scale = 0;
    if (finite) {
      scale = nvfp4_block_scale_code(bits_float(bamax), ts.encode);
      encode_fp4_any<kW>(v, nvfp4_element_encode_scale(scale, ts.decode), spec, index0, p);
    }
#pragma unroll
    for (int w = 0; w < kW / 8; ++w) reinterpret_cast<uint32_t*>(out.data + index0 / 2)[w] = p[w];
    if (!g.tile16) {
      out.scales[index0 / 16] = scale;
    } else if (qr % 16 == 0) {
      out.scales[(qr / 16) * (g.qcols / 16) + qc0 / 16] = scale;
    }
  } else if (spec.format == Format::kMxfp4) {
    if (!valid) return;
    const uint32_t bamax = max_abs_bits<kW>(v);
    uint32_t p[kW / 8] = {};
    uint8_t scale = E8M0::kNanCode;
    if (amax_is_finite(bamax)) {
      scale = mxfp4_block_scale_code(bits_float(bamax));
      encode_fp4_any<kW>(v, mxfp4_element_encode_scale(scale), spec, index0, p);
    }
#pragma unroll
    for (int w = 0; w < kW / 8; ++w) reinterpret_cast<uint32_t*>(out.data + index0 / 2)[w] = p[w];
    out.scales[index0 / 32] = scale;
  } else {  // FP8, per-tensor scale
    if (!valid) return;
#pragma unroll
    for (int gq = 0; gq < kW / 4; ++gq) {
      Philox4x32 bits{{0, 0, 0, 0}};
      if (spec.rounding == Rounding::kStochastic) bits = random_words(spec.seed, spec.stream, (index0 >> 2) + gq);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = 4 * gq + j;
        const float y = v[k] * ts.encode;
        uint8_t code = 0;
        if (finite)
          code = spec.format == Format::kFp8E4M3 ? E4M3::encode(y, spec.rounding, bits.v[j])
                                                 : E5M2::encode(y, spec.rounding, bits.v[j]);
        out.data[index0 + k] = code;
      }
    }
  }
}

__global__ void dequantize_kernel(QuantSpec spec, int64_t rows, int64_t cols, const uint8_t* __restrict__ data,
                                  const uint8_t* __restrict__ scales, const float* __restrict__ decode_scale,
                                  float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const float g = *decode_scale;
  if (g != g) {
    out[i] = g;
    return;
  }
  const int64_t r = i / cols, c = i % cols;
  const uint8_t byte = spec.format == Format::kFp8E4M3 || spec.format == Format::kFp8E5M2 ? data[i] : data[i / 2];
  const uint8_t nib = (i & 1) ? byte >> 4 : byte & 0xF;
  switch (spec.format) {
    case Format::kNvfp4: {
      const int64_t sr = spec.block == Block::k16x16 ? r / 16 : r;
      out[i] = E2M1::decode(nib) * E4M3::decode(scales[sr * (cols / 16) + c / 16]) * g;
      break;
    }
    case Format::kMxfp4: out[i] = E2M1::decode(nib) * E8M0::decode(scales[r * (cols / 32) + c / 32]); break;
    case Format::kFp8E4M3: out[i] = E4M3::decode(byte) * g; break;
    case Format::kFp8E5M2: out[i] = E5M2::decode(byte) * g; break;
  }
}

int blocks_for(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

SegmentGeometry geometry(const QuantSpec& spec, int64_t rows, int64_t cols) {
  SegmentGeometry g{};
  g.qrows = spec.columnwise ? cols : rows;
  g.qcols = spec.columnwise ? rows : cols;
  const int w = spec.block == Block::k1x32 ? 32 : 16;
  g.count = g.qrows * g.qcols / w;
  g.tile16 = spec.block == Block::k16x16;
  if (spec.block == Block::kTensor && g.qcols % 16 != 0)  // FP8 runs in segments of 16 here
    throw std::invalid_argument("fp8 on the GPU needs the contiguous dimension to be a multiple of 16, got " +
                                std::to_string(g.qcols));
  return g;
}

void check_rowcol_shape(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || rows % 16 != 0 || cols % 16 != 0)
    throw std::invalid_argument("nvfp4 fused rowwise+columnwise quantization of a " + std::to_string(rows) + "x" +
                                std::to_string(cols) + " tensor: both dimensions must be positive multiples of 16");
}

// Blocks of a persistent grid for `kernel`: as many as fit on the device at once (each block
// loops over tiles), so the per-block set-up (tensor scales, encode-scale table) is paid once per
// resident block. The occupancy is cached per kernel variant.
int persistent_blocks(const void* kernel, int64_t tiles) {
  static std::mutex mutex;
  static std::vector<std::pair<const void*, int>> cache;
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [k, n] : cache)
      if (k == kernel) per_sm = n;
    if (per_sm == 0) {
      NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRowColThreads, 0));
      if (per_sm < 1) per_sm = 1;
      cache.emplace_back(kernel, per_sm);
    }
  }
  int device = 0, sms = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::min<int64_t>(tiles, static_cast<int64_t>(per_sm) * sms));
}

// Picks the kernel variant for the spec's rounding modes and RHT switch.
template <typename T, bool kAmaxOnly>
void launch_rowcol(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, uint32_t* amax_out,
                   const uint32_t* amax_in, QuantBuffers row, QuantBuffers col, cudaStream_t stream) {
  const int64_t tiles = ((cols + kTileCols - 1) / kTileCols) * ((rows + kTileRows - 1) / kTileRows);
  constexpr Rounding kRne = Rounding::kNearestEven, kSr = Rounding::kStochastic;
  const auto go = [&](auto kernel) {
    const int blocks = persistent_blocks(reinterpret_cast<const void*>(kernel), tiles);
    kernel<<<blocks, kRowColThreads, 0, stream>>>(x, rows, cols, spec, amax_out, amax_in, row, col);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
  };
  if constexpr (kAmaxOnly) {  // rounding plays no part in the amax pass
    spec.col_rht ? go(nvfp4_rowcol_kernel<T, true, kRne, kRne, true>) : go(nvfp4_rowcol_kernel<T, true, kRne, kRne, false>);
    return;
  } else {
    const bool rs = spec.row_rounding == kSr, cs = spec.col_rounding == kSr;
    if (spec.col_rht) {
      if (rs && cs) go(nvfp4_rowcol_kernel<T, false, kSr, kSr, true>);
      else if (rs) go(nvfp4_rowcol_kernel<T, false, kSr, kRne, true>);
      else if (cs) go(nvfp4_rowcol_kernel<T, false, kRne, kSr, true>);
      else go(nvfp4_rowcol_kernel<T, false, kRne, kRne, true>);
    } else {
      if (rs && cs) go(nvfp4_rowcol_kernel<T, false, kSr, kSr, false>);
      else if (rs) go(nvfp4_rowcol_kernel<T, false, kSr, kRne, false>);
      else if (cs) go(nvfp4_rowcol_kernel<T, false, kRne, kSr, false>);
      else go(nvfp4_rowcol_kernel<T, false, kRne, kRne, false>);
    }
  }
}

// NVFP4 with 16x16 tiles: the specs whose amax the fused pass's amax kernel computes (the
// rounding plays no part in it), and those the 16x16 kernel quantizes. Both kernels read 16-byte
// vectors, so x must be 16-byte aligned (the shapes are multiples of 16 by validate()).
bool is_tile16(const QuantSpec& spec) { return spec.format == Format::kNvfp4 && spec.block == Block::k16x16; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch_tile16_amax(const T* x, int64_t rows, int64_t cols, uint32_t* amax_bits, cudaStream_t stream) {
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(amax_bits, 0, sizeof(uint32_t), stream));
  RowColSpec s;  // rowwise only, no RHT: the kernel writes max |x| to amax_bits[0] alone
  s.columnwise = false;
  launch_rowcol<T, true>(x, rows, cols, s, amax_bits, nullptr, {}, {}, stream);
}

static_assert(kTile16Threads == kRowColThreads, "persistent_blocks sizes the grid for kRowColThreads");

template <typename T>
void launch_tile16(const T* x, int64_t rows, int64_t cols, const uint32_t* amax_bits, QuantBuffers w, QuantBuffers wt,
                   cudaStream_t stream) {
  const int64_t warp_tiles = tile16::warp_tiles(rows, cols);
  const auto kernel = nvfp4_tile16_kernel<T>;
  const int blocks = persistent_blocks(reinterpret_cast<const void*>(kernel),
                                       (warp_tiles + kTile16Warps - 1) / kTile16Warps);
  kernel<<<blocks, kTile16Threads, 0, stream>>>(x, rows, cols, amax_bits, w, wt);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Device-pointer entry points

template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, uint32_t* amax_bits,
                cudaStream_t stream) {
  check_rowcol_shape(rows, cols);
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(amax_bits, 0, 2 * sizeof(uint32_t), stream));
  launch_rowcol<T, true>(x, rows, cols, spec, amax_bits, nullptr, {}, {}, stream);
  if (!spec.col_rht)  // the columnwise copy holds the same values
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(amax_bits + 1, amax_bits, sizeof(uint32_t), cudaMemcpyDeviceToDevice, stream));
}

template <typename T>
void nvfp4_quantize_rowcol(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec,
                           const uint32_t* amax_bits, QuantBuffers row, QuantBuffers col, cudaStream_t stream) {
  check_rowcol_shape(rows, cols);
  launch_rowcol<T, false>(x, rows, cols, spec, nullptr, amax_bits, row, col, stream);
}

bool nvfp4_tile16_applies(const QuantSpec& spec) {
  return is_tile16(spec) && spec.rounding == Rounding::kNearestEven && !spec.rht;
}

template <typename T>
void nvfp4_quantize_tile16(const T* x, int64_t rows, int64_t cols, const uint32_t* amax_bits, QuantBuffers w,
                           QuantBuffers wt, cudaStream_t stream) {
  validate(make_spec(Format::kNvfp4, Block::k16x16), rows, cols);
  if (!aligned16(x))
    throw std::invalid_argument(
        "nvfp4 16x16 quantization: the input must be 16-byte aligned (it is read in 16-byte vectors)");
  if (w.decoded != nullptr || wt.decoded != nullptr)
    throw std::invalid_argument("nvfp4 16x16 quantization: decoded BF16 output is written only by the fused 1x16 pass");
  if (w.data == nullptr && wt.data == nullptr) return;
  launch_tile16(x, rows, cols, amax_bits, w, wt, stream);
}

constexpr int kSegmentThreads = 256;

template <typename T>
void quantize_amax_generic(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec, uint32_t* amax_bits,
                           cudaStream_t stream) {
  validate(spec, rows, cols);
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(amax_bits, 0, sizeof(uint32_t), stream));
  const SegmentGeometry g = geometry(spec, rows, cols);
  const int blocks = blocks_for(g.count, kSegmentThreads);
  if (spec.block == Block::k1x32)
    segment_amax_kernel<32><<<blocks, kSegmentThreads, 0, stream>>>(x, cols, spec, g, amax_bits);
  else
    segment_amax_kernel<16><<<blocks, kSegmentThreads, 0, stream>>>(x, cols, spec, g, amax_bits);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void quantize_segments_generic(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec,
                               const uint32_t* amax_bits, QuantBuffers out, cudaStream_t stream) {
  validate(spec, rows, cols);
  if (out.decoded != nullptr)
    throw std::invalid_argument("quantize_segments: decoded BF16 output is written only by the fused NVFP4 pass");
  const SegmentGeometry g = geometry(spec, rows, cols);
  const int blocks = blocks_for(g.count, kSegmentThreads);
  if (spec.block == Block::k1x32)
    segment_quantize_kernel<32><<<blocks, kSegmentThreads, 0, stream>>>(x, cols, spec, g, amax_bits, out);
  else
    segment_quantize_kernel<16><<<blocks, kSegmentThreads, 0, stream>>>(x, cols, spec, g, amax_bits, out);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void quantize_amax(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec, uint32_t* amax_bits,
                   cudaStream_t stream) {
  validate(spec, rows, cols);
  // 16x16 tiles (W or W^T, the same values): the fused pass's amax kernel.
  if (is_tile16(spec) && aligned16(x))
    launch_tile16_amax(x, rows, cols, amax_bits, stream);
  else
    quantize_amax_generic(x, rows, cols, spec, amax_bits, stream);
}

template <typename T>
void quantize_segments(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec, const uint32_t* amax_bits,
                       QuantBuffers out, cudaStream_t stream) {
  validate(spec, rows, cols);
  // Checked here, not only in the generic kernels' launcher: the 16x16 kernel would ignore it.
  if (out.decoded != nullptr)
    throw std::invalid_argument("quantize_segments: decoded BF16 output is written only by the fused NVFP4 pass");
  if (nvfp4_tile16_applies(spec) && aligned16(x)) {  // W (rowwise) or W^T (columnwise) alone
    const QuantBuffers none{};
    launch_tile16(x, rows, cols, amax_bits, spec.columnwise ? none : out, spec.columnwise ? out : none, stream);
  } else {
    quantize_segments_generic(x, rows, cols, spec, amax_bits, out, stream);
  }
}

void dequantize(const QuantSpec& spec, int64_t rows, int64_t cols, const uint8_t* data, const uint8_t* scales,
                const float* decode_scale, float* out, cudaStream_t stream) {
  dequantize_kernel<<<blocks_for(rows * cols, 256), 256, 0, stream>>>(spec, rows, cols, data, scales, decode_scale,
                                                                       out);
  NIBBLE_CUDA_CHECK(cudaGetLastError());
}

template void nvfp4_amax<bf16_t>(const bf16_t*, int64_t, int64_t, const RowColSpec&, uint32_t*, cudaStream_t);
template void nvfp4_amax<float>(const float*, int64_t, int64_t, const RowColSpec&, uint32_t*, cudaStream_t);
template void nvfp4_quantize_rowcol<bf16_t>(const bf16_t*, int64_t, int64_t, const RowColSpec&, const uint32_t*,
                                            QuantBuffers, QuantBuffers, cudaStream_t);
template void nvfp4_quantize_rowcol<float>(const float*, int64_t, int64_t, const RowColSpec&, const uint32_t*,
                                           QuantBuffers, QuantBuffers, cudaStream_t);
template void quantize_amax<bf16_t>(const bf16_t*, int64_t, int64_t, const QuantSpec&, uint32_t*, cudaStream_t);
template void quantize_amax<float>(const float*, int64_t, int64_t, const QuantSpec&, uint32_t*, cudaStream_t);
template void quantize_segments<bf16_t>(const bf16_t*, int64_t, int64_t, const QuantSpec&, const uint32_t*,
                                        QuantBuffers, cudaStream_t);
template void quantize_segments<float>(const float*, int64_t, int64_t, const QuantSpec&, const uint32_t*,
                                       QuantBuffers, cudaStream_t);
template void quantize_amax_generic<bf16_t>(const bf16_t*, int64_t, int64_t, const QuantSpec&, uint32_t*,
                                            cudaStream_t);
template void quantize_amax_generic<float>(const float*, int64_t, int64_t, const QuantSpec&, uint32_t*, cudaStream_t);
template void quantize_segments_generic<bf16_t>(const bf16_t*, int64_t, int64_t, const QuantSpec&, const uint32_t*,
                                                QuantBuffers, cudaStream_t);
template void quantize_segments_generic<float>(const float*, int64_t, int64_t, const QuantSpec&, const uint32_t*,
                                               QuantBuffers, cudaStream_t);
template void nvfp4_quantize_tile16<bf16_t>(const bf16_t*, int64_t, int64_t, const uint32_t*, QuantBuffers,
                                            QuantBuffers, cudaStream_t);
template void nvfp4_quantize_tile16<float>(const float*, int64_t, int64_t, const uint32_t*, QuantBuffers, QuantBuffers,
                                           cudaStream_t);

// ---------------------------------------------------------------------------------------------
// Host-memory wrappers

namespace {

// A cudaMalloc'd buffer, freed on scope exit.
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) {
    NIBBLE_CUDA_CHECK(cudaMalloc(&ptr, (count ? count : 1) * sizeof(T)));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr); }
  void upload(const T* src) { NIBBLE_CUDA_CHECK(cudaMemcpy(ptr, src, n * sizeof(T), cudaMemcpyHostToDevice)); }
  void download(T* dst) const { NIBBLE_CUDA_CHECK(cudaMemcpy(dst, ptr, n * sizeof(T), cudaMemcpyDeviceToHost)); }
};

// Device storage for one QuantizedTensor; poisoned so that unwritten bytes show up in tests.
struct DeviceQuant {
  QuantizedTensor q;
  DeviceArray<uint8_t> data, scales;
  DeviceArray<float> decode_scale;
  DeviceQuant(const QuantSpec& spec, int64_t rows, int64_t cols)
      : q(shape_of(spec, rows, cols)), data(q.data.size()), scales(q.scales.size()), decode_scale(1) {
    NIBBLE_CUDA_CHECK(cudaMemset(data.ptr, 0xA5, data.n));
    NIBBLE_CUDA_CHECK(cudaMemset(scales.ptr, 0xA5, scales.n));
    NIBBLE_CUDA_CHECK(cudaMemset(decode_scale.ptr, 0xA5, sizeof(float)));
  }
  QuantBuffers buffers() { return QuantBuffers{data.ptr, scales.ptr, decode_scale.ptr}; }
  QuantizedTensor fetch(uint32_t amax_bits) {
    data.download(q.data.data());
    scales.download(q.scales.data());
    decode_scale.download(&q.decode_scale);
    q.amax = bits_float(amax_bits);
    return q;
  }
  static QuantizedTensor shape_of(const QuantSpec& spec, int64_t rows, int64_t cols) {
    QuantizedTensor t;
    t.spec = spec;
    t.rows = spec.columnwise ? cols : rows;
    t.cols = spec.columnwise ? rows : cols;
    const bool fp8 = spec.format == Format::kFp8E4M3 || spec.format == Format::kFp8E5M2;
    t.data.resize(static_cast<size_t>(fp8 ? t.numel() : t.numel() / 2));
    t.scales.resize(static_cast<size_t>(t.scale_rows() * t.scale_cols()));
    return t;
  }
};

template <typename T>
QuantizedTensor quantize_on_gpu_impl(std::span<const T> x, int64_t rows, int64_t cols, const QuantSpec& spec,
                                     bool generic) {
  validate(spec, rows, cols);
  if (static_cast<int64_t>(x.size()) != rows * cols) throw std::invalid_argument("quantize_on_gpu: size mismatch");
  DeviceArray<T> dx(x.size());
  dx.upload(x.data());
  DeviceArray<uint32_t> amax(1);
  DeviceQuant out(spec, rows, cols);
  if (generic) {
    quantize_amax_generic(dx.ptr, rows, cols, spec, amax.ptr, nullptr);
    quantize_segments_generic(dx.ptr, rows, cols, spec, amax.ptr, out.buffers(), nullptr);
  } else {
    quantize_amax(dx.ptr, rows, cols, spec, amax.ptr, nullptr);
    quantize_segments(dx.ptr, rows, cols, spec, amax.ptr, out.buffers(), nullptr);
  }
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  uint32_t amax_bits = 0;
  amax.download(&amax_bits);
  return out.fetch(amax_bits);
}

template <typename T>
std::pair<QuantizedTensor, QuantizedTensor> quantize_tile16_pair_impl(std::span<const T> x, int64_t rows,
                                                                      int64_t cols) {
  const QuantSpec w_spec = make_spec(Format::kNvfp4, Block::k16x16);
  const QuantSpec t_spec = make_spec(Format::kNvfp4, Block::k16x16, Rounding::kNearestEven, /*columnwise=*/true);
  validate(w_spec, rows, cols);
  if (static_cast<int64_t>(x.size()) != rows * cols)
    throw std::invalid_argument("quantize_tile16_pair_on_gpu: size mismatch");
  DeviceArray<T> dx(x.size());
  dx.upload(x.data());
  DeviceArray<uint32_t> amax(1);
  DeviceQuant w(w_spec, rows, cols), wt(t_spec, rows, cols);
  quantize_amax(dx.ptr, rows, cols, w_spec, amax.ptr, nullptr);
  nvfp4_quantize_tile16(dx.ptr, rows, cols, amax.ptr, w.buffers(), wt.buffers(), nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  uint32_t amax_bits = 0;
  amax.download(&amax_bits);
  return {w.fetch(amax_bits), wt.fetch(amax_bits)};
}

template <typename T>
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_impl(std::span<const T> x, int64_t rows, int64_t cols,
                                                                 const RowColSpec& spec, RowColDecoded* decoded) {
  if (static_cast<int64_t>(x.size()) != rows * cols) throw std::invalid_argument("quantize_rowcol_on_gpu: size mismatch");
  check_rowcol_shape(rows, cols);
  DeviceArray<T> dx(x.size());
  dx.upload(x.data());
  DeviceArray<uint32_t> amax(2);
  DeviceQuant row(row_spec(spec), rows, cols), col(col_spec(spec), rows, cols);
  // Decoded outputs, poisoned like the packed ones; one element when not asked for.
  const auto decoded_size = [&](bool side) { return static_cast<size_t>(decoded && side ? rows * cols : 1); };
  DeviceArray<uint16_t> row_dec(decoded_size(spec.rowwise)), col_dec(decoded_size(spec.columnwise));
  NIBBLE_CUDA_CHECK(cudaMemset(row_dec.ptr, 0xA5, row_dec.n * sizeof(uint16_t)));
  NIBBLE_CUDA_CHECK(cudaMemset(col_dec.ptr, 0xA5, col_dec.n * sizeof(uint16_t)));
  QuantBuffers row_out = row.buffers(), col_out = col.buffers();
  if (decoded) {
    row_out.decoded = row_dec.ptr;
    col_out.decoded = col_dec.ptr;
  }
  nvfp4_amax(dx.ptr, rows, cols, spec, amax.ptr, nullptr);
  nvfp4_quantize_rowcol(dx.ptr, rows, cols, spec, amax.ptr, row_out, col_out, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  uint32_t amax_bits[2];
  amax.download(amax_bits);
  if (decoded) {
    decoded->row.assign(spec.rowwise ? row_dec.n : 0, 0);
    decoded->col.assign(spec.columnwise ? col_dec.n : 0, 0);
    if (spec.rowwise) row_dec.download(decoded->row.data());
    if (spec.columnwise) col_dec.download(decoded->col.data());
  }
  return {row.fetch(amax_bits[0]), col.fetch(amax_bits[1])};
}

}  // namespace

QuantSpec row_spec(const RowColSpec& s) {
  QuantSpec q;
  q.rounding = s.row_rounding;
  q.seed = s.seed;
  q.stream = s.row_stream;
  return q;
}

QuantSpec col_spec(const RowColSpec& s) {
  QuantSpec q;
  q.columnwise = true;
  q.rht = s.col_rht;
  q.rht_signs = s.rht_signs;
  q.rounding = s.col_rounding;
  q.seed = s.seed;
  q.stream = s.col_stream;
  return q;
}

QuantizedTensor quantize_on_gpu(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  return quantize_on_gpu_impl(x, rows, cols, spec, false);
}
QuantizedTensor quantize_on_gpu(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  return quantize_on_gpu_impl(x, rows, cols, spec, false);
}
QuantizedTensor quantize_on_gpu_generic(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  return quantize_on_gpu_impl(x, rows, cols, spec, true);
}
QuantizedTensor quantize_on_gpu_generic(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  return quantize_on_gpu_impl(x, rows, cols, spec, true);
}
std::pair<QuantizedTensor, QuantizedTensor> quantize_tile16_pair_on_gpu(std::span<const float> x, int64_t rows,
                                                                        int64_t cols) {
  return quantize_tile16_pair_impl(x, rows, cols);
}
std::pair<QuantizedTensor, QuantizedTensor> quantize_tile16_pair_on_gpu(std::span<const bf16_t> x, int64_t rows,
                                                                        int64_t cols) {
  return quantize_tile16_pair_impl(x, rows, cols);
}
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const bf16_t> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColDecoded* decoded) {
  return quantize_rowcol_impl(x, rows, cols, spec, decoded);
}
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const float> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColDecoded* decoded) {
  return quantize_rowcol_impl(x, rows, cols, spec, decoded);
}

std::vector<float> dequantize_on_gpu(const QuantizedTensor& q) {
  DeviceArray<uint8_t> data(q.data.size()), scales(q.scales.size());
  DeviceArray<float> g(1), out(static_cast<size_t>(q.numel()));
  data.upload(q.data.data());
  if (!q.scales.empty()) scales.upload(q.scales.data());
  g.upload(&q.decode_scale);
  dequantize(q.spec, q.rows, q.cols, data.ptr, scales.ptr, g.ptr, out.ptr, nullptr);
  std::vector<float> result(static_cast<size_t>(q.numel()));
  out.download(result.data());
  return result;
}

}  // namespace nibble::cuda
