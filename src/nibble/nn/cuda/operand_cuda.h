// One GEMM operand of a linear layer on the GPU, prepared as the recipe says: the device twin of
// nn::OperandCopy (../operand.h), with the same layouts, seeds and bits.
//
// A quantized operand (nvfp4, mxfp4, fp8) is kept packed: codes, block scales and the per-tensor
// decode scale g on the device. This is what the layer saves between forward and backward. For the
// GEMM, FP4 operands are decoded to BF16 (code x block scale, exact: DESIGN.md "Hopper emulation")
// and g goes to the GEMM's alpha (an operand made by the fused NVFP4 pass can have that pass write
// the decoded values and the alpha g_a g_b as well, make's ForGemm, which saves the GEMM a separate
// decode pass and a launch);
// FP8 operands feed cuBLASLt's FP8 GEMM directly. On Blackwell, NVFP4 operands can instead feed
// cuBLASLt's native block-scaled FP4 GEMM (nvfp4_matrix, use_native_nvfp4): codes as stored, block
// scales rearranged into cuBLASLt's tiled layout. Unquantized operands are held as BF16 (rounded to
// nearest even) or FP32, transposed and RHT-transformed as their recipe says.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "nibble/nn/recipe.h"
#include "nibble/quant/cuda/quantize_cuda.h"
#include "nibble/quant/quantized_tensor.h"
#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/tensor/cuda/gemm_cuda.h"
#include "nibble/tensor/cuda/gemm_nvfp4_sm90.h"

namespace nibble::nn::cuda {

using nibble::cuda::DeviceBuffer;
using nibble::cuda::GemmMatrix;
using nibble::cuda::GemmType;

class OperandCuda;

// The amax words of an operand's NVFP4 passes: two slots of two words taken in turn
// (nibble::cuda::AmaxSlots), each amax pass zeroing the slot the next one takes, so that a pass
// needs no memset of its own. A slot whose zeros are not known (just allocated, or last used by a
// pass that zeroes its own words) gets one memset. The passes must run in one stream's order.
class AmaxSlotPair {
 public:
  // For an amax pass that zeroes the other slot (nvfp4_amax with AmaxSlots).
  nibble::cuda::AmaxSlots take(cudaStream_t stream);
  // Two words for a pass that zeroes them itself (quantize_amax); the turn stays.
  uint32_t* take_self_zeroing();

 private:
  DeviceBuffer<uint32_t> words_;
  int turn_ = 0;
  bool zero_[2] = {false, false};
};

// What the fused NVFP4 pass, when it makes an operand, also prepares for the GEMM the operand feeds
// next (ignored on the other paths, which leave both to the GEMM call: gemm_matrix decodes FP4
// operands, LinearCuda multiplies the decode scales). Same packed bits either way.
// - decoded: the decoded BF16 values (2 bytes per element more, in a buffer of their own; see
//   OperandCuda::has_decoded); the NVFP4 16x16 pass of a rowwise weight (W) writes them too;
// - partner: the operand it will meet, already made, whose decode scale the pass multiplies by
//   its own into the GEMM's alpha (see OperandCuda::alpha_with);
// - packed: whether the fused pass writes the packed codes and block scales beside the decoded
//   values (false: for an operand that only that GEMM reads and nobody keeps, such as LinearCuda's
//   per-call copies; it then has no packed form, see OperandCuda::has_packed).
struct OperandForGemm {
  bool decoded = false;
  const OperandCuda* partner = nullptr;
  bool packed = true;
};

// make_pair's tail: `operand` decoded to BF16 by the fused pass after its tiles (RowColSpec::
// tail_decode), as gemm_matrix(kBF16, ..) would decode it, into `into`, which grows only where that
// pass runs and the operand is packed NVFP4 without decoded values of its own.
struct OperandTailRequest {
  const OperandCuda* operand = nullptr;
  DeviceBuffer<uint8_t>* into = nullptr;
};

class OperandCuda {
 public:
  using ForGemm = OperandForGemm;
  using TailRequest = OperandTailRequest;

  // x: device [rows x cols] (the high-precision tensor, before any transpose), T = float or
  // bf16_t. Stream-ordered. Throws std::invalid_argument for shapes the operand's blocks cannot take.
  template <typename T>
  void make(const T* x, int64_t rows, int64_t cols, const OperandRecipe& recipe, Operand op, RhtSigns signs,
            uint64_t seed, cudaStream_t stream, ForGemm for_gemm = {});
  // Both operands that one tensor feeds (fprop.x with wgrad.x, or dgrad.dy with wgrad.dy), from one
  // fused NVFP4 pass over x when both are NVFP4 1x16 (the rowwise one without RHT); from one
  // conversion when both are the same unquantized format without RHT (`row` then reads `col`'s
  // values, so `col` must outlive `row`'s use); otherwise two make() calls. Same bits either way.
  // row_gemm / col_gemm: make's for_gemm for each side.
  // tail: another operand for the fused pass to decode to BF16 after its tiles (OperandTailRequest);
  // returns whether it ran. The caller then makes that operand read those values (decoded_into).
  template <typename T>
  static bool make_pair(const T* x, int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                        Operand col_op, uint64_t seed, OperandCuda& row, OperandCuda& col, cudaStream_t stream,
                        ForGemm row_gemm = {}, ForGemm col_gemm = {}, TailRequest tail = {});
  // gemm_matrix(kBF16, ..) reads this operand's values from `values` (a make_pair tail's `into`,
  // once that pass is enqueued; the same bits) until the operand is made again or reset; nullptr:
  // it decodes them itself again.
  void decoded_into(const uint8_t* values) { decoded_into_ = values; }

  // For a producer that computes the amax of make_pair's fused NVFP4 pass while it writes x
  // (nibble::cuda::ProducerAmax): what to compute and where (row's amax slots), when make_pair(x
  // [rows x cols], recipe, row_op, col_op, .., row, ..) will run that pass; empty otherwise. The next
  // make_pair into `row` then reads those words instead of running its amax pass: the producer must
  // run between the two, in the same stream.
  static nibble::cuda::ProducerAmax producer_amax(int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                                                  Operand col_op, OperandCuda& row, cudaStream_t stream);

  // The pair make_pair() makes from one conversion (both operands the same unquantized BF16 without
  // RHT, `row` rowwise and `col` columnwise), without the conversion: a producer writes the BF16
  // values of x [rows x cols] (nearest-even rounding of what make_pair() would be given) into
  // bf16_pair_source(), then adopt_bf16_pair() sets up both operands over them: the same bits as
  // make_pair(), one pass over memory fewer.
  static bool bf16_pair_applies(const Recipe& recipe, Operand row_op, Operand col_op);
  static bf16_t* bf16_pair_source(int64_t rows, int64_t cols, OperandCuda& col);
  static void adopt_bf16_pair(int64_t rows, int64_t cols, OperandCuda& row, OperandCuda& col);

  // fprop.w and dgrad.w (W and W^T, from w = W [rows x cols]) from one NVFP4 16x16 pass when both
  // operands are NVFP4 16x16 with round-to-nearest-even, rowwise `row_op` and columnwise `col_op`
  // (one amax; each code encoded once, written to both: nibble::cuda::nvfp4_quantize_tile16).
  // Returns false, leaving both operands untouched, when that pass does not apply (other recipes, shapes
  // the tiles cannot take, an unaligned w): then make() each. Same bits either way.
  // decoded: the pass writes W's decoded BF16 values and no packed copies, and both operands read
  // those values: the tiles give W and W^T the same values, so W^T's are W's read with a transpose
  // flag (`col` reads `row`'s buffer, so `row` must outlive `col`'s use). Neither has_packed() then.
  // jobs (FP32 w only): the 16x16 pass is added to them instead of launched, for a caller that
  // quantizes many weights in one launch (nibble::cuda::nvfp4_quantize_tile16_jobs) before any GEMM
  // reads them; an amax pass, where w's amax was not produced, still runs here.
  template <typename T>
  static bool make_tile16_pair(const T* w, int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                               Operand col_op, uint64_t seed, OperandCuda& row, OperandCuda& col, cudaStream_t stream,
                               bool decoded = false, std::vector<nibble::cuda::Tile16Job>* jobs = nullptr);
  // For a producer that writes w (the optimizer, train/cuda/adamw_cuda.h ParamTensor::amax): the
  // slots for max |w| when make_tile16_pair(w [rows x cols], recipe, row_op, col_op, .., row, ..)
  // applies; empty otherwise. The next make_tile16_pair into `row` then reads that word instead of
  // running its amax pass (the producer must run between the two, in the same stream);
  // drop_produced_amax() forgets it (w written by someone else).
  static nibble::cuda::AmaxSlots tile16_producer_amax(const void* w, int64_t rows, int64_t cols, const Recipe& recipe,
                                                      Operand row_op, Operand col_op, OperandCuda& row,
                                                      cudaStream_t stream);
  void drop_produced_amax() { produced_amax_ = {}; }

  // The operand as GEMM operand A (op(A) = the operand, [rows x cols]) or B (op(B) = its
  // transpose), in `type`: kBF16, kF32, or the FP8 code type of an FP8 operand. FP4 operands and
  // type changes are decoded into `scratch`, which must stay alive until the GEMM has run; except
  // that an operand with decoded values (has_decoded) is read from them as kBF16.
  GemmMatrix gemm_matrix(GemmType type, bool as_b, DeviceBuffer<uint8_t>& scratch, cudaStream_t stream) const;
  // Whether the last make wrote the decoded BF16 values (asked for, and made by the fused pass or,
  // for W, by the 16x16 pass).
  bool has_decoded() const { return valid() && decoded_valid_; }
  // Whether a quantized operand has its packed codes and block scales: always, but where the last
  // make asked for the decoded values alone (ForGemm::packed) and got them. Without them the operand
  // feeds BF16 GEMMs only: download, nvfp4_matrix and nvfp4_operand refuse it.
  bool has_packed() const { return valid() && quantized_ && !packed_skipped_; }
  // The type this operand feeds a GEMM in when nothing forces another: FP8 codes, BF16 for
  // FP4 and bf16 operands, FP32 for fp32 operands.
  GemmType native_type() const;
  // Whether the operand has what cuBLASLt's native NVFP4 GEMM reads: NVFP4 codes with one E4M3
  // scale per 16 elements along K (its cols). Both 1x16 blocks and 16x16 tiles qualify: a tile's
  // scale is the scale of each of its 16 rows' 16-element blocks.
  bool native_nvfp4() const;
  // The operand as an NVFP4 GEMM operand A ([rows x cols]) or B (as_b: op(B) = its transpose, stored
  // [rows x cols] = [n x k]): the packed codes in place, and the block scales rearranged into
  // cuBLASLt's tiled layout in `scratch`, which must stay alive until the GEMM has run. Blackwell only
  // (GemmType::kNvfp4); the rearrangement itself runs on any GPU.
  GemmMatrix nvfp4_matrix(bool as_b, DeviceBuffer<uint8_t>& scratch, cudaStream_t stream) const;
  // The operand as Hopper's packed-operand GEMM reads it (tensor/cuda/gemm_nvfp4_sm90.h): codes and
  // block scales in place. Needs native_nvfp4().
  nibble::cuda::Nvfp4Operand nvfp4_operand() const;
  // Device pointer to g (quantized operands), nullptr when the operand carries no tensor scale.
  const float* decode_scale() const { return quantized_ ? decode_scale_.data() : nullptr; }
  // Device pointer to g x g_partner, the alpha of the GEMM with `partner`, when the fused pass that
  // made this operand wrote it (ForGemm::partner) and `partner` has not been made again since;
  // nullptr otherwise.
  const float* alpha_with(const OperandCuda& partner) const {
    return alpha_valid_ && alpha_partner_ == &partner && alpha_partner_made_ == partner.made_ ? alpha_.data() : nullptr;
  }

  int64_t rows() const { return rows_; }  // of the operand (transposed for columnwise ones)
  int64_t cols() const { return cols_; }
  bool valid() const { return rows_ > 0; }
  void reset() {
    rows_ = cols_ = 0;
    decoded_valid_ = packed_skipped_ = false;
    decoded_into_ = nullptr;
  }
  // Bytes that represent the operand: packed codes + block scales + g, or 2 / 4 per element.
  int64_t bytes() const;
  const QuantSpec& spec() const { return spec_; }
  // Copies of the packed buffers (tests).
  QuantizedTensor download() const;
  // Trades this operand's storage for `buffer`, both moved intact (no copy, no reallocation): for a
  // BF16 source written elsewhere while this operand's was still being read
  // (LinearCuda::backward_bf16_input_gelu). The operand must be made again before it is read.
  void swap_storage(DeviceBuffer<uint8_t>& buffer) { std::swap(data_, buffer); }
  // Keeps the decoded BF16 values that the fused pass writes in `storage` (grown as needed, outliving
  // this operand) instead of a buffer of its own: for operands that are never needed at the same time
  // and so can take turns in one buffer (LinearContext's x_rows, read by Fprop alone, and dy_rows,
  // read by Dgrad alone). Making one such operand overwrites the other's values.
  void share_decoded_storage(DeviceBuffer<uint16_t>& storage) { external_decoded_ = &storage; }

 private:
  // Starts a new operand [rows x cols] as the GEMM reads it: every state field but the spec and the
  // byte counts is set here (the buffers keep their memory), so that no make path carries state
  // over from the operand made before.
  void begin(OperandFormat format, bool quantized, int64_t rows, int64_t cols, ForGemm for_gemm = {});
  void allocate_packed(const QuantSpec& spec, int64_t q_rows, int64_t q_cols);
  // Both operands of make_pair unquantized, the same and without RHT (rowwise `row_op`, columnwise
  // `col_op`): one copy of the values serves both.
  static bool shared_pair_applies(const Recipe& recipe, Operand row_op, Operand col_op);
  // Whether make_pair runs the fused NVFP4 pass over x [rows x cols] (the only one that runs a tail).
  static bool fused_pair_applies(int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op, Operand col_op);
  // `this` reads the values of `source`, a columnwise operand stored as its source tensor [rows x cols].
  void share_values_of(const OperandCuda& source, int64_t rows, int64_t cols);
  // The fused NVFP4 pass into `row` and/or `col` (nullptr: that side off).
  // `produced`: the amax words a producer computed (producer_amax), or none: the pass's own amax pass.
  template <typename T>
  static void run_fused(const T* x, int64_t rows, int64_t cols, const nibble::cuda::RowColSpec& s,
                        AmaxSlotPair& amax, OperandCuda* row, OperandCuda* col, cudaStream_t stream,
                        nibble::cuda::AmaxSlots produced = {});
  // A quantizing pass's outputs for this operand: the packed buffers and, where make asked for them
  // and the pass can write them (`decoded`, `alpha`), the decoded values and the GEMM alpha, which
  // are then marked valid.
  nibble::cuda::QuantBuffers pass_buffers(bool decoded, bool alpha);
  // Whether make_tile16_pair makes the pair from w [rows x cols].
  static bool tile16_pair_applies(const void* w, int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                                  Operand col_op);
  // The NVFP4 16x16 pass of w into `row` (W, with its decoded values where asked for) and/or `col`
  // (W^T) (nullptr: that side off). `produced`: max |w| from its producer, or none: an amax pass.
  // jobs: as make_tile16_pair's.
  template <typename T>
  static void run_tile16(const T* w, int64_t rows, int64_t cols, AmaxSlotPair& amax, OperandCuda* row,
                         OperandCuda* col, cudaStream_t stream, nibble::cuda::AmaxSlots produced = {},
                         std::vector<nibble::cuda::Tile16Job>* jobs = nullptr);

  // make_pair's tail: the decode that gemm_matrix(kBF16, ..) would run for this packed NVFP4 operand,
  // into `into` (grown for it), as a job for the fused pass; empty where gemm_matrix would not decode
  // the packed codes.
  nibble::cuda::TailDecode bf16_decode_job(DeviceBuffer<uint8_t>& into) const;

  int64_t rows_ = 0, cols_ = 0;
  bool quantized_ = false;
  // An unquantized columnwise operand without RHT is stored untransposed (as the source tensor);
  // the GEMM reads it with a transpose flag instead of a copy.
  bool stored_as_source_ = false;
  OperandFormat format_ = OperandFormat::kFp32;
  QuantSpec spec_{};
  // The values of an unquantized operand: its own buffer, or those of the operand it shares them
  // with (make_pair), which must outlive this one's use.
  const uint8_t* values() const { return shared_values_ ? shared_values_ : data_.data(); }

  const uint8_t* shared_values_ = nullptr;
  // Buffers only grow; data_bytes_ and scale_bytes_ say how much of them the operand uses.
  DeviceBuffer<uint8_t> data_;    // packed codes, or the BF16/FP32 values of an unquantized operand
  DeviceBuffer<uint8_t> scales_;  // block scale codes
  int64_t data_bytes_ = 0, scale_bytes_ = 0;
  DeviceBuffer<float> decode_scale_;
  AmaxSlotPair amax_;  // the quantizer's amax
  // Given out by producer_amax (tile16_producer_amax), for the next make_pair (make_tile16_pair).
  nibble::cuda::AmaxSlots produced_amax_{};
  // The decoded BF16 values [rows x cols] that the fused pass writes when asked (grow-only like the
  // buffers above): decoded_wanted_ is the request of the make in progress, which run_fused and
  // run_tile16 read.
  DeviceBuffer<uint16_t> decoded_;
  DeviceBuffer<uint16_t>* external_decoded_ = nullptr;  // share_decoded_storage's, in place of decoded_
  DeviceBuffer<uint16_t>& decoded_buffer() { return external_decoded_ ? *external_decoded_ : decoded_; }
  const uint16_t* decoded_values() const { return (external_decoded_ ? *external_decoded_ : decoded_).data(); }
  bool decoded_wanted_ = false, decoded_valid_ = false;
  // The decoded values of another operand, stored as this one's source tensor (make_tile16_pair's
  // W^T reading W's): read in place of decoded_, transposed.
  const uint16_t* shared_decoded_ = nullptr;
  const uint8_t* decoded_into_ = nullptr;  // decoded_into's: this operand's BF16 values, decoded by another kernel
  // ForGemm::packed of the make in progress, and whether its pass wrote the decoded values alone.
  bool packed_wanted_ = true, packed_skipped_ = false;
  // Counts the operands begun in this object (alpha_with's check that a partner is unchanged).
  uint64_t made_ = 0;
  // The GEMM alpha the fused pass writes (ForGemm::partner): requested for alpha_partner_ as made
  // alpha_partner_made_-th; valid once run_fused has launched the pass.
  DeviceBuffer<float> alpha_;
  const OperandCuda* alpha_partner_ = nullptr;
  uint64_t alpha_partner_made_ = 0;
  bool alpha_valid_ = false;
};

// The types two operands meet in a GEMM (a: M x K, b: N x K): their FP8 code types when both are
// FP8, not both E5M2, and M, N, K are multiples of 16 (what Hopper's FP8 kernels take); FP32 when
// either is FP32; BF16 otherwise (FP8 values are exact in BF16, so the fallback changes no value).
std::pair<GemmType, GemmType> gemm_types(const OperandCuda& a, const OperandCuda& b);

// Whether the GEMM of a (M x K) and b (N x K) runs in cuBLASLt's native NVFP4 GEMM instead of
// decoding both to BF16: `native_available` (the device has compute capability >= 10.0, see
// LinearContext::native_fp4), both operands native_nvfp4(), and M, N multiples of 16 and K of 32
// (what GemmRunner's kNvfp4 takes). The two paths multiply the same values (E2M1 x E4M3 is exact
// in BF16) and differ only in the order of FP32 accumulation.
bool use_native_nvfp4(const OperandCuda& a, const OperandCuda& b, bool native_available);

}  // namespace nibble::nn::cuda
