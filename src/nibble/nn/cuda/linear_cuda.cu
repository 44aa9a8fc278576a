// The GPU linear layer (see linear_cuda.h); the control flow follows ../linear.cpp line for line.
#include "nibble/nn/cuda/linear_cuda.h"

#include <stdexcept>
#include <string>
#include <utility>

namespace nibble::nn::cuda {

LinearCuda::LinearCuda(int64_t in_features, int64_t out_features, Recipe recipe, LinearOptions options,
                       LinearContext& ctx)
    : in_(in_features), out_(out_features), recipe_(std::move(recipe)), options_(options), ctx_(ctx) {
  if (in_ <= 0 || out_ <= 0)
    throw std::invalid_argument("LinearCuda: in_features and out_features must be positive, got " +
                                std::to_string(in_) + " and " + std::to_string(out_));
  validate(recipe_);
  weight_.resize(static_cast<size_t>(in_ * out_));
  weight_.zero();
  weight_grad_.resize(weight_.size());
  weight_grad_.zero();
}

void LinearCuda::set_recipe(Recipe recipe) {
  validate(recipe);
  recipe_ = std::move(recipe);
  weight_changed();
  saved_x_t_.reset();
}

void LinearCuda::set_step(uint64_t step, uint32_t microbatch) {
  if (step != step_) weight_copies_valid_ = false;
  step_ = step;
  microbatch_ = microbatch;
}

void LinearCuda::upload_weight(std::span<const float> w) {
  weight_.upload(w);
  weight_changed();
}

void LinearCuda::weight_changed(bool amax_produced, bool bf16_produced) {
  weight_copies_valid_ = false;
  if (!amax_produced) fprop_w_.drop_produced_amax();
  const bool handed_out = std::exchange(weight_bf16_handed_out_, false);
  weight_bf16_written_ = bf16_produced && handed_out;
}

bf16_t* LinearCuda::weight_bf16_for_writer() {
  if (!OperandCuda::bf16_pair_applies(recipe_, Operand::kFpropW, Operand::kDgradW)) return nullptr;
  weight_bf16_handed_out_ = true;
  return OperandCuda::bf16_pair_source(out_, in_, dgrad_w_);
}

nibble::cuda::AmaxSlots LinearCuda::weight_amax_for_writer(cudaStream_t stream) {
  if (!ctx_.producer_amax) return {};
  const nibble::cuda::AmaxSlots slots = OperandCuda::tile16_producer_amax(
      weight_.data(), out_, in_, recipe_, Operand::kFpropW, Operand::kDgradW, fprop_w_, stream);
  if (slots.current != nullptr) ++ctx_.producer_amaxes;
  return slots;
}

std::string LinearCuda::context(Operand op) const {
  return "LinearCuda[layer " + std::to_string(options_.layer_id) + ", " + std::to_string(in_) + "->" +
         std::to_string(out_) + ", recipe " + recipe_.name + "] " + operand_name(op);
}

bool LinearCuda::packed_gemm_applies(int64_t m, const OperandCuda& b) const {
  return ctx_.packed_gemm && b.native_nvfp4() && nibble::cuda::nvfp4_packed_gemm_shape_ok(m, b.rows(), b.cols());
}

OperandCuda::ForGemm LinearCuda::for_gemm_with(const OperandCuda& other, int64_t rows) const {
  // The decoded values are written only by the fused pass, whose operands are NVFP4 1x16 with rows
  // and cols multiples of 16: their GEMM with `other` (same K, other.cols()) runs natively exactly
  // when use_native_nvfp4 holds for `other` paired with itself, and reads the packed codes when
  // packed_gemm_applies. An FP32 GEMM reads FP32, not BF16. The operands made with this (ctx_'s
  // per-call copies) are read by that GEMM alone, so with decoded values they need no packed copy.
  const bool decoded = ctx_.fused_decode && !use_native_nvfp4(other, other, ctx_.native_fp4) &&
                       !packed_gemm_applies(rows, other) && other.native_type() != GemmType::kF32;
  return {decoded, &other, /*packed=*/!decoded};
}

bool LinearCuda::weight_decoded_wanted() const {
  // Where the weight's GEMMs decode it to BF16 (the Hopper decode path: neither the native nor the
  // packed-operand GEMM takes it), the 16x16 pass writes W's decoded values once a step, for both
  // Fprop and Dgrad (W^T reads them transposed), in place of W's and W^T's packed copies and of two
  // decode passes a step: 2 bytes a weight kept, where the packed copies took 1.125.
  return ctx_.fused_decode && !ctx_.native_fp4 && !ctx_.packed_gemm;
}

void LinearCuda::refresh_weight_copies(cudaStream_t stream, std::vector<nibble::cuda::Tile16Job>* jobs) {
  if (weight_copies_valid_) return;
  const uint64_t seed = weight_sr_seed();
  // Unquantized weights (bf16, fp32): W^T is kept as W is stored, so one conversion serves both GEMMs
  // (make_pair shares it). The paper's weights (NVFP4 16x16, RNE, on both copies): W and W^T from one
  // pass. Anything else: each copy on its own.
  if (weight_bf16_written_ && OperandCuda::bf16_pair_applies(recipe_, Operand::kFpropW, Operand::kDgradW)) {
    // The optimizer wrote W's BF16 values into dgrad_w_ (weight_bf16_for_writer).
    OperandCuda::adopt_bf16_pair(out_, in_, fprop_w_, dgrad_w_);
    ++weight_bf16_adoptions_;
  } else if (!recipe_[Operand::kFpropW].quantized() && !recipe_[Operand::kDgradW].quantized()) {
    try {
      OperandCuda::make_pair(weight_.data(), out_, in_, recipe_, Operand::kFpropW, Operand::kDgradW, seed, fprop_w_,
                             dgrad_w_, stream, {}, {});
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(context(Operand::kFpropW) + ": " + e.what());
    }
  } else if (!OperandCuda::make_tile16_pair(weight_.data(), out_, in_, recipe_, Operand::kFpropW, Operand::kDgradW,
                                            seed, fprop_w_, dgrad_w_, stream, weight_decoded_wanted(), jobs)) {
    for (auto [copy, op] : {std::pair{&fprop_w_, Operand::kFpropW}, std::pair{&dgrad_w_, Operand::kDgradW}}) {
      try {
        copy->make(weight_.data(), out_, in_, recipe_[op], op, recipe_.rht_signs(), seed, stream);
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(context(op) + ": " + e.what());
      }
    }
  }
  weight_copies_valid_ = true;
  ++weight_quantizations_;
}

void LinearCuda::gemm(const OperandCuda& a, const OperandCuda& b, nibble::cuda::GemmOutput c, bool accumulate,
                      cudaStream_t stream, const char* which) {
  // alpha = g_a g_b: written by the fused pass that made a or b (OperandCuda::ForGemm) where it could.
  const float* alpha = nullptr;
  if (a.decode_scale() && b.decode_scale()) {
    alpha = a.alpha_with(b);
    if (alpha == nullptr) alpha = b.alpha_with(a);
    if (alpha == nullptr) {
      nibble::cuda::multiply_scalars(a.decode_scale(), b.decode_scale(), ctx_.alpha.data(), stream);
      alpha = ctx_.alpha.data();
    }
  } else {
    alpha = a.decode_scale() ? a.decode_scale() : b.decode_scale();
  }
  const bool native = use_native_nvfp4(a, b, ctx_.native_fp4);
  const bool packed = !native && a.native_nvfp4() && packed_gemm_applies(a.rows(), b) &&
                      nibble::cuda::nvfp4_packed_gemm_applies(a.rows(), b.rows(), a.cols(), a.nvfp4_operand(),
                                                             b.nvfp4_operand(), c);
  try {
    if (packed) {  // Hopper: FP4 codes and block scales as they are, decoded in the GEMM's operand load
      nibble::cuda::nvfp4_packed_gemm(a.rows(), b.rows(), a.cols(), a.nvfp4_operand(), b.nvfp4_operand(), c, alpha,
                                     accumulate, stream, &ctx_.split_workspace);
    } else {
      GemmMatrix ma, mb;
      if (native) {  // Blackwell: FP4 codes and block scales as they are
        ma = a.nvfp4_matrix(/*as_b=*/false, ctx_.scratch_a, stream);
        mb = b.nvfp4_matrix(/*as_b=*/true, ctx_.scratch_b, stream);
      } else {  // Hopper decode path: FP4 decoded to BF16, FP8 as is, or unquantized
        const auto [ta, tb] = gemm_types(a, b);
        ma = a.gemm_matrix(ta, /*as_b=*/false, ctx_.scratch_a, stream);
        mb = b.gemm_matrix(tb, /*as_b=*/true, ctx_.scratch_b, stream);
      }
      ctx_.gemm.run(a.rows(), b.rows(), a.cols(), ma, mb, c, alpha, accumulate, stream);
    }
  } catch (const std::exception& e) {
    throw std::runtime_error("LinearCuda[layer " + std::to_string(options_.layer_id) + ", recipe " + recipe_.name +
                             "] " + which + " GEMM: " + e.what());
  }
  ++gemms_;
  if (native) ++native_fp4_gemms_;
  if (packed) ++packed_gemms_;
}

void LinearCuda::forward(const float* x, int64_t tokens, float* y, cudaStream_t stream, bool accumulate) {
  if (tokens <= 0) throw std::invalid_argument(context(Operand::kFpropX) + ": tokens must be positive");
  refresh_weight_copies(stream);
  make_x_operands(x, tokens, stream);
  gemm(ctx_.x_rows, fprop_w_, f32_output(y), accumulate, stream, "Fprop");
  saved_tokens_ = tokens;
}

template <typename T>
void LinearCuda::make_x_operands(const T* x, int64_t tokens, cudaStream_t stream) {
  try {
    // fprop.x and the saved wgrad.x (X^T) from X, in one pass when both are NVFP4. X's Fprop copy is
    // used at once, so it may carry decoded values (and the Fprop alpha); the saved X^T stays packed.
    OperandCuda::make_pair(x, tokens, in_, recipe_, Operand::kFpropX, Operand::kWgradX, sr_seed(), ctx_.x_rows,
                           saved_x_t_, stream, for_gemm_with(fprop_w_, tokens), /*col_gemm=*/{});
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(context(Operand::kFpropX) + ": " + e.what());
  }
}

template <typename T>
void LinearCuda::make_dy_operands(const T* dy, bool with_dx, cudaStream_t stream) {
  try {
    // Wgrad's X^T decoded by the fused dY pass (its blocks, after their tiles) where Wgrad would decode
    // it to BF16 (the Hopper decode path), into a buffer of its own that nothing reads until Wgrad
    // (make_pair grows it only where that pass runs).
    OperandCuda::TailRequest tail;
    if (ctx_.decode_x_t_in_dy_pass && weight_decoded_wanted()) tail = {&saved_x_t_, &ctx_.x_t_decoded};
    const bool x_t_decoded =
        OperandCuda::make_pair(dy, saved_tokens_, out_, recipe_, Operand::kDgradDy, Operand::kWgradDy, sr_seed(),
                               ctx_.dy_rows, ctx_.dy_cols, stream,
                               with_dx ? for_gemm_with(dgrad_w_, saved_tokens_) : OperandCuda::ForGemm{},
                               for_gemm_with(saved_x_t_, out_), tail);
    // Otherwise Wgrad decodes X^T itself: x_t_decoded may hold another layer's values by now.
    saved_x_t_.decoded_into(x_t_decoded ? ctx_.x_t_decoded.data() : nullptr);
    if (x_t_decoded) ++ctx_.x_t_decodes_in_dy_pass;
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(context(Operand::kDgradDy) + ": " + e.what());
  }
}

bool LinearCuda::takes_bf16_input() const {
  return recipe_[Operand::kFpropX].format != OperandFormat::kFp32 &&
         recipe_[Operand::kWgradX].format != OperandFormat::kFp32;
}

bool LinearCuda::takes_bf16_dy() const {
  return recipe_[Operand::kDgradDy].format != OperandFormat::kFp32 &&
         recipe_[Operand::kWgradDy].format != OperandFormat::kFp32;
}

bf16_t* LinearCuda::bf16_input(int64_t tokens) {
  // The operands themselves, where they are the BF16 values.
  if (bf16_input_is_operand()) return OperandCuda::bf16_pair_source(tokens, in_, saved_x_t_);
  ctx_.bf16_input.reserve(static_cast<size_t>(tokens * in_));
  return ctx_.bf16_input.data();
}

nibble::cuda::ProducerAmax LinearCuda::producer_amax(int64_t rows, int64_t cols, Operand row_op, Operand col_op,
                                                     OperandCuda& row, cudaStream_t stream) {
  if (!ctx_.producer_amax) return {};
  const nibble::cuda::ProducerAmax amax = OperandCuda::producer_amax(rows, cols, recipe_, row_op, col_op, row, stream);
  if (amax) ++ctx_.producer_amaxes;
  return amax;
}

nibble::cuda::ProducerAmax LinearCuda::bf16_input_amax(int64_t tokens, cudaStream_t stream) {
  return producer_amax(tokens, in_, Operand::kFpropX, Operand::kWgradX, ctx_.x_rows, stream);
}

nibble::cuda::ProducerAmax LinearCuda::bf16_dy_amax(cudaStream_t stream) {
  return producer_amax(saved_tokens_, out_, Operand::kDgradDy, Operand::kWgradDy, ctx_.dy_rows, stream);
}

void LinearCuda::forward_bf16_input(int64_t tokens, float* y, cudaStream_t stream, bool accumulate) {
  forward_bf16_input_to(tokens, f32_output(y), stream, accumulate);
}

void LinearCuda::forward_bf16_input(int64_t tokens, bf16_t* y, cudaStream_t stream) {
  forward_bf16_input_to(tokens, nibble::cuda::GemmOutput{y, GemmType::kBF16}, stream, /*accumulate=*/false);
}

void LinearCuda::forward_bf16_input_to(int64_t tokens, nibble::cuda::GemmOutput y, cudaStream_t stream,
                                       bool accumulate) {
  bf16_x_operands(tokens, stream);
  gemm(ctx_.x_rows, fprop_w_, y, accumulate, stream, "Fprop");
  saved_tokens_ = tokens;
}

void LinearCuda::bf16_x_operands(int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0) throw std::invalid_argument(context(Operand::kFpropX) + ": tokens must be positive");
  if (!takes_bf16_input())
    throw std::logic_error(context(Operand::kFpropX) + ": the recipe keeps an FP32 copy of X");
  refresh_weight_copies(stream);
  if (bf16_input_is_operand())
    OperandCuda::adopt_bf16_pair(tokens, in_, ctx_.x_rows, saved_x_t_);
  else
    make_x_operands(ctx_.bf16_input.data(), tokens, stream);
}

void LinearCuda::backward(const float* dy, float* dx, cudaStream_t stream) {
  if (!saved_x_t_.valid())
    throw std::logic_error(context(Operand::kWgradX) + ": backward() without a forward() to pair with");
  refresh_weight_copies(stream);
  make_dy_operands(dy, dx != nullptr, stream);
  backward_gemms(f32_output(dx), stream);
}

bf16_t* LinearCuda::bf16_dy_input() {
  if (!saved_x_t_.valid())
    throw std::logic_error(context(Operand::kWgradX) + ": bf16_dy_input() without a forward() to pair with");
  if (bf16_dy_is_operand()) return OperandCuda::bf16_pair_source(saved_tokens_, out_, ctx_.dy_cols);
  ctx_.bf16_input.reserve(static_cast<size_t>(saved_tokens_ * out_));
  return ctx_.bf16_input.data();
}

void LinearCuda::backward_bf16_input(float* dx, cudaStream_t stream) { backward_bf16_input_to(f32_output(dx), stream); }
void LinearCuda::backward_bf16_input(bf16_t* dx, cudaStream_t stream) {
  backward_bf16_input_to(nibble::cuda::GemmOutput{dx, GemmType::kBF16}, stream);
}

void LinearCuda::backward_bf16_input_to(nibble::cuda::GemmOutput dx, cudaStream_t stream) {
  bf16_dy_operands(dx.data != nullptr, stream);
  backward_gemms(dx, stream);
}

void LinearCuda::bf16_dy_operands(bool with_dx, cudaStream_t stream) {
  if (!saved_x_t_.valid())
    throw std::logic_error(context(Operand::kWgradX) + ": backward() without a forward() to pair with");
  if (!takes_bf16_dy())
    throw std::logic_error(context(Operand::kDgradDy) + ": the recipe keeps an FP32 copy of dY");
  refresh_weight_copies(stream);
  if (bf16_dy_is_operand())
    OperandCuda::adopt_bf16_pair(saved_tokens_, out_, ctx_.dy_rows, ctx_.dy_cols);
  else
    make_dy_operands(ctx_.bf16_input.data(), with_dx, stream);
}

bool LinearCuda::bf16_input_is_operand() const {
  return OperandCuda::bf16_pair_applies(recipe_, Operand::kFpropX, Operand::kWgradX);
}

bool LinearCuda::bf16_dy_is_operand() const {
  return OperandCuda::bf16_pair_applies(recipe_, Operand::kDgradDy, Operand::kWgradDy);
}

bool LinearCuda::gelu_gemm_applies(Operand a, Operand b, int64_t n) const {
  // BF16 operands, or FP4 ones that the decode path turns into BF16 (not the native or packed GEMMs);
  // the epilogue's GELU input needs a leading dimension (n) that is a multiple of 8.
  const auto bf16_in_cublaslt = [&](Operand op) {
    const OperandFormat f = recipe_[op].format;
    return f == OperandFormat::kBf16 || (is_fp4(f) && !ctx_.native_fp4 && !ctx_.packed_gemm);
  };
  return ctx_.gelu_in_gemm && bf16_in_cublaslt(a) && bf16_in_cublaslt(b) && n % 8 == 0;
}

bool LinearCuda::fprop_takes_gelu() const {
  return takes_bf16_input() && gelu_gemm_applies(Operand::kFpropX, Operand::kFpropW, out_);
}

bool LinearCuda::dgrad_takes_gelu() const {
  return takes_bf16_dy() && gelu_gemm_applies(Operand::kDgradDy, Operand::kDgradW, in_);
}

void LinearCuda::forward_bf16_input_gelu(int64_t tokens, LinearCuda& down, bf16_t* pre, cudaStream_t stream) {
  if (!fprop_takes_gelu())
    throw std::logic_error(context(Operand::kFpropX) + ": this Fprop GEMM takes no GELU epilogue");
  if (&down.ctx_ != &ctx_ || down.in_ != out_ || !down.takes_bf16_input())
    throw std::logic_error(context(Operand::kFpropX) + ": " + down.context(Operand::kFpropX) +
                           " is not the layer above in this context, taking a BF16 input");
  bf16_x_operands(tokens, stream);
  // down's BF16 input, asked for only now: a quantizing `down` reads ctx_.bf16_input, which held this
  // layer's X until its operands were made (and may grow). The GEMM reads those operands, not it.
  bf16_t* act = down.bf16_input(tokens);
  gemm(ctx_.x_rows, fprop_w_,
       nibble::cuda::GemmOutput{act, GemmType::kBF16, 0, nibble::cuda::GemmEpilogue::kGeluAux, pre},
       /*accumulate=*/false, stream, "Fprop");
  saved_tokens_ = tokens;
}

void LinearCuda::backward_bf16_input_gelu(LinearCuda& up, const bf16_t* pre, cudaStream_t stream) {
  if (!dgrad_takes_gelu())
    throw std::logic_error(context(Operand::kDgradDy) + ": this Dgrad GEMM takes no GELU epilogue");
  if (&up.ctx_ != &ctx_ || up.out_ != in_ || !up.saved_x_t_.valid() || up.saved_tokens_ != saved_tokens_ ||
      !up.takes_bf16_dy())
    throw std::logic_error(context(Operand::kDgradDy) + ": " + up.context(Operand::kDgradDy) +
                           " is not the layer below in this context, waiting for a BF16 dY");
  bf16_dy_operands(/*with_dx=*/true, stream);
  // up's BF16 dY goes where up.bf16_dy_input() points, except when that is dy_cols' storage, which
  // still holds this layer's dY (read by both GEMMs): then into the spare, which takes its place after.
  // (A quantizing `up` reads ctx_.bf16_input, which this layer's operands were made from already.)
  const bool spare = up.bf16_dy_is_operand();
  bf16_t* dpre = nullptr;
  if (spare) {
    ctx_.dy_spare.reserve(static_cast<size_t>(saved_tokens_ * in_) * sizeof(bf16_t));
    dpre = reinterpret_cast<bf16_t*>(ctx_.dy_spare.data());
  } else {
    dpre = up.bf16_dy_input();
  }
  backward_gemms(nibble::cuda::GemmOutput{dpre, GemmType::kBF16, 0, nibble::cuda::GemmEpilogue::kGeluGrad,
                                          const_cast<bf16_t*>(pre)},
                 stream);
  if (spare) {
    ctx_.dy_cols.swap_storage(ctx_.dy_spare);
    // dy_rows still points into the old storage, now the spare's: neither operand is valid until
    // up's backward adopts the new dY.
    ctx_.dy_rows.reset();
    ctx_.dy_cols.reset();
  }
}

void LinearCuda::backward_gemms(nibble::cuda::GemmOutput dx, cudaStream_t stream) {
  // Dgrad: dX [tokens x in] = dY [tokens x out] . (W^T [in x out])^T
  if (dx.data != nullptr) gemm(ctx_.dy_rows, dgrad_w_, dx, /*accumulate=*/false, stream, "Dgrad");
  // Wgrad: dW [out x in] += dY^T [out x tokens] . (X^T [in x tokens])^T (= at a step's first micro-batch
  // where the context says so)
  const bool overwrite = ctx_.first_microbatch_writes_grads && microbatch_ == 0;
  gemm(ctx_.dy_cols, saved_x_t_, f32_output(weight_grad_.data()), /*accumulate=*/!overwrite, stream, "Wgrad");
  saved_x_t_.reset();
}

}  // namespace nibble::nn::cuda
