// The GPT on one GPU: the device twin of model::Gpt (../gpt.h), built from a host model whose
// configuration, recipe, parameter names and initial weights it copies. Layers are the CUDA layers
// (nn/cuda): FP32 activations, linear layers through the recipe (LinearCuda), attention's batched
// matmuls and the LM head as BF16 tensor-core GEMMs with FP32 accumulation (the paper's high
// precision; the CPU model computes them in FP32), norms, softmax and loss in FP32. The LM head and
// the loss run a chunk of rows at a time (LmHeadLossCuda): no [tokens x vocab] logits tensor.
//
// The host model stays the home of everything that is not arithmetic: the per-block recipes
// (selective BF16 and the late switch), the parameter list, checkpoints. download_to() and
// upload_from() move the weights between the two.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "nibble/model/gpt.h"
#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/nn/cuda/linear_cuda.h"
#include "nibble/nn/cuda/lm_head_cuda.h"

namespace nibble::model::cuda {

// One parameter tensor on the device, in the order and with the names of Gpt::parameters().
struct DeviceParameter {
  std::string name;
  int64_t count = 0;
  float* value = nullptr;
  float* grad = nullptr;
  bool weight_decay = true;
  // With set_first_microbatch_writes_grads on, a step's micro-batch 0 writes this gradient whole
  // rather than adding to it (linear weights, the LM head's or the tied embedding table): it needs no
  // zeroing before the step. The others (norms, the position and untied token embeddings) do.
  bool written_by_first_microbatch = false;
};

class GptCuda {
 public:
  // Copies host's weights. host must outlive this object.
  GptCuda(Gpt& host, uint64_t run_seed, cudaStream_t stream = nullptr);
  ~GptCuda();
  GptCuda(const GptCuda&) = delete;
  GptCuda& operator=(const GptCuda&) = delete;

  const GptConfig& config() const { return host_.config(); }
  void set_bf16_everywhere(bool on);
  bool bf16_everywhere() const { return host_.bf16_everywhere(); }
  void set_step(uint64_t step, uint32_t microbatch = 0);
  void zero_grad();
  // Micro-batch 0 of a step writes the gradients marked DeviceParameter::written_by_first_microbatch
  // instead of adding to them (their Wgrad GEMMs with beta = 0), so a caller zeroes only the others
  // (CudaEngine). Off by default: every backward adds.
  void set_first_microbatch_writes_grads(bool on);

  // As Gpt::forward_backward / Gpt::loss, with host token ids; returns the mean loss (waits for it).
  double forward_backward(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                          int64_t seq, float grad_scale = 1.0f);
  double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch, int64_t seq);
  // forward_backward without waiting: the mean loss goes to *loss (device memory) on stream().
  // The host may reuse its vectors at once; check_ids() then reports ids outside the vocabulary.
  void enqueue_forward_backward(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                                int64_t seq, float grad_scale, double* loss);
  // Waits for stream() (once; copies the caller enqueued to pinned memory before it are then done);
  // throws std::out_of_range for the first input id or target outside the vocabulary since the last
  // check (those rows were left out of the step).
  void check_ids();

  // Device views of the parameters and gradients. Writing values (the optimizer) must be followed
  // by weights_changed(), which drops the linear layers' quantized weight copies.
  const std::vector<DeviceParameter>& parameters() const { return params_; }
  // For the optimizer, one per parameter (parameters()' order): where to put max |value| after its
  // update (nn::cuda::LinearCuda::weight_amax_for_writer; empty for all but NVFP4 16x16 weights).
  // The optimizer must then compute each, and call weights_changed(/*amaxes_produced=*/true).
  std::vector<nibble::cuda::AmaxSlots> weight_amaxes_for_optimizer();
  // The same for the weights' BF16 GEMM copies: where to put each parameter's values rounded to BF16
  // after its update (the bf16 linear layers' weights, LinearCuda::weight_bf16_for_writer, and the LM
  // head's weight, LmHeadLossCuda::weight_bf16_for_writer), nullptr for the others; the layers then
  // make no conversion pass of their own. The optimizer must write each, and call
  // weights_changed(.., /*bf16_produced=*/true).
  std::vector<bf16_t*> weight_bf16_for_optimizer();
  void weights_changed(bool amaxes_produced = false, bool bf16_produced = false);

  void upload_from(Gpt& host);  // host weights -> device
  void download_to(Gpt& host);  // device weights -> host (synchronises)
  cudaStream_t stream() const { return stream_; }
  // NVFP4 GEMMs on Hopper through the GEMM that reads the packed operands (LinearContext::packed_gemm)
  // instead of BF16 copies and cuBLASLt.
  void set_packed_fp4_gemm(bool on) { linear_ctx_.packed_gemm = on; }
  // The GELU, the norms and the optimizer (weight_amaxes_for_optimizer) compute the amax of the
  // NVFP4 pass over what they write (LinearContext::producer_amax; default on; same bits either way).
  // Tests.
  void set_producer_amax(bool on) { linear_ctx_.producer_amax = on; }
  // weight_bf16_for_optimizer hands out its pointers (default on; same bits either way). Tests.
  void set_optimizer_bf16_weights(bool on) { optimizer_bf16_weights_ = on; }
  // The linear layers' weight copies taken from the optimizer's BF16 values (LinearCuda::
  // weight_bf16_adoptions), and the LM head's own roundings of its weight. Tests.
  int64_t weight_bf16_adoptions() const;
  int64_t head_weight_roundings() const { return head_.weight_roundings(); }
  int64_t producer_amaxes() const { return linear_ctx_.producer_amaxes; }
  // The MLP's GELU (and its derivative) in the GEMM epilogues of fc (proj2's Dgrad) where those take
  // it (LinearContext::gelu_in_gemm; default on), else the activation kernels. Not the same bits.
  void set_gelu_in_gemm(bool on) { linear_ctx_.gelu_in_gemm = on; }
  // The NVFP4 16x16 passes of all linear layers' weights in one launch at the forward's start
  // (LinearCuda::prepare_weight_copies; default on), else each layer's at its first GEMM. Same bits;
  // tests.
  void set_batched_weight_quantization(bool on) { batched_weight_quantization_ = on; }
  int64_t batched_weight_passes() const { return batched_weight_passes_; }  // weights quantized that way
  // Rows per chunk of the LM head and loss (default: LmHeadLossCuda::default_chunk_rows); tests.
  void set_lm_head_chunk_rows(int64_t rows) { head_.set_chunk_rows(rows); }

 private:
  struct Block;
  // Runs the model up to the final norm's output, the LM head's input, which ends up rounded to BF16
  // in the head (LmHeadLossCuda::bf16_hidden); ids already on device.
  void forward_hidden(int64_t batch, int64_t seq);
  // The LM head's weight and gradient: the token embedding's when tied.
  float* head_weight();
  float* head_grad();
  void upload_tokens(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch, int64_t seq);
  void apply_recipes();
  double read_loss();

  Gpt& host_;
  cudaStream_t stream_;
  nn::cuda::LinearContext linear_ctx_;
  nn::cuda::AttentionWorkspace attn_workspace_;  // shared by the blocks' attention cores
  nn::cuda::EmbeddingCuda tok_embed_;
  std::unique_ptr<nn::cuda::EmbeddingCuda> pos_embed_;
  std::vector<std::unique_ptr<Block>> blocks_;
  nn::cuda::NormCuda norm_f_;
  std::vector<nn::cuda::NormCuda*> norms_;  // every block's two and norm_f_ (their deferred finishes)
  // The LM head and the loss: BF16 GEMMs as under the bf16 recipe, in chunks of rows. With tied
  // embeddings it reads the token embedding and adds its gradient to the table's; otherwise it
  // reads head_weight_ [vocab x d] and accumulates into head_grad_.
  nn::cuda::LmHeadLossCuda head_;
  nn::cuda::DeviceBuffer<float> head_weight_, head_grad_;
  std::vector<DeviceParameter> params_;
  bool batched_weight_quantization_ = true;
  int64_t batched_weight_passes_ = 0;
  std::vector<nibble::cuda::Tile16Job> weight_jobs_;  // forward_hidden's, kept for their capacity
  std::vector<nn::cuda::LinearCuda*> param_linears_;  // the linear layer of each parameter, or nullptr

  uint32_t microbatch_ = 0;  // set_step's
  bool optimizer_bf16_weights_ = true;
  int64_t rows_ = 0;
  nn::cuda::DeviceBuffer<uint32_t> tokens_;           // [2 rows_]: the input ids, then the targets
  nibble::cuda::HostStaging<uint32_t> token_staging_;  // the same on their way up
  const uint32_t* device_ids() const { return tokens_.data(); }
  const uint32_t* device_targets() const { return tokens_.data() + rows_; }
  nn::cuda::DeviceBuffer<float> x_, hidden_, ln_, wide_, wide2_, narrow_, dx_, dtmp_;
  // qkv's output in BF16 (in place of wide_) and a linear layer's dX in BF16 (in place of ln_, wide2_
  // and narrow_), where the layers take BF16.
  nn::cuda::DeviceBuffer<bf16_t> wide16_, ln16_, wide2_16_, narrow16_;
  nn::cuda::DeviceBuffer<double> loss_dev_;
};

}  // namespace nibble::model::cuda
