// CUDA versions of the transformer's non-linear (high-precision) layers: embeddings, norms, MLP
// activations, the causal self-attention core and the LM-head loss. They mirror the CPU classes
// in ../ (embedding.h, norm.h, mlp.h, attention.h, loss.h), which stay the reference the tests
// hold these to.
//
// Conventions of every call here:
// - pointers are device pointers; activations are FP32 in and out, math is FP32 (statistics and
//   sums in double where the CPU uses double); the layers that feed a linear layer can also write
//   their output in BF16 (nearest-even rounding of the FP32 output) straight into the linear
//   layer's operand (LinearCuda::bf16_input / bf16_dy_input), saving a copy and a conversion pass;
// - a cudaStream_t on every call; work is stream-ordered and nothing waits on the host, except
//   buffer growth (cudaMalloc/cudaFree, first call at a new largest size) and the explicit
//   check_ids() calls, which synchronise by design;
// - a class saves in its own device buffers what its backward needs, as the CPU class does.
//
// Invalid token ids (the CPU throws std::out_of_range at once) cannot throw from a kernel: the
// kernels skip such rows and record the first bad position; check_ids() synchronises and throws
// std::out_of_range naming it (call it where an error may surface, e.g. once per step or in tests).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/attention.h"
#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/mlp.h"
#include "nibble/nn/norm.h"
#include "nibble/quant/cuda/quantize_cuda.h"
#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/tensor/cuda/gemm_cuda.h"

namespace nibble::nn::cuda {

using nibble::cuda::DeviceBuffer;

// Records the first out-of-range id a kernel met (smallest position wins, so the message does not
// depend on thread order). One device word: (position << 32 | id), all ones when none.
class IdErrorFlag {
 public:
  IdErrorFlag();
  unsigned long long* device() { return flag_.data(); }
  // read(), a wait for `stream`, then report().
  void check(const char* what, int64_t limit, cudaStream_t stream);
  // The two halves of check() for a caller that waits once for several flags: read() enqueues the
  // word's copy to the host on `stream` (pinned memory: the host does not wait); report(), after the
  // caller has waited for `stream`, throws std::out_of_range "<what>: id I at position P is not
  // below <limit>" and clears the flag when an id was bad.
  void read(cudaStream_t stream);
  void report(const char* what, int64_t limit, cudaStream_t stream);

 private:
  DeviceBuffer<unsigned long long> flag_;
  nibble::cuda::PinnedBuffer<unsigned long long> host_;
};

// Embedding table [rows x dim] (token embeddings, learned positions). Backward is deterministic
// and adds each row's gradients in the order of their positions, exactly as the CPU loop does
// (the ids are stably sorted with CUB, then each distinct id's row is summed by one thread per
// column): the table gradient equals the CPU's bit for bit.
class EmbeddingCuda {
 public:
  EmbeddingCuda(int64_t rows, int64_t dim);

  int64_t rows() const { return rows_; }
  int64_t dim() const { return dim_; }
  float* weight() { return weight_.data(); }            // [rows x dim]
  float* weight_grad() { return grad_.data(); }         // [rows x dim]
  void zero_grad(cudaStream_t stream) { grad_.zero(stream); }

  // out[i] (+)= weight[ids[i]] for i < n; ids is a device array of n token ids.
  void forward(const uint32_t* ids, int64_t n, float* out, bool accumulate, cudaStream_t stream);
  // out[i] = weight[ids[i]] + positions.weight()[i % seq] for i < batch seq, in one pass: forward()
  // and then positions.forward() of ids i % seq with accumulate, the same bits. Ids are checked
  // against this table (check_ids); seq must not exceed positions.rows().
  void forward_with_positions(const uint32_t* ids, int64_t batch, int64_t seq, const EmbeddingCuda& positions,
                              float* out, cudaStream_t stream);
  // weight_grad[ids[i]] += dout[i].
  void backward(const uint32_t* ids, int64_t n, const float* dout, cudaStream_t stream);
  // backward() for the learned positions of `batch` sequences of `seq` tokens (ids[i] = i % seq,
  // seq <= rows()): row p adds dout's rows p, seq + p, 2 seq + p, ... in that order, the order
  // backward() adds them in (the same bits), without its sort.
  void backward_positions(int64_t batch, int64_t seq, const float* dout, cudaStream_t stream);
  // Throws std::out_of_range for the first bad id any call met since the last check (synchronises);
  // or in two halves, read_ids() before and report_ids() after the caller's wait for `stream`.
  void check_ids(cudaStream_t stream) { bad_id_.check(kWhat, rows_, stream); }
  void read_ids(cudaStream_t stream) { bad_id_.read(stream); }
  void report_ids(cudaStream_t stream) { bad_id_.report(kWhat, rows_, stream); }

 private:
  static constexpr const char* kWhat = "EmbeddingCuda";
  // The forward kernels: rows of `positions` (or none) i % seq added.
  void embed_rows(const uint32_t* ids, int64_t n, const float* positions, int64_t seq, bool accumulate, float* out,
                  cudaStream_t stream);
  int64_t rows_, dim_;
  DeviceBuffer<float> weight_, grad_;
  IdErrorFlag bad_id_;
  // Backward's sort: keys (ids), values (positions), both sorted, and CUB's scratch.
  DeviceBuffer<uint32_t> keys_in_, keys_out_, pos_in_, pos_out_;
  DeviceBuffer<uint8_t> sort_scratch_;
};

// LayerNorm / RMSNorm over the last dimension (same formulas and eps as nn::Norm; statistics in
// double). Forward saves the normalized rows and 1/std; backward accumulates the gain (and bias)
// gradients deterministically (per-chunk partial sums in double, then a fixed-order sum). The rows
// are saved in the precision of the forward's output: FP32, as the CPU does, or, with BF16 output
// (the GPU model's BF16 activations), rounded to BF16 to nearest even: half the bytes to write,
// keep and read back, and backward's only departure from the CPU's arithmetic then (see
// docs/numerics.md, "The GPU model's activations").
class NormCuda {
 public:
  NormCuda(int64_t dim, NormKind kind, float eps = 1e-5f);

  int64_t dim() const { return dim_; }
  NormKind kind() const { return kind_; }
  bool has_bias() const { return kind_ == NormKind::kLayerNorm; }
  float* weight() { return weight_.data(); }      // gain, starts at 1
  float* bias() { return bias_.data(); }          // LayerNorm only (nullptr for RMSNorm), starts at 0
  float* weight_grad() { return weight_grad_.data(); }
  float* bias_grad() { return bias_grad_.data(); }
  void zero_grad(cudaStream_t stream);

  void forward(const float* x, int64_t rows, float* y, cudaStream_t stream);
  // The same with y in BF16 (nearest-even rounding of the FP32 y), for LinearCuda::bf16_input().
  // With `amax`, also the amax of the fused NVFP4 pass that will quantize y (LinearCuda::bf16_input_amax):
  // in the same kernel for vector rows (a multiple of 128 elements, at most 1024) and rows a multiple
  // of 16; otherwise by that pass's amax kernel after the forward.
  void forward(const float* x, int64_t rows, bf16_t* y, cudaStream_t stream, nibble::cuda::ProducerAmax amax = {});
  // dx = d(norm)/dx^T dy (overwrites dx; with `accumulate` dx += it, as a residual connection's
  // gradient, in the same FP32 addition a separate pass would do); weight/bias gradients += their
  // parts. Needs a forward. dx must not overlap dy. dx_bf16 (optional): the final dx (after the
  // addition) also rounded to BF16 to nearest even, for the next linear layer's
  // LinearCuda::bf16_dy_input() (the residual stream's gradient is that layer's dY). With `amax`
  // (needs dx_bf16; LinearCuda::bf16_dy_amax), also the amax of the fused NVFP4 pass that will
  // quantize dx_bf16: in the same kernel for vector rows and a multiple of 16 rows, otherwise by
  // that pass's amax kernel after the backward.
  void backward(const float* dy, float* dx, cudaStream_t stream, bool accumulate = false, bf16_t* dx_bf16 = nullptr,
                nibble::cuda::ProducerAmax amax = {});
  // The same with dy in BF16 (the GPU model's linear dX, LinearCuda::backward_bf16_input's BF16 dX).
  void backward(const bf16_t* dy, float* dx, cudaStream_t stream, bool accumulate = false, bf16_t* dx_bf16 = nullptr,
                nibble::cuda::ProducerAmax amax = {});
  // With set_defer_param_finish(true), backward() leaves the last step of the weight and bias
  // gradients (adding the per-chunk partials to them) to finish_deferred(), which does it for many
  // norms in one launch, the same bits (the GPU model: all its norms after each backward); a second
  // backward before that throws std::logic_error. drop_param_finish() (and zero_grad()) forget a
  // pending one: a backward that was cut short (an exception) leaves nothing to add.
  void set_defer_param_finish(bool on) { defer_finish_ = on; }
  bool param_finish_pending() const { return pending_finish_; }
  void drop_param_finish() { pending_finish_ = false; }
  static void finish_deferred(std::span<NormCuda* const> norms, cudaStream_t stream);

 private:
  int64_t dim_;
  NormKind kind_;
  float eps_;
  DeviceBuffer<float> weight_, bias_, weight_grad_, bias_grad_;
  template <typename Out>
  void forward_impl(const float* x, int64_t rows, Out* y, cudaStream_t stream, const nibble::cuda::ProducerAmax& amax);
  template <typename DyT>
  void backward_saved(const DyT* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16,
                      const nibble::cuda::ProducerAmax& amax);
  template <typename DyT, typename XhT>
  void backward_impl(const DyT* dy, const XhT* xhat, float* dx, cudaStream_t stream, bool accumulate,
                     bf16_t* dx_bf16, const nibble::cuda::ProducerAmax& amax);

  DeviceBuffer<float> saved_xhat_, saved_rstd_;
  DeviceBuffer<bf16_t> saved_xhat16_;  // the normalized rows after a forward with BF16 output
  bool saved_bf16_ = false;            // which of the two the last forward saved
  DeviceBuffer<double> partials_;  // [chunks x dim] for the weight, then for the bias
  int64_t saved_rows_ = 0;
  int64_t pending_chunks_ = 0;  // the partials' chunks while a finish is pending
  bool defer_finish_ = false, pending_finish_ = false;
};

// The MLP's activation between fc and proj, as nn::Mlp computes it (GELU: tanh approximation;
// squared ReLU; SwiGLU on pre = [a | b] rows of 2 * hidden). pre: fc's output [rows x width],
// width = hidden (2 * hidden for SwiGLU), in FP32 or BF16 (In = float or bf16_t; the GPU model keeps
// it in BF16 where fc's operands are BF16 or quantized, as fc's GEMM writes it); act: [rows x hidden]
// in FP32, or in BF16 (Out = bf16_t: nearest-even rounding of the FP32 act) for LinearCuda::bf16_input().
// With `amax` (GELU only, rows a multiple of 16, hidden of 4, 16-byte aligned pointers; otherwise
// std::invalid_argument), also the amax of the fused NVFP4 pass that will quantize act
// (LinearCuda::bf16_input_amax), in the same pass over memory.
template <typename In, typename Out>
void activation_forward(MlpKind kind, const In* pre, int64_t rows, int64_t hidden, Out* act, cudaStream_t stream,
                        nibble::cuda::ProducerAmax amax = {});
// dpre (overwritten) = d act / d pre applied to dact (FP32 or BF16, D = float or bf16_t: the GPU
// model's proj dX in BF16); in BF16 (Out = bf16_t: nearest-even rounding of the FP32 dpre) for
// LinearCuda::bf16_dy_input(), with `amax` as for activation_forward (LinearCuda::bf16_dy_amax).
template <typename In, typename D, typename Out>
void activation_backward(MlpKind kind, const In* pre, const D* dact, int64_t rows, int64_t hidden, Out* dpre,
                         cudaStream_t stream, nibble::cuda::ProducerAmax amax = {});

// Causal self-attention without its two linear layers: from qkv [batch*seq x (H + 2 Hkv) hd]
// (columns [q heads | k heads | v heads], as the qkv Linear outputs them) to the heads' outputs
// [batch*seq x H hd], with grouped-query attention and optional RoPE (rotate-half pairing, angles
// as nn::CausalSelfAttention computes them, in double).
//
// Precision (the paper's "high precision" for attention): q, k, v (after RoPE), P, dO and dS are
// BF16 operands of tensor-core products with FP32 accumulation; scores, the softmax and its
// backward are FP32. Heads are packed head-major [batch, head, seq, head_dim] with zero padding,
// so that the heads of one KV group are consecutive.
//
// Two implementations (AttentionKernel):
// - kFused (flash-style, attention_flash.cuh), for head_dim <= 128 (padded to 64 or 128; seq padded
//   to a multiple of 64) where the device gives the kernels their shared memory (up to 102 KiB
//   per block at head_dim > 64: Hopper does, compute capability 8.6/8.9/12.x does not): scores
//   live only in registers, one 64 x 64 tile at a time (64 x 32 in dk/dv at head_dim > 64), with an
//   online softmax; tiles above the diagonal are skipped. P is rounded to BF16 relative to the
//   running row maximum. Backward recomputes P from the saved log-sum-exp in two kernels (dk and
//   dv per key tile, dq per query tile) without atomics: the same bits on every run. Saved per
//   layer: BF16 q, k, v (none of its own with forward_kept where nothing is padded or rotated: the
//   caller's qkv) and O, and one FP32 log-sum-exp per row. Workspace: per-call O(seq)
//   buffers only (rowsum(dO O); dO, dq, dk, dv where they are packed, not read or written in place).
// - kGemm (any head_dim; the fallback where kFused does not fit, and the benchmark's reference): cuBLASLt batched
//   GEMMs per KV group (group*seq rows against the group's k or v; dk and dv sum over the group
//   inside the reduction) that materialise the FP32 scores [B, H, seq, seq] (and dP) in the
//   workspace, FP32 softmax kernels, seq and head_dim padded to multiples of 8. Saves the same
//   q, k, v and log-sum-exp and recomputes the scores and P in backward.
// The workspace is shared by all layers working on one stream; nothing a layer saves lives there.
enum class AttentionKernel { kAuto, kFused, kGemm };  // kAuto: kFused where it fits (above), else kGemm

struct AttentionWorkspace {
  DeviceBuffer<__nv_bfloat16> dout;          // dO [B, H, Tp, hdp]
  DeviceBuffer<float> delta;                 // kFused: rowsum(dO O) [B, H, Tp]
  DeviceBuffer<float> dq, dk, dv;            // [B, H|Hkv|Hkv, Tp, hdp]
  // kGemm only:
  DeviceBuffer<float> scores, dprobs;        // S (FP32) [B, H, Tp, Tp]; dP [B, H, Tp, Tp]
  DeviceBuffer<__nv_bfloat16> probs;         // P, then dS, in BF16 [B, H, Tp, Tp]
  DeviceBuffer<float> out_heads;             // O [B, H, Tp, hdp]
};

class AttentionCoreCuda {
 public:
  // `gemm` and `workspace` are borrowed and must outlive the layer. Throws std::invalid_argument
  // for kFused with head_dim > 128 or on a device without the shared memory it needs.
  AttentionCoreCuda(AttentionShape shape, nibble::cuda::GemmRunner& gemm, AttentionWorkspace& workspace,
                    AttentionKernel kernel = AttentionKernel::kAuto);

  const AttentionShape& shape() const { return shape_; }
  AttentionKernel kernel() const { return kernel_; }  // kFused or kGemm, as resolved
  int64_t qkv_width() const { return (shape_.n_heads + 2 * shape_.n_kv_heads) * shape_.head_dim(); }
  int64_t out_width() const { return shape_.n_heads * shape_.head_dim(); }

  void forward(const float* qkv, int64_t batch, int64_t seq, float* out, cudaStream_t stream);
  // The same with out in BF16 (nearest-even rounding of the FP32 out), for LinearCuda::bf16_input();
  // only where writes_bf16_output() (the fused kernels).
  bool writes_bf16_output() const { return kernel_ == AttentionKernel::kFused; }
  // `amax` (nibble::cuda::ProducerAmax, from the next linear layer's bf16_input_amax()): the amax of
  // the fused NVFP4 pass that will quantize out, computed in the Hopper kernel where it can (T a
  // multiple of 16), else by that pass's amax kernel after the forward.
  void forward(const float* qkv, int64_t batch, int64_t seq, bf16_t* out, cudaStream_t stream,
               nibble::cuda::ProducerAmax amax = {});
  // The same from qkv in BF16 (the GPU model's qkv output): q, k, v are packed in BF16 anyway, so
  // these give the bits of the calls given qkv's values in FP32.
  void forward(const bf16_t* qkv, int64_t batch, int64_t seq, float* out, cudaStream_t stream);
  void forward(const bf16_t* qkv, int64_t batch, int64_t seq, bf16_t* out, cudaStream_t stream,
               nibble::cuda::ProducerAmax amax = {});
  // Whether forward_kept() reads q, k and v in place at this seq: the fused kernels, no RoPE, head_dim
  // 64 or 128 and seq a multiple of 64 (nothing to rotate or pad).
  bool reads_kept_qkv(int64_t seq) const;
  // forward() from a BF16 qkv that the caller keeps unchanged until backward() has run: where
  // reads_kept_qkv(seq), the kernels read q, k and v from it and the layer saves no copies of its
  // own (the same bits). Otherwise as forward().
  void forward_kept(const bf16_t* qkv, int64_t batch, int64_t seq, bf16_t* out, cudaStream_t stream,
                    nibble::cuda::ProducerAmax amax = {});
  // d_qkv (overwritten) from d_out [batch*seq x H hd]. Needs a forward.
  void backward(const float* d_out, float* d_qkv, cudaStream_t stream);
  // The same with d_qkv in BF16 (nearest-even rounding of the FP32 d_qkv), for LinearCuda::bf16_dy_input();
  // `amax` as forward's, over d_qkv (the Hopper kernels compute it where they write d_qkv in place).
  void backward(const float* d_out, bf16_t* d_qkv, cudaStream_t stream, nibble::cuda::ProducerAmax amax = {});
  // The same from d_out in BF16 (the GPU model's proj dX): dO is packed in BF16 anyway, so these give
  // the bits of the calls given d_out's values in FP32.
  void backward(const bf16_t* d_out, float* d_qkv, cudaStream_t stream);
  void backward(const bf16_t* d_out, bf16_t* d_qkv, cudaStream_t stream, nibble::cuda::ProducerAmax amax = {});
  // How many of the amaxes asked for the kernels computed themselves (the rest: the amax pass). Tests.
  int64_t amaxes_in_kernels() const { return amaxes_in_kernels_; }

 private:
  // out16 (BF16 output, fused kernels only) replaces out when not nullptr.
  template <typename In>
  void forward_impl(const In* qkv, int64_t batch, int64_t seq, float* out, __nv_bfloat16* out16, cudaStream_t stream,
                    const nibble::cuda::ProducerAmax& amax = {}, bool kept = false);
  template <typename In, typename Out>
  void backward_impl(const In* d_out, Out* d_qkv, cudaStream_t stream, const nibble::cuda::ProducerAmax& amax = {});
  void gemm_forward(float* out, cudaStream_t stream);
  void gemm_backward(cudaStream_t stream);
  void gemm_scores(cudaStream_t stream);  // ws_.scores = q k^T per KV group

  AttentionShape shape_;
  nibble::cuda::GemmRunner& gemm_;
  AttentionWorkspace& ws_;
  AttentionKernel kernel_;
  int64_t batch_ = 0, seq_ = 0, seq_pad_ = 0, hd_pad_ = 0;
  bool saved_ = false;
  int64_t amaxes_in_kernels_ = 0;
  int64_t rope_seq_ = 0;
  DeviceBuffer<float> rope_cos_, rope_sin_;  // [seq x hd/2]
  DeviceBuffer<__nv_bfloat16> q_, k_, v_;   // saved: [B, H|Hkv, Tp, hdp], unless read in place
  // kFused: where the kernels find q, k and v (q_, k_, v_, or the caller's kept qkv).
  detail::BF16Heads q_heads_, k_heads_, v_heads_;
  DeviceBuffer<__nv_bfloat16> o_;            // saved (kFused): the normalised output [B, H, Tp, hdp]
  // saved: [B, H, Tp] log-sum-exp of the scaled scores per row; natural log (kGemm) or base 2
  // (kFused, which works with exp2).
  DeviceBuffer<float> lse_;
};

// Softmax cross-entropy over the vocabulary, fused with its gradient, as nn::softmax_cross_entropy:
// logits [rows x vocab] are overwritten by grad_scale * (softmax - onehot(target)) when grad_scale
// is non-zero, otherwise by the probabilities. *loss_mean (device) = the mean over rows of
// -log softmax[target] (the CPU function returns the sum; the model divides it by rows). Row sums
// in double; the mean is a fixed-order (deterministic) sum of the rows' losses. A row with a bad
// target counts 0 and its output row is zeroed (check_ids() then throws).
//
// chunk()/mean() are the same computation a chunk of rows at a time on BF16 logits, for the chunked
// LM head (lm_head_cuda.h): the gradient is written in BF16 (in place or elsewhere), rounded to
// nearest even from the very FP32 values forward_backward() would write given the logits widened to
// FP32 (the same device code), i.e. the bits OperandCuda gives a bf16 operand made from
// forward_backward()'s output.
//
// Kernels (loss_kernels.cuh), both giving the same bits: kStaged (the default) copies each row
// into shared memory and reads the logits from global memory once; it needs the row to fit (vocab
// * 4 or 2 bytes within the device's opt-in shared memory per block, 227 KiB on Hopper), rows of a
// multiple of 16 bytes (vocab a multiple of 4 for FP32 logits, of 8 for BF16) and buffers aligned
// as cudaMalloc's, and falls back to kStrided otherwise, which reads each row three times (any vocab).
enum class CrossEntropyKernel { kStaged, kStrided };

class CrossEntropyCuda {
 public:
  explicit CrossEntropyCuda(CrossEntropyKernel kernel = CrossEntropyKernel::kStaged) : kernel_(kernel) {}

  void forward_backward(float* logits, const uint32_t* targets, int64_t rows, int64_t vocab, float grad_scale,
                        double* loss_mean, cudaStream_t stream);

  // Rows [row0, row0 + rows) of a batch of total_rows: logits [rows x vocab] (BF16, those rows
  // only), targets [total_rows] (the batch's). Keeps the rows' losses; writes dlogits [rows x vocab]
  // (BF16, the gradient or, with grad_scale 0, the probabilities; `logits` itself for in place)
  // unless dlogits is nullptr. Bad targets are reported at their position in the batch (row0 + r).
  void chunk(const __nv_bfloat16* logits, const uint32_t* targets, int64_t row0, int64_t rows, int64_t total_rows,
             int64_t vocab, float grad_scale, __nv_bfloat16* dlogits, cudaStream_t stream);
  // *loss_mean (device) = the fixed-order mean of the losses of rows [0, total_rows) that chunk() kept.
  void mean(int64_t total_rows, double* loss_mean, cudaStream_t stream);

  // As EmbeddingCuda's, for the targets.
  void check_ids(int64_t vocab, cudaStream_t stream) { bad_target_.check(kWhat, vocab, stream); }
  void read_ids(cudaStream_t stream) { bad_target_.read(stream); }
  void report_ids(int64_t vocab, cudaStream_t stream) { bad_target_.report(kWhat, vocab, stream); }

  // Whether rows of `vocab` logits run the staged kernel on the current device (with buffers
  // aligned as cudaMalloc's).
  bool staged(int64_t vocab);

 private:
  // The staged kernel's grid for these rows (persistent blocks: at most as many as fit on the
  // device at once), or 0 to run the strided one.
  unsigned staged_blocks(int64_t rows, int64_t vocab, const void* logits, const void* out, size_t bytes);

  // What the staged kernels may use on the device, found at the first call on it (when the
  // kernels' opt-in shared memory is set, once rather than per launch).
  struct StageLimits {
    int device = -1;
    size_t max_dynamic_shared = 0;  // 0: no staged kernel on this device
    int sms = 0;
    int64_t vocab = -1;             // of blocks_per_sm
    int blocks_per_sm[2] = {0, 0};  // FP32 (in place), BF16 (chunks) logits
  };
  static constexpr const char* kWhat = "CrossEntropyCuda target";
  CrossEntropyKernel kernel_;
  StageLimits stage_;
  DeviceBuffer<double> row_loss_;
  IdErrorFlag bad_target_;
};

}  // namespace nibble::nn::cuda
