// CUDA quantizers; see quantize_cuda.h. The per-element and per-block math is the shared code of
// scaling.h / minifloat.h / rht.h / philox.h, so each kernel computes the CPU reference's bits.
#include "nibble/quant/cuda/quantize_cuda.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "nibble/quant/fp4_decode_bf16.h"
#include "nibble/quant/cuda/nvfp4_rowcol.cuh"
#include "nibble/quant/cuda/nvfp4_tile16.cuh"
#include "nibble/quant/cuda/tile16_layout.h"
#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"
#include "nibble/quant/rht.h"
#include "nibble/quant/scaling.h"
#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::cuda {

namespace {

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
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  return static_cast<int>(std::min<int64_t>(tiles, static_cast<int64_t>(per_sm) * sms));
}

// Picks the kernel variant for the spec's rounding modes and RHT switch.
template <typename T, bool kAmaxOnly>
void launch_rowcol(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, AmaxSlots amax_out,
                   const uint32_t* amax_in, QuantBuffers row, QuantBuffers col, cudaStream_t stream) {
  const int64_t tiles = ((cols + kTileCols - 1) / kTileCols) * ((rows + kTileRows - 1) / kTileRows);
  if (tiles > INT32_MAX)  // the kernel counts tiles in 32 bits
    throw std::invalid_argument("nvfp4 fused quantization of a " + std::to_string(rows) + "x" + std::to_string(cols) +
                                " tensor: more than 2^31 tiles");
  constexpr Rounding kRne = Rounding::kNearestEven, kSr = Rounding::kStochastic;
  const auto go = [&](auto kernel) {
    const int blocks = persistent_blocks(reinterpret_cast<const void*>(kernel), tiles);
    kernel<<<blocks, kRowColThreads, 0, stream>>>(x, rows, cols, spec, amax_out, amax_in, row, col);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
  };
  // The whole-tile variant (full_tiles); compile-time BF16 test so that float input instantiates none.
  const auto with_tiles = [&](auto pick) {
    if constexpr (sizeof(T) == 2) {
      if (full_tiles<T>(spec, rows, cols)) return pick(std::true_type{});
    }
    pick(std::false_type{});
  };
  if constexpr (kAmaxOnly) {  // rounding plays no part in the amax pass
    with_tiles([&](auto full) {
      constexpr bool kFull = decltype(full)::value;
      spec.col_rht ? go(nvfp4_rowcol_kernel<T, true, kRne, kRne, true, false, kFull>)
                   : go(nvfp4_rowcol_kernel<T, true, kRne, kRne, false, false, kFull>);
    });
  } else {
    const bool rs = spec.row_rounding == kSr, cs = spec.col_rounding == kSr;
    const auto pick = [&](auto stage_col, auto full) {
      constexpr bool kStage = decltype(stage_col)::value, kFull = decltype(full)::value;
      if (spec.col_rht) {
        if (rs && cs) go(nvfp4_rowcol_kernel<T, false, kSr, kSr, true, kStage, kFull>);
        else if (rs) go(nvfp4_rowcol_kernel<T, false, kSr, kRne, true, kStage, kFull>);
        else if (cs) go(nvfp4_rowcol_kernel<T, false, kRne, kSr, true, kStage, kFull>);
        else go(nvfp4_rowcol_kernel<T, false, kRne, kRne, true, kStage, kFull>);
      } else {
        if (rs && cs) go(nvfp4_rowcol_kernel<T, false, kSr, kSr, false, kStage, kFull>);
        else if (rs) go(nvfp4_rowcol_kernel<T, false, kSr, kRne, false, kStage, kFull>);
        else if (cs) go(nvfp4_rowcol_kernel<T, false, kRne, kSr, false, kStage, kFull>);
        else go(nvfp4_rowcol_kernel<T, false, kRne, kRne, false, kStage, kFull>);
      }
    };
    with_tiles([&](auto full) {
      if constexpr (sizeof(T) == 2) {  // no staged variants for float input (stage_col_decode)
        if (stage_col_decode<T>(spec, col)) return pick(std::true_type{}, full);
      }
      pick(std::false_type{}, full);
    });
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
  launch_rowcol<T, true>(x, rows, cols, s, AmaxSlots{amax_bits, nullptr}, nullptr, {}, {}, stream);
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
  launch_rowcol<T, true>(x, rows, cols, spec, AmaxSlots{amax_bits, nullptr}, nullptr, {}, {}, stream);
}

template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, AmaxSlots slots,
                cudaStream_t stream) {
  check_rowcol_shape(rows, cols);
  launch_rowcol<T, true>(x, rows, cols, spec, slots, nullptr, {}, {}, stream);
}

template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const ProducerAmax& amax, cudaStream_t stream) {
  RowColSpec spec;
  spec.col_rht = amax.col_rht;
  spec.rht_signs = amax.rht_signs;
  nvfp4_amax(x, rows, cols, spec, amax.slots, stream);
}

template <typename T>
void nvfp4_quantize_rowcol(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec,
                           const uint32_t* amax_bits, QuantBuffers row, QuantBuffers col, cudaStream_t stream) {
  check_rowcol_shape(rows, cols);
  const auto check_outputs = [](bool made, const QuantBuffers& out, const char* side) {
    const bool packed = out.data != nullptr && out.scales != nullptr;
    const bool decoded_only = out.data == nullptr && out.scales == nullptr && out.decoded != nullptr;
    if (made && !packed && !decoded_only)
      throw std::invalid_argument(std::string("nvfp4 fused pass: the ") + side +
                                  " copy needs both its packed codes and scales, or neither and its decoded values");
  };
  check_outputs(spec.rowwise, row, "rowwise");
  check_outputs(spec.columnwise, col, "columnwise");
  launch_rowcol<T, false>(x, rows, cols, spec, AmaxSlots{}, amax_bits, row, col, stream);
}

bool nvfp4_tile16_applies(const QuantSpec& spec) {
  return is_tile16(spec) && spec.rounding == Rounding::kNearestEven && !spec.rht;
}

namespace {

// nvfp4_quantize_tile16's checks; false where there is nothing to write.
bool tile16_call_writes(const void* x, int64_t rows, int64_t cols, const QuantBuffers& w, const QuantBuffers& wt) {
  validate(make_spec(Format::kNvfp4, Block::k16x16), rows, cols);
  if (!aligned16(x))
    throw std::invalid_argument(
        "nvfp4 16x16 quantization: the input must be 16-byte aligned (it is read in 16-byte vectors)");
  if ((w.data == nullptr) != (w.scales == nullptr) || (wt.data == nullptr) != (wt.scales == nullptr))
    throw std::invalid_argument("nvfp4 16x16 quantization: a side takes both its codes and its tile scales, or neither");
  if (wt.decoded != nullptr || w.alpha != nullptr || wt.alpha != nullptr)
    throw std::invalid_argument("nvfp4 16x16 quantization: decoded BF16 output only for W, and no GEMM alphas");
  return w.data != nullptr || w.decoded != nullptr || wt.data != nullptr;
}

}  // namespace

template <typename T>
void nvfp4_quantize_tile16(const T* x, int64_t rows, int64_t cols, const uint32_t* amax_bits, QuantBuffers w,
                           QuantBuffers wt, cudaStream_t stream) {
  if (tile16_call_writes(x, rows, cols, w, wt)) launch_tile16(x, rows, cols, amax_bits, w, wt, stream);
}

void nvfp4_quantize_tile16_jobs(std::span<const Tile16Job> jobs, cudaStream_t stream) {
  Tile16Jobs launch{};
  int count = 0;
  int64_t blocks = 0;
  const auto flush = [&] {
    if (count == 0) return;
    nvfp4_tile16_jobs_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(count)), kTile16Threads, 0,
                               stream>>>(launch);
    NIBBLE_CUDA_CHECK(cudaGetLastError());
    count = 0, blocks = 0;
  };
  for (const Tile16Job& job : jobs) {
    if (!tile16_call_writes(job.x, job.rows, job.cols, job.w, job.wt)) continue;
    launch.job[count++] = job;
    blocks = std::max(blocks, tile16_job_blocks(job.rows, job.cols));
    if (count == kTile16JobsPerLaunch) flush();
  }
  flush();
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
  if (out.decoded != nullptr || out.alpha != nullptr)
    throw std::invalid_argument(
        "quantize_segments: decoded BF16 output and GEMM alphas are written only by the fused NVFP4 pass");
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
  if (out.decoded != nullptr || out.alpha != nullptr)
    throw std::invalid_argument(
        "quantize_segments: decoded BF16 output and GEMM alphas are written only by the fused NVFP4 pass");
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
template void nvfp4_amax<bf16_t>(const bf16_t*, int64_t, int64_t, const RowColSpec&, AmaxSlots, cudaStream_t);
template void nvfp4_amax<float>(const float*, int64_t, int64_t, const RowColSpec&, AmaxSlots, cudaStream_t);
template void nvfp4_amax<bf16_t>(const bf16_t*, int64_t, int64_t, const ProducerAmax&, cudaStream_t);
template void nvfp4_amax<float>(const float*, int64_t, int64_t, const ProducerAmax&, cudaStream_t);
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
                                                                 const RowColSpec& spec, RowColExtras* extras) {
  if (static_cast<int64_t>(x.size()) != rows * cols) throw std::invalid_argument("quantize_rowcol_on_gpu: size mismatch");
  check_rowcol_shape(rows, cols);
  DeviceArray<T> dx(x.size());
  dx.upload(x.data());
  DeviceArray<uint32_t> amax(2);
  DeviceQuant row(row_spec(spec), rows, cols), col(col_spec(spec), rows, cols);
  // Decoded outputs and alphas, poisoned like the packed ones; one element when not asked for.
  const auto decoded_size = [&](bool side) { return static_cast<size_t>(extras && side ? rows * cols : 1); };
  DeviceArray<uint16_t> row_dec(decoded_size(spec.rowwise)), col_dec(decoded_size(spec.columnwise));
  NIBBLE_CUDA_CHECK(cudaMemset(row_dec.ptr, 0xA5, row_dec.n * sizeof(uint16_t)));
  NIBBLE_CUDA_CHECK(cudaMemset(col_dec.ptr, 0xA5, col_dec.n * sizeof(uint16_t)));
  DeviceArray<float> partners(2), alphas(2);
  NIBBLE_CUDA_CHECK(cudaMemset(alphas.ptr, 0xA5, 2 * sizeof(float)));
  QuantBuffers row_out = row.buffers(), col_out = col.buffers();
  if (extras && !extras->packed) row_out.data = row_out.scales = col_out.data = col_out.scales = nullptr;
  if (extras) {
    const float partner_values[2] = {extras->row_partner, extras->col_partner};
    partners.upload(partner_values);
    row_out.decoded = row_dec.ptr;
    col_out.decoded = col_dec.ptr;
    row_out.alpha_partner = partners.ptr;
    col_out.alpha_partner = partners.ptr + 1;
    row_out.alpha = alphas.ptr;
    col_out.alpha = alphas.ptr + 1;
  }
  nvfp4_amax(dx.ptr, rows, cols, spec, amax.ptr, nullptr);
  nvfp4_quantize_rowcol(dx.ptr, rows, cols, spec, amax.ptr, row_out, col_out, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  uint32_t amax_bits[2];
  amax.download(amax_bits);
  if (extras) {
    extras->row.assign(spec.rowwise ? row_dec.n : 0, 0);
    extras->col.assign(spec.columnwise ? col_dec.n : 0, 0);
    if (spec.rowwise) row_dec.download(extras->row.data());
    if (spec.columnwise) col_dec.download(extras->col.data());
    float alpha_values[2];
    alphas.download(alpha_values);
    extras->row_alpha = alpha_values[0];
    extras->col_alpha = alpha_values[1];
  }
  return {row.fetch(amax_bits[0]), col.fetch(amax_bits[1])};
}

}  // namespace

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
                                                                   RowColExtras* extras) {
  return quantize_rowcol_impl(x, rows, cols, spec, extras);
}
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const float> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColExtras* extras) {
  return quantize_rowcol_impl(x, rows, cols, spec, extras);
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
