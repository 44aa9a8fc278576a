// The LM head and the softmax cross-entropy loss on the GPU, a chunk of rows at a time, so that the
// [tokens x vocab] logits never exist in full (GPT-2 124M at 16 x 1024 tokens: 1.6 GB in BF16):
//
//   logits = H W^T               BF16 operands, FP32 accumulation, BF16 out (W [vocab x d], H [tokens x d])
//   loss   = mean_r -log softmax(logits_r)[target_r]            (CrossEntropyCuda, FP32 exps, row sums in double)
//   dH     = dlogits W           dlogits in BF16, FP32 out
//   dW    += dlogits^T H         FP32, accumulated over the chunks (GEMM beta = 1)
//
// Per chunk, the Fprop GEMM writes the chunk's logits rounded to BF16 (nearest even, in its
// epilogue), the fused loss kernel turns them into the rows' losses and, in place, the BF16 dlogits
// that the two backward GEMMs read, and those GEMMs run on the chunk. This is the bf16 recipe's
// arithmetic for a linear layer (the LM head stays in high precision: H, W and dlogits rounded to
// BF16, FP32 accumulation) with the logits in BF16, as PyTorch autocast and TransformerEngine give
// them: half the bytes of FP32 for the GEMM to write and the loss to read and write (docs/numerics.md
// has what it changes against the CPU's FP32 logits). Against the unchunked head (LinearCuda under
// bf16, its FP32 logits rounded to BF16, CrossEntropyCuda::forward_backward): the logits, losses and
// BF16 dlogits are the same numbers (row-wise math; the GEMM kernel may differ with the chunk's row
// count, which only reorders each logit's FP32 sum), dH rows likewise, and dW differs in the order
// of its FP32 additions (per chunk, then across chunks).
//
// The weight is read through a pointer on each call (the head's own weight, or the token embedding
// with tied embeddings); its BF16 copy is made on the first call after weight_changed(). The
// gradient accumulates into the caller's FP32 buffer, so with tied embeddings it lands in the
// embedding table's gradient directly, as in the CPU model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/tensor/cuda/gemm_cuda.h"

namespace nibble::nn::cuda {

class LmHeadLossCuda {
 public:
  // A chunk's BF16 logits (which become its dlogits) take at most about this much memory: small
  // next to the activations (GPT-2 124M at 16 x 1024 tokens: 4 chunks of 4096 rows, 0.38 GiB instead
  // of 1.6 GiB for all rows), and large enough that each chunk's GEMMs stay large. The price of a
  // chunk is one read-modify-write of dW (vocab x d x 8 bytes, 0.3 GB for GPT-2).
  // bench/layers_bench_cuda.cu times several sizes; on an H200 (session 22), head + loss for 16k GPT-2
  // rows took 8.0-8.1 ms in 7 chunks, 7.6-7.8 in 4 (the default), 7.6-7.8 in one piece.
  static constexpr int64_t kChunkLogitBytes = int64_t{512} << 20;
  // Most rows a chunk takes for this vocabulary: kChunkLogitBytes of BF16 logits, rounded down to a
  // multiple of 64 rows (at least 64).
  static int64_t default_chunk_rows(int64_t vocab);

  // `gemm` is borrowed and must outlive the head.
  LmHeadLossCuda(int64_t d_model, int64_t vocab, nibble::cuda::GemmRunner& gemm);

  int64_t d_model() const { return d_; }
  int64_t vocab() const { return vocab_; }
  int64_t chunk_rows() const { return chunk_rows_; }
  void set_chunk_rows(int64_t rows);  // tests and tuning; positive
  // The rows of each chunk for a call over `rows`: as few chunks as chunk_rows() allows, of equal
  // size (the last one may be shorter): a short last chunk would cost a whole pass over dW.
  int64_t rows_per_chunk(int64_t rows) const;
  // The weight's values changed (optimizer step, upload): re-round the BF16 copy on the next call,
  // unless bf16_produced: the writer put their rounding where weight_bf16_for_writer() asked it to.
  void weight_changed(bool bf16_produced = false) {
    weight_valid_ = bf16_produced && writer_source_ != nullptr;
    if (weight_valid_) weight_source_ = writer_source_;
    writer_source_ = nullptr;
  }
  // Where to put `weight` [vocab x d] rounded to BF16 (nearest even) for the kernel about to write it
  // (the optimizer: train/cuda/adamw_cuda.h ParamTensor::bf16): the head's BF16 copy, which the next
  // call then takes after weight_changed(true) instead of rounding the weight itself.
  bf16_t* weight_bf16_for_writer(const float* weight) {
    weight_bf16_.reserve(static_cast<size_t>(vocab_ * d_));
    writer_source_ = weight;
    return reinterpret_cast<bf16_t*>(weight_bf16_.data());
  }

  // Evaluation: *loss_mean (device) = the mean loss of hidden [rows x d] against targets (device ids).
  void loss(const float* weight, const float* hidden, const uint32_t* targets, int64_t rows, double* loss_mean,
            cudaStream_t stream);
  // Training: also dhidden [rows x d] (overwritten) = d(loss * grad_scale)/d(hidden) and
  // weight_grad [vocab x d] += d(loss * grad_scale)/dW, where grad_scale is the scale of each row's
  // logit gradient as in CrossEntropyCuda (the model passes grad_scale / rows for the mean loss);
  // non-zero (std::invalid_argument otherwise).
  // overwrite_grad: the first chunk's Wgrad writes weight_grad (beta = 0) instead of adding to it.
  void forward_backward(const float* weight, const float* hidden, const uint32_t* targets, int64_t rows,
                        float grad_scale, double* loss_mean, float* dhidden, float* weight_grad, cudaStream_t stream,
                        bool overwrite_grad = false);
  // The same two with hidden written in BF16 (nearest even: the rounding the calls above apply to
  // their FP32 hidden) by its producer into bf16_hidden(rows) beforehand: the GPU model's final norm,
  // which saves the head a pass over the FP32 rows (and their buffer).
  bf16_t* bf16_hidden(int64_t rows);
  // Writes FP32 hidden [rows x d] there, rounded (what the FP32 forms above do first).
  void round_hidden(const float* hidden, int64_t rows, cudaStream_t stream);
  void loss_bf16_hidden(const float* weight, const uint32_t* targets, int64_t rows, double* loss_mean,
                        cudaStream_t stream);
  void forward_backward_bf16_hidden(const float* weight, const uint32_t* targets, int64_t rows, float grad_scale,
                                    double* loss_mean, float* dhidden, float* weight_grad, cudaStream_t stream,
                                    bool overwrite_grad = false);

  // Throws std::out_of_range for the first target >= vocab since the last check (synchronises); or
  // in two halves around the caller's wait (see EmbeddingCuda::check_ids).
  void check_ids(cudaStream_t stream) { loss_.check_ids(vocab_, stream); }
  void read_ids(cudaStream_t stream) { loss_.read_ids(stream); }
  void report_ids(cudaStream_t stream) { loss_.report_ids(vocab_, stream); }
  // How often a call rounded the weight to BF16 itself (not after weight_bf16_for_writer). Tests.
  int64_t weight_roundings() const { return weight_roundings_; }
  // Device bytes of the per-chunk buffer (one chunk's BF16 logits, then dlogits) as now grown.
  int64_t chunk_buffer_bytes() const { return static_cast<int64_t>(logits_.bytes()); }

 private:
  // hidden_bf16_ holds hidden's rows (at least `rows` of them handed out by bf16_hidden()).
  void run(const float* weight, const uint32_t* targets, int64_t rows, float grad_scale, bool backward,
           double* loss_mean, float* dhidden, float* weight_grad, cudaStream_t stream, bool overwrite_grad = false);

  int64_t d_, vocab_, chunk_rows_;
  nibble::cuda::GemmRunner& gemm_;
  CrossEntropyCuda loss_;
  const float* weight_source_ = nullptr;  // what weight_bf16_ was rounded from
  const float* writer_source_ = nullptr;  // what weight_bf16_for_writer() handed weight_bf16_ out for
  bool weight_valid_ = false;
  int64_t weight_roundings_ = 0;
  DeviceBuffer<__nv_bfloat16> weight_bf16_;  // [vocab x d]
  DeviceBuffer<__nv_bfloat16> hidden_bf16_;  // [rows x d]
  int64_t hidden_rows_ = 0;                  // the rows the last bf16_hidden() handed out
  DeviceBuffer<__nv_bfloat16> logits_;      // one chunk [chunk x vocab]: logits, then dlogits
};

}  // namespace nibble::nn::cuda
