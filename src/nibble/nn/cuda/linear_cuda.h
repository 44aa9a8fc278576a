// The linear layer on the GPU: the device twin of nn::Linear (../linear.h), with the same
// recipe, operand layouts, seeds and saved activations. Activations are FP32 device arrays;
// every call is ordered on the given stream and waits on nothing, except when a buffer grows
// (cudaMalloc/cudaFree, the first call at a new largest shape) and in upload_weight (a plain copy).
//
//   forward(X [tokens x in]) -> Y [tokens x out]         Fprop  Y  = X W^T
//   backward(dY) -> dX [tokens x in], dW += dY^T X      Dgrad, Wgrad
//
// Operands are prepared by OperandCuda (quantized, packed, RHT where the recipe says); the GEMMs
// run in cuBLASLt (BF16 tensor cores for BF16 and FP4-decoded operands, FP8 tensor cores for FP8,
// FP32 for fp32) with FP32 accumulation and alpha = g_a * g_b on the device. The results equal the
// CPU layer's up to FP32 accumulation order, except FP8 x FP8 GEMMs, whose tensor cores accumulate
// in about 14 bits between promotions (docs/numerics.md, "GEMMs").
//
// On Blackwell (compute capability >= 10.0) a GEMM whose two operands are NVFP4 with 16-element
// blocks along K (1x16, or the 16x16 weight tiles) runs in cuBLASLt's native block-scaled FP4 GEMM
// instead of the BF16 decode (use_native_nvfp4 in operand_cuda.h): same operand values, FP32
// accumulation in another order. Compiled for sm_100a but never run on hardware (README).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "nibble/nn/cuda/operand_cuda.h"
#include "nibble/nn/linear.h"

namespace nibble::nn::cuda {

// What the linear layers of one stream share: the GEMM runner, the per-GEMM temporaries (decoded
// operands, alpha) and the operands that live only inside one call.
struct LinearContext {
  LinearContext() {
    x_rows.share_decoded_storage(rows_decoded);
    dy_rows.share_decoded_storage(rows_decoded);
  }
  LinearContext(const LinearContext&) = delete;  // the operands point into rows_decoded
  LinearContext& operator=(const LinearContext&) = delete;

  nibble::cuda::GemmRunner gemm;
  DeviceBuffer<uint8_t> scratch_a, scratch_b;
  DeviceBuffer<float> alpha{1};
  OperandCuda x_rows, dy_rows, dy_cols;
  // x_rows' and dy_rows' decoded BF16 values (the Hopper decode path), in turns: Fprop reads x_rows
  // within the forward call that makes it, Dgrad dy_rows within the backward call (one buffer of
  // tokens x the widest layer fewer: 100 MB at GPT-2 124M).
  DeviceBuffer<uint16_t> rows_decoded;
  // NVFP4 x NVFP4 GEMMs run natively (Blackwell) when true: set from the device at construction;
  // set it false to force the Hopper path (BF16 decode) on a Blackwell GPU, e.g. to compare.
  bool native_fp4 = nibble::cuda::native_fp4_available();
  // On the BF16 decode path, the fused NVFP4 pass that makes x_rows, dy_rows and dy_cols also writes
  // their decoded BF16 values, which the GEMMs read instead of decoding the packed codes in a
  // separate pass, and then no packed codes (the saved X^T stays packed only); and the 16x16 weight
  // pass writes W's decoded values alone, which Fprop and Dgrad both read (no packed W and W^T).
  // Set false for the packed copies and the separate decode passes (same values).
  bool fused_decode = true;
  // On Hopper, when true, NVFP4 x NVFP4 GEMMs whose sizes the kernel takes read the packed operands
  // and decode them in their operand load (tensor/cuda/gemm_nvfp4_sm90.h): no decoded copies are
  // written (same values as the BF16 decode path, another FP32 accumulation order). Off by default:
  // that kernel is still slower than decode + cuBLASLt (docs/benchmarks.md).
  bool packed_gemm = false;
  // Whether bf16_input_amax / bf16_dy_amax hand the fused pass's amax to the producer of the BF16
  // input (false: the pass computes its own; same bits). producer_amaxes counts those handed out.
  bool producer_amax = true;
  int64_t producer_amaxes = 0;
  DeviceBuffer<float> split_workspace;  // the packed-operand GEMM's partial sums when it splits K
  // A quantized layer's BF16 input (X or dY) as its producer writes it (LinearCuda::bf16_input).
  DeviceBuffer<bf16_t> bf16_input;
  // Whether the GPU model runs the MLP's GELU in its linear layers' GEMM epilogues where they take it
  // (LinearCuda::forward_bf16_input_gelu, backward_bf16_input_gelu; GptCuda::set_gelu_in_gemm);
  // false: the activation kernels. Not the same bits: the epilogue applies GELU (GELU') to the FP32
  // GEMM result, the kernels to the result rounded to BF16.
  bool gelu_in_gemm = true;
  // Whether a layer's Wgrad writes dW (beta = 0) at micro-batch 0 of a step (set_step's microbatch)
  // instead of adding to it: for a caller that would otherwise zero the gradients before each step
  // (GptCuda::set_first_microbatch_writes_grads). Off: dW always accumulates.
  bool first_microbatch_writes_grads = false;
  // Whether the fused dY pass also decodes the saved X^T for Wgrad, after its tiles, into
  // x_t_decoded (on the Hopper decode path: a launch fewer per backward; the same bits). Off: Wgrad's
  // operand decode runs in a pass of its own.
  bool decode_x_t_in_dy_pass = true;
  DeviceBuffer<uint8_t> x_t_decoded;
  int64_t x_t_decodes_in_dy_pass = 0;  // backward calls whose dY pass decoded X^T
  // Where backward_bf16_input_gelu's Dgrad writes the next layer's BF16 dY while this layer's dY,
  // held in dy_cols' storage, is still being read; the two buffers then trade places.
  DeviceBuffer<uint8_t> dy_spare;
};

class LinearCuda {
 public:
  // The weight starts at zero; write it through weight() (or upload_weight) and call weight_changed().
  LinearCuda(int64_t in_features, int64_t out_features, Recipe recipe, LinearOptions options, LinearContext& ctx);

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  const Recipe& recipe() const { return recipe_; }
  void set_recipe(Recipe recipe);
  void set_step(uint64_t step, uint32_t microbatch = 0);

  float* weight() { return weight_.data(); }  // device [out x in] FP32 master weight
  // amax_produced (bf16_produced): the writer computed the weight's amax (its BF16 values) where
  // weight_amax_for_writer() (weight_bf16_for_writer()) asked it to (the optimizer); otherwise any
  // such word (values) is stale and dropped.
  void weight_changed(bool amax_produced = false, bool bf16_produced = false);
  void upload_weight(std::span<const float> w);
  // Where to put max |W| for the next quantization of the weight, for the kernel about to write W
  // (the optimizer: train/cuda/adamw_cuda.h ParamTensor::amax), when the weight is quantized by the
  // 16x16 pass and the context's producer_amax is on (counted in producer_amaxes); empty otherwise.
  // Then that writer must compute it, and weight_changed(true) follows.
  nibble::cuda::AmaxSlots weight_amax_for_writer(cudaStream_t stream);
  // Where to put W rounded to BF16 (nearest even), for the kernel about to write W, when both of the
  // weight's GEMM copies are those values (the bf16 recipe: one conversion serves both,
  // OperandCuda::bf16_pair_applies); nullptr otherwise. Then that writer must write them, and after
  // weight_changed(.., true) the next forward takes them for its copies instead of converting W.
  bf16_t* weight_bf16_for_writer();
  float* weight_grad() { return weight_grad_.data(); }  // device [out x in] FP32
  void zero_grad(cudaStream_t stream) { weight_grad_.zero(stream); }

  // y [tokens x out] is overwritten, or with `accumulate` added to (y += X W^T in the GEMM's
  // epilogue: a residual connection without a separate pass).
  void forward(const float* x, int64_t tokens, float* y, cudaStream_t stream, bool accumulate = false);
  // Forward and backward from a BF16 X (dY) written by its producer (a norm, the attention core, the
  // MLP activation; their backward for dY), when no operand made from it is FP32 (takes_bf16_input(),
  // takes_bf16_dy()): write the BF16 values into bf16_input(tokens) (bf16_dy_input()), then call
  // forward_bf16_input() (backward_bf16_input()). This is how the GPU model feeds its linear layers
  // (BF16 activations at linear inputs, as in TransformerEngine), saving the FP32 copy and a pass:
  // - bf16 operands without RHT: the producer writes the operands themselves; the bits of forward()
  //   (backward()) given the FP32 tensor, since both round it to nearest even;
  // - quantized operands (and bf16 with RHT) are made from the BF16 values, i.e. from the tensor
  //   rounded to BF16 first: within 2^-8 relative of what forward() (backward()) quantizes, far below
  //   4-bit or 8-bit quantization error, but not the same bits. The CPU layer quantizes FP32 values.
  // The BF16 input of a quantized recipe lives in the context, shared by its layers: write it just
  // before the call that consumes it.
  // A producer may also compute the amax of the fused NVFP4 pass that will quantize the BF16 values
  // (nibble::cuda::ProducerAmax, from bf16_input_amax() / bf16_dy_amax(), called before it runs;
  // empty where no such pass runs): forward_bf16_input() (backward_bf16_input()) then skips its
  // amax pass. A producer given a non-empty one must compute it.
  bool takes_bf16_input() const;
  bf16_t* bf16_input(int64_t tokens);
  nibble::cuda::ProducerAmax bf16_input_amax(int64_t tokens, cudaStream_t stream);
  void forward_bf16_input(int64_t tokens, float* y, cudaStream_t stream, bool accumulate = false);
  // The same with Y in BF16: the GEMM's epilogue rounds the FP32 result to nearest even (for an
  // output that only BF16 consumers read, e.g. the MLP's fc output; half the bytes). cuBLASLt may
  // pick another algorithm for a BF16 output, so Y can differ from the FP32 Y rounded by the FP32
  // accumulation order: within one BF16 ulp of it (test).
  void forward_bf16_input(int64_t tokens, bf16_t* y, cudaStream_t stream);
  bool takes_bf16_dy() const;
  bf16_t* bf16_dy_input();  // after forward(), for dY [tokens x out]
  nibble::cuda::ProducerAmax bf16_dy_amax(cudaStream_t stream);
  void backward_bf16_input(float* dx, cudaStream_t stream);
  // The same with dX in BF16, rounded by the Dgrad GEMM's epilogue (see forward_bf16_input's BF16 Y).
  void backward_bf16_input(bf16_t* dx, cudaStream_t stream);
  // dx [tokens x in] is overwritten (nullptr: Dgrad skipped); dW accumulates (see
  // LinearContext::first_microbatch_writes_grads).
  void backward(const float* dy, float* dx, cudaStream_t stream);

  // The MLP's GELU in the GEMMs' epilogues (cuBLASLt GELU_AUX / DGELU, tanh form; gemm_cuda.h):
  // - forward_bf16_input_gelu, the up projection's Fprop: the down projection `down`'s BF16 input
  //   act = GELU(X W^T) (where down.forward_bf16_input() reads it) and pre = X W^T, both
  //   [tokens x out] in BF16, rounded from the FP32 result (forward_bf16_input with a BF16 Y and the
  //   activation kernel write RN(Y) and RN(GELU(RN(Y)))). No producer amax: a quantizing `down` runs
  //   its own amax pass over act.
  // - backward_bf16_input_gelu, the down projection's backward: the up projection `up`'s dY =
  //   (dY W) GELU'(pre), rounded once to BF16, where up.backward_bf16_input() reads it. No producer
  //   amax: a quantizing `up` runs its own amax pass over it.
  // Each needs fprop_takes_gelu() (dgrad_takes_gelu()): the GEMM runs in cuBLASLt on BF16 operands
  // (bf16, or FP4 decoded on Hopper's decode path) and the context's gelu_in_gemm is on.
  bool fprop_takes_gelu() const;
  bool dgrad_takes_gelu() const;
  void forward_bf16_input_gelu(int64_t tokens, LinearCuda& down, bf16_t* pre, cudaStream_t stream);
  void backward_bf16_input_gelu(LinearCuda& up, const bf16_t* pre, cudaStream_t stream);
  // Whether bf16_input() (bf16_dy_input()) is the GEMM operand itself (bf16 operands without RHT)
  // rather than the source of a quantizing pass.
  bool bf16_input_is_operand() const;
  bool bf16_dy_is_operand() const;

  // Makes the weight's GEMM copies for the next forward now where they are stale (forward() does
  // otherwise), adding an NVFP4 16x16 pass to `jobs` instead of launching it: the caller launches
  // them all at once (nibble::cuda::nvfp4_quantize_tile16_jobs) before this layer's next GEMM.
  void prepare_weight_copies(cudaStream_t stream, std::vector<nibble::cuda::Tile16Job>& jobs) {
    refresh_weight_copies(stream, &jobs);
  }

  int64_t saved_activation_bytes() const { return saved_x_t_.valid() ? saved_x_t_.bytes() : 0; }
  int64_t weight_quantizations() const { return weight_quantizations_; }
  int64_t weight_bf16_adoptions() const { return weight_bf16_adoptions_; }  // of those, the writer's BF16 values
  // GEMMs this layer has run in the native NVFP4 GEMM (Blackwell), in Hopper's packed-operand GEMM,
  // of all it has run.
  int64_t native_fp4_gemms() const { return native_fp4_gemms_; }
  int64_t packed_gemms() const { return packed_gemms_; }
  int64_t gemms() const { return gemms_; }
  const OperandCuda& saved_x_t() const { return saved_x_t_; }
  // The weight's GEMM copies of this step (fprop.w: W, dgrad.w: W^T), valid after forward().
  const OperandCuda& fprop_w() const { return fprop_w_; }
  const OperandCuda& dgrad_w() const { return dgrad_w_; }

 private:
  std::string context(Operand op) const;
  // What an operand of `rows` rows about to be made prepares for its GEMM with `other`: decoded BF16
  // values where the GEMM reads them (the Hopper decode path; ctx_.fused_decode), and the GEMM's alpha.
  OperandCuda::ForGemm for_gemm_with(const OperandCuda& other, int64_t rows) const;
  // OperandCuda::producer_amax for the pair make_pair will make into `row`, unless the context
  // switches it off; counted in ctx_.producer_amaxes.
  nibble::cuda::ProducerAmax producer_amax(int64_t rows, int64_t cols, Operand row_op, Operand col_op,
                                           OperandCuda& row, cudaStream_t stream);
  // Whether the GEMM of NVFP4 operands a [m x k] and b [n x k] runs in Hopper's packed-operand GEMM.
  bool packed_gemm_applies(int64_t m, const OperandCuda& b) const;
  bool weight_decoded_wanted() const;
  void refresh_weight_copies(cudaStream_t stream, std::vector<nibble::cuda::Tile16Job>* jobs = nullptr);
  // Dgrad (skipped when dx.data is nullptr) and Wgrad from ctx_.dy_rows / dy_cols.
  void backward_gemms(nibble::cuda::GemmOutput dx, cudaStream_t stream);
  void backward_bf16_input_to(nibble::cuda::GemmOutput dx, cudaStream_t stream);
  // forward_bf16_input's X operands from the BF16 X its producer wrote.
  void bf16_x_operands(int64_t tokens, cudaStream_t stream);
  // backward_bf16_input's dY operands from the BF16 dY its producer wrote (with_dx: Dgrad will run).
  void bf16_dy_operands(bool with_dx, cudaStream_t stream);
  // Whether the GEMM of operands a and b runs in cuBLASLt on BF16 values (see fprop_takes_gelu).
  bool gelu_gemm_applies(Operand a, Operand b, int64_t n) const;
  template <typename T>
  void make_x_operands(const T* x, int64_t tokens, cudaStream_t stream);  // ctx_.x_rows and saved_x_t_
  template <typename T>
  void make_dy_operands(const T* dy, bool with_dx, cudaStream_t stream);  // ctx_.dy_rows and dy_cols
  // c [a.rows x b.rows] = g_a g_b A B^T (+ c when accumulate).
  void gemm(const OperandCuda& a, const OperandCuda& b, nibble::cuda::GemmOutput c, bool accumulate,
            cudaStream_t stream, const char* which);
  static nibble::cuda::GemmOutput f32_output(float* c) { return {c, GemmType::kF32}; }
  void forward_bf16_input_to(int64_t tokens, nibble::cuda::GemmOutput y, cudaStream_t stream, bool accumulate);
  uint64_t sr_seed() const { return layer_step_seed(options_.run_seed, options_.layer_id, step_, microbatch_); }
  uint64_t weight_sr_seed() const { return layer_step_seed(options_.run_seed, options_.layer_id, step_, 0); }

  int64_t in_, out_;
  Recipe recipe_;
  LinearOptions options_;
  LinearContext& ctx_;
  uint64_t step_ = 0;
  uint32_t microbatch_ = 0;
  DeviceBuffer<float> weight_, weight_grad_;
  bool weight_copies_valid_ = false;
  // weight_bf16_for_writer() handed out dgrad_w_'s storage since the last weight_changed(); the
  // writer's BF16 values are there (weight_changed(.., true)) for the next refresh_weight_copies.
  bool weight_bf16_handed_out_ = false, weight_bf16_written_ = false;
  int64_t weight_bf16_adoptions_ = 0;
  OperandCuda fprop_w_, dgrad_w_;
  int64_t weight_quantizations_ = 0;
  int64_t native_fp4_gemms_ = 0, packed_gemms_ = 0, gemms_ = 0;
  OperandCuda saved_x_t_;
  int64_t saved_tokens_ = 0;
};

}  // namespace nibble::nn::cuda
