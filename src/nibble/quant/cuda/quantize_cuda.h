// CUDA quantizers. Every kernel here computes the same bits as the CPU reference in
// ../quantize.h (same shared scalar math, same float32 order, same random bits per element).
//
// Two entry levels:
// - device-pointer kernels for the training path (stream-ordered, no host synchronisation):
//   nvfp4_amax + nvfp4_quantize_rowcol is the fused pair the Wgrad GEMM needs (rowwise 1x16 of
//   X and columnwise 1x16 of X^T, the RHT optionally on the columnwise copy, in one pass);
//   nvfp4_quantize_tile16 is the NVFP4 16x16 round-to-nearest-even pass of the weights (W and, in
//   the same pass, W^T); quantize_amax + quantize_segments cover every QuantSpec, through those
//   kernels where they apply (16x16 RNE) and one-thread-per-segment kernels otherwise (16x16 SR,
//   MXFP4, FP8).
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
  // The packed codes and block scales. The fused NVFP4 pass accepts nullptr for both when it writes
  // the decoded values: an operand that a BF16 GEMM reads once and nobody keeps needs no packed copy
  // (0.5625 bytes an element fewer written).
  uint8_t* data = nullptr;
  uint8_t* scales = nullptr;
  float* decode_scale = nullptr;  // one float
  // Fused NVFP4 pass and W of the 16x16 pass only (nullptr: not written): also the decoded
  // values, code x block scale without the tensor scale, as BF16 bits in the copy's layout (rowwise
  // [rows x cols], columnwise X^T [cols x rows]): exactly what decoding the packed output to BF16
  // gives (zeros where the tensor is non-finite), so that a BF16 GEMM can read them without a
  // decode pass.
  uint16_t* decoded = nullptr;
  // Fused NVFP4 pass only (nullptr: not written): with alpha_partner, the decode scale of the
  // operand this copy meets in its GEMM (a device float, final when the pass runs), the pass also
  // writes that GEMM's alpha = decode_scale x *alpha_partner (one float product, as
  // multiply_scalars computes it), so that no separate launch multiplies the two.
  const float* alpha_partner = nullptr;
  float* alpha = nullptr;
};

// A packed NVFP4 operand [rows x cols] (1x16 blocks along cols, or 16x16 tiles) to decode to BF16
// (codes x block scales, without the tensor scale: the bits of OperandCuda's decode pass) into `out`,
// by the fused pass's blocks after their tiles (RowColSpec::tail_decode): the GEMM partner of the
// pass's columnwise copy (the saved X^T that Wgrad reads beside dY^T), decoded in the same launch
// instead of a launch of its own. `out` nullptr: none.
struct TailDecode {
  const uint8_t* data = nullptr;
  const uint8_t* scales = nullptr;
  uint16_t* out = nullptr;
  int64_t rows = 0, cols = 0;
  bool tiles16 = false;
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
  TailDecode tail_decode;  // quantizing passes only
};

// amax_bits[0] = max |x| bits (rowwise copy), amax_bits[1] = max |RHT(x^T)| bits (columnwise copy;
// equals [0] without the RHT). amax_bits must hold 2 words; it is zeroed here first.
// Needs rows % 16 == 0 and cols % 16 == 0.
template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, uint32_t* amax_bits,
                cudaStream_t stream);

// Where an amax pass puts its two words without a memset before it (a memset is a launch of its
// own, about 2 us of GPU time each, 80 a training step): the pass takes the maxima into `current`,
// which must hold zeros when it starts, and zeroes the two words of `zero_next` (nullptr: none). A
// caller that alternates between two slots, each pass zeroing the other, keeps that invariant with
// one memset when the slots are allocated (nn/cuda/operand_cuda.h, AmaxSlotPair).
struct AmaxSlots {
  uint32_t* current = nullptr;
  uint32_t* zero_next = nullptr;
};
// The two words of nvfp4_amax for a fused pass over x with its columnwise side, computed instead
// by the kernel that writes x and has its values in registers anyway (the MLP activation,
// nn/cuda/layers_cuda.h): one read of x fewer. Into slots as nvfp4_amax(AmaxSlots) puts them;
// slots.current nullptr: nothing to compute. Device helpers in amax_device.cuh.
struct ProducerAmax {
  AmaxSlots slots;
  bool col_rht = false;
  RhtSigns rht_signs = kDefaultRhtSigns;
  explicit operator bool() const { return slots.current != nullptr; }
};

// nvfp4_amax into slots.current, zeroing slots.zero_next in the same launch.
template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec, AmaxSlots slots,
                cudaStream_t stream);
// The words a producer was asked for (`amax`) where its kernels could not compute them: the fused
// pass's own amax kernel over x [rows x cols], after the producer has written it.
template <typename T>
void nvfp4_amax(const T* x, int64_t rows, int64_t cols, const ProducerAmax& amax, cudaStream_t stream);

template <typename T>
void nvfp4_quantize_rowcol(const T* x, int64_t rows, int64_t cols, const RowColSpec& spec,
                           const uint32_t* amax_bits, QuantBuffers row, QuantBuffers col, cudaStream_t stream);

// NVFP4 16x16 tiles with round-to-nearest-even, from x = W [rows x cols] (both multiples of 16,
// x 16-byte aligned): W's codes and tile scales into `w` (the rowwise copy, QuantSpec
// make_spec(kNvfp4, k16x16)) and W^T's into `wt` (its columnwise twin), in one pass. A tile of W^T
// has the scale and the values of the tile of W it transposes, so each element is encoded once and
// its code written to both. A copy whose data pointer is null is not made (its data and scales
// pointers are both null or both set; g still goes to its decode_scale when given). w.decoded
// (optional, with or without W's codes) receives W's decoded BF16 values [rows x cols], as in the
// fused pass; wt.decoded and the alphas must be nullptr. amax_bits: the one word quantize_amax
// computes for either spec. Same bits as the CPU reference (and the generic kernels).
template <typename T>
void nvfp4_quantize_tile16(const T* x, int64_t rows, int64_t cols, const uint32_t* amax_bits, QuantBuffers w,
                           QuantBuffers wt, cudaStream_t stream);
// nvfp4_quantize_tile16 of many FP32 weights in one launch (a few where there are more than a launch
// takes): each job's outputs are those of nvfp4_quantize_tile16(x, rows, cols, amax_bits, w, wt), bit
// for bit, with the same checks. A training step quantizes all its NVFP4 weights at once this way
// (GptCuda): one launch instead of one per weight, each too small to reach the copy bandwidth alone.
struct Tile16Job {
  const float* x = nullptr;
  int64_t rows = 0, cols = 0;
  const uint32_t* amax_bits = nullptr;
  QuantBuffers w, wt;
};
void nvfp4_quantize_tile16_jobs(std::span<const Tile16Job> jobs, cudaStream_t stream);
// Whether quantize_segments runs nvfp4_quantize_tile16 for this spec (NVFP4, 16x16, RNE; with an
// input that is 16-byte aligned).
bool nvfp4_tile16_applies(const QuantSpec& spec);

// Any valid QuantSpec: amax of the (transformed) quantized matrix into amax_bits[0] (zeroed here
// first), then the quantization. NVFP4 16x16 tiles take the fused pass's amax kernel and, with
// RNE, nvfp4_quantize_tile16; every other spec one thread per block segment. It writes no decoded
// values (out.decoded must be nullptr).
template <typename T>
void quantize_amax(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec, uint32_t* amax_bits,
                   cudaStream_t stream);
template <typename T>
void quantize_segments(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec,
                       const uint32_t* amax_bits, QuantBuffers out, cudaStream_t stream);
// The one-thread-per-segment kernels for every spec, also where a specialised kernel exists: the
// reference those are tested and timed against.
template <typename T>
void quantize_amax_generic(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec, uint32_t* amax_bits,
                           cudaStream_t stream);
template <typename T>
void quantize_segments_generic(const T* x, int64_t rows, int64_t cols, const QuantSpec& spec,
                               const uint32_t* amax_bits, QuantBuffers out, cudaStream_t stream);

// x' = code * block_scale * decode_scale, as a row-major rows x cols float matrix.
void dequantize(const QuantSpec& spec, int64_t rows, int64_t cols, const uint8_t* data, const uint8_t* scales,
                const float* decode_scale, float* out, cudaStream_t stream);

// ---- host-memory wrappers (synchronous) ----
QuantizedTensor quantize_on_gpu(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec);
QuantizedTensor quantize_on_gpu(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec);
// The same through quantize_amax_generic + quantize_segments_generic.
QuantizedTensor quantize_on_gpu_generic(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec);
QuantizedTensor quantize_on_gpu_generic(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec);
// nvfp4_quantize_tile16 with both copies; returns {W, W^T}.
std::pair<QuantizedTensor, QuantizedTensor> quantize_tile16_pair_on_gpu(std::span<const float> x, int64_t rows,
                                                                        int64_t cols);
std::pair<QuantizedTensor, QuantizedTensor> quantize_tile16_pair_on_gpu(std::span<const bf16_t> x, int64_t rows,
                                                                        int64_t cols);
// The fused pass; returns {rowwise, columnwise} as QuantizedTensors with matching QuantSpecs.
// With `extras`, the pass also writes the decoded BF16 values (QuantBuffers::decoded) of each side
// it makes, returned in extras->row / extras->col (empty for a side switched off), and each side's
// GEMM alpha with the partner decode scale given in row_partner / col_partner
// (QuantBuffers::alpha_partner), returned in row_alpha / col_alpha.
// With packed = false, the pass writes no packed codes or block scales (QuantBuffers::data), and the
// returned tensors hold the poison their buffers were filled with.
struct RowColExtras {
  float row_partner = 1.0f, col_partner = 1.0f;  // in
  bool packed = true;                            // in
  std::vector<uint16_t> row, col;                // out
  float row_alpha = 0.0f, col_alpha = 0.0f;      // out
};
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const bf16_t> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColExtras* extras = nullptr);
std::pair<QuantizedTensor, QuantizedTensor> quantize_rowcol_on_gpu(std::span<const float> x, int64_t rows,
                                                                   int64_t cols, const RowColSpec& spec,
                                                                   RowColExtras* extras = nullptr);
std::vector<float> dequantize_on_gpu(const QuantizedTensor& q);

// The QuantSpecs of the two outputs of a RowColSpec (what the CPU reference is called with).
inline QuantSpec row_spec(const RowColSpec& s) {
  QuantSpec q;
  q.rounding = s.row_rounding;
  q.seed = s.seed;
  q.stream = s.row_stream;
  return q;
}

inline QuantSpec col_spec(const RowColSpec& s) {
  QuantSpec q;
  q.columnwise = true;
  q.rht = s.col_rht;
  q.rht_signs = s.rht_signs;
  q.rounding = s.col_rounding;
  q.seed = s.seed;
  q.stream = s.col_stream;
  return q;
}

}  // namespace nibble::cuda
