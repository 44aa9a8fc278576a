// CUDA quantizers. Every kernel here computes the same bits as the CPU reference in
// ../quantize.h (same shared scalar math, same float32 order, same random bits per element).
//
// Two entry levels:
// - device-pointer kernels for the training path (stream-ordered, no host synchronisation):
//   nvfp4_amax + nvfp4_quantize_rowcol is the fused pair the Wgrad GEMM needs (rowwise 1x16 of
//   X and columnwise 1x16 of X^T, the RHT optionally on the columnwise copy, in one pass);
//   quantize_amax + quantize_segments cover every other QuantSpec (16x16 weights, MXFP4, FP8).
// - host-memory wrappers (quantize_on_gpu, ...) that upload, run and download, for tests and tools.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/quantized_tensor.h"

namespace nibble::cuda {

// Device buffers of one quantized output, sized as QuantizedTensor describes.
struct QuantBuffers {
  uint8_t* data = nullptr;
  uint8_t* scales = nullptr;
  float* decode_scale = nullptr;  // one float
  // Fused NVFP4 pass only (nullptr: not written): also the decoded values, code x block scale
  // without the tensor scale, as BF16 bits in the copy's layout (rowwise [rows x cols], columnwise
  // X^T [cols x rows]): exactly what decoding the packed output to BF16 gives (zeros where the
  // tensor is non-finite), so that a BF16 GEMM can read them without a decode pass.
  uint16_t* decoded = nullptr;
};

// What the fused NVFP4 pass produces. Each side can be switched off.
struct RowColSpec {
  bool rowwise = true;
  bool columnwise = true;
  Rounding row_rounding = Rounding::kNearestEven;
  Rounding col_rounding = Rounding::kNearestEven;
  bool col_rht = false;
  RhtSigns rht_signs = kDefaultRhtSigns;
  uint64_t seed = 0;
  uint32_t row_stream = 0;
  uint32_t col_stream = 1;
};

// amax_bits[0] = max |x| bits (rowwise copy), amax_bits[1] = max |RHT(x^T)| bits (columnwise copy;
// equals [0] without the RHT). amax_bits must hold 2 words; it is zeroed here first.
// Needs rows % 16 == 0 and cols % 16 == 0.
template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, uint32_t* amax_bits,
                cudaStream_t stream);

template <typename T>
void nvfp4_quantize_rowcol(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec,
                           const uint32_t* amax_bits, QuantBuffers row, QuantBuffers col, cudaStream_t stream);

// Generic path for any valid QuantSpec: amax of the (transformed) quantized matrix, then one
// thread per block segment. It writes no decoded values (out.decoded must be nullptr).
template <typename T>
void quantize_amax(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec, uint32_t* amax_bits,
                   cudaStream_t stream);
template <typename T>
void quantize_segments(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec,
                       const uint32_t* amax_bits, QuantBuffers out, cudaStream_t stream);

// x' = code * block_scale * decode_scale, as a row-major rows x cols float matrix.
void dequantize(const QuantSpec& spec, int64_t rows, int64_t cols, const uint8_t* data, const uint8_t* scales,
                const float* decode_scale, float* out, cudaStream_t stream);

// ---- host-memory wrappers (synchronous) ----
QuantizedTensor quantize_on_gpu(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec);
QuantizedTensor quantize_on_gpu(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec);
// The fused pass; returns {rowwise, columnwise} as QuantizedTensors with matching QuantSpecs.
// With `decoded`, the pass also writes the decoded BF16 values (QuantBuffers::decoded) of each side
// it makes, returned in decoded->row / decoded->col (empty for a side switched off).
struct RowColDecoded {
  std::vector<uint16_t> row, col;
};
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const bf16_t> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColDecoded* decoded = nullptr);
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const float> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColDecoded* decoded = nullptr);
std::vector<float> dequantize_on_gpu(const QuantizedTensor& q);

// The QuantSpecs of the two outputs of a RowColSpec (what the CPU reference is called with).
QuantSpec row_spec(const RowColSpec& s);
QuantSpec col_spec(const RowColSpec& s);

}  // namespace nibble::cuda
