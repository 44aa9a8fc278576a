// The GPT on one GPU (see gpt_cuda.h). Forward and backward follow ../gpt.cpp step for step, with
// explicit device buffers in place of the CPU's vectors:
//   x_      the residual stream [rows x d]          ln_     a norm's output, or a gradient [rows x d]
//   wide_   qkv, or d(fc output) [rows x max(qkv, fc)]   wide2_  the MLP activation, or its gradient
//   narrow_ attention heads' output, or its gradient    dtmp_   the LM head's gradient of its input
//   dx_     the gradient of the residual stream     hidden_ the final norm's FP32 output (fp32 recipe)
//   wide16_ qkv in BF16, and ln16_, wide2_16_, narrow16_ the gradients in BF16, where the layers
//   take BF16 (bf16 and quantized recipes); all but x_, dx_, dtmp_ allocated on first use. With
//   BF16 activations the final norm writes the LM head's input into the head (bf16_hidden).
// The LM head and the loss (LmHeadLossCuda) keep only one chunk of logits at a time.
// A linear layer whose recipe has no FP32 operand gets its input (and dY) in BF16, written by the
// producer straight into the layer (LinearCuda::bf16_input, docs/numerics.md "The GPU model's
// activations"); ln_, narrow_ and wide2_ then carry no forward activation for it.
// Every block keeps its fc output (`pre`, BF16 unless fc has FP32 operands) for the activation's
// backward; the linear layers keep their own saved operands (packed when quantized); the attention
// core keeps q, k, v, the softmax's log-sum-exp and, with the fused kernels, the BF16 output O.
#include "nibble/model/cuda/gpt_cuda.h"

#include <algorithm>
#include <iterator>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace nibble::model::cuda {

using nibble::cuda::DeviceBuffer;
namespace ncu = nibble::nn::cuda;

namespace {
// A tensor between layers, FP32 or BF16 (exactly one set); visit(f) calls f with it.
struct Values {
  const float* f32 = nullptr;
  const bf16_t* b16 = nullptr;
  template <typename F>
  void visit(F&& f) const {
    if (b16 != nullptr)
      f(b16);
    else
      f(f32);
  }
};

// The attention core's forward, with the amax of proj's NVFP4 pass where out is BF16 (`amax()` asks
// proj); from a BF16 qkv that stays until backward (`kept`) where both are BF16.
template <typename In, typename Out, typename Amax>
void attention_forward(ncu::AttentionCoreCuda& core, const In* qkv, bool kept, int64_t batch, int64_t seq, Out* out,
                       Amax amax, cudaStream_t stream) {
  if constexpr (std::is_same_v<Out, bf16_t>) {
    if constexpr (std::is_same_v<In, bf16_t>) {
      if (kept) return core.forward_kept(qkv, batch, seq, out, stream, amax());
    }
    core.forward(qkv, batch, seq, out, stream, amax());
  } else {
    core.forward(qkv, batch, seq, out, stream);
  }
}

// The attention core's backward, with the amax of qkv's NVFP4 pass over dY where d_qkv is BF16.
template <typename In, typename Out, typename Amax>
void attention_backward(ncu::AttentionCoreCuda& core, const In* d_out, Out* d_qkv, Amax amax, cudaStream_t stream) {
  if constexpr (std::is_same_v<Out, bf16_t>)
    core.backward(d_out, d_qkv, stream, amax());
  else
    core.backward(d_out, d_qkv, stream);
}
}  // namespace

struct GptCuda::Block {
  ncu::NormCuda norm1, norm2;
  ncu::LinearCuda qkv, proj, fc, proj2;
  ncu::AttentionCoreCuda core;
  nn::MlpKind mlp;
  int64_t hidden, fc_width;
  // fc's output, saved for the activation's backward: in BF16 as fc's GEMM writes it where fc takes
  // BF16 input (bf16 and quantized recipes), else in FP32; `pre` points at the one in use, the only
  // one allocated.
  DeviceBuffer<float> pre32;
  DeviceBuffer<bf16_t> pre16;
  Values pre;
  // qkv's BF16 output, kept until backward where the attention core reads q, k and v in place
  // (AttentionCoreCuda::reads_kept_qkv; it then saves no packed copies); unused otherwise.
  DeviceBuffer<bf16_t> qkv16;

  Block(const GptConfig& c, const nn::Recipe& recipe, uint32_t index, uint64_t seed, ncu::LinearContext& ctx,
        ncu::AttentionWorkspace& attn_workspace)
      : norm1(c.d_model, c.norm, c.norm_eps),
        norm2(c.d_model, c.norm, c.norm_eps),
        qkv(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim(), recipe, {4 * index, seed}, ctx),
        proj(c.n_heads * c.head_dim(), c.d_model, recipe, {4 * index + 1, seed}, ctx),
        fc(c.d_model, c.mlp == nn::MlpKind::kSwiglu ? 2 * c.mlp_hidden : c.mlp_hidden, recipe, {4 * index + 2, seed},
           ctx),
        proj2(c.mlp_hidden, c.d_model, recipe, {4 * index + 3, seed}, ctx),
        core({c.d_model, c.n_heads, c.n_kv_heads, c.positions == PositionKind::kRope, c.rope_theta}, ctx.gemm,
             attn_workspace),
        mlp(c.mlp),
        hidden(c.mlp_hidden),
        fc_width(c.mlp == nn::MlpKind::kSwiglu ? 2 * c.mlp_hidden : c.mlp_hidden) {}

  std::array<ncu::LinearCuda*, 4> linears() { return {&qkv, &proj, &fc, &proj2}; }
  // Whether the GELU runs in fc's Fprop epilogue, writing proj2's BF16 input and `pre` (BF16) from
  // one GEMM (LinearCuda::forward_bf16_input_gelu): where that input is proj2's operand itself. A
  // quantizing proj2 keeps the GELU kernel, which computes its amax in passing: with the epilogue and
  // proj2's own amax pass the nvfp4 step measured 0.2% slower (docs/benchmarks.md, session 25).
  bool gelu_in_fprop() const {
    return mlp == nn::MlpKind::kGelu && fc.fprop_takes_gelu() && proj2.bf16_input_is_operand();
  }
  // Whether GELU's derivative runs in proj2's Dgrad epilogue, writing fc's BF16 dY
  // (LinearCuda::backward_bf16_input_gelu); `pre` is BF16 wherever fc takes BF16 input.
  bool gelu_in_dgrad() const {
    return mlp == nn::MlpKind::kGelu && proj2.dgrad_takes_gelu() && fc.takes_bf16_dy() && pre.b16 != nullptr;
  }
};

GptCuda::GptCuda(Gpt& host, uint64_t run_seed, cudaStream_t stream)
    : host_(host),
      stream_(stream),
      tok_embed_(host.config().vocab_size, host.config().d_model),
      norm_f_(host.config().d_model, host.config().norm, host.config().norm_eps),
      head_(host.config().d_model, host.config().vocab_size, linear_ctx_.gemm),
      loss_dev_(1) {
  const GptConfig& c = host.config();
  if (c.positions == PositionKind::kLearned) pos_embed_ = std::make_unique<ncu::EmbeddingCuda>(c.seq_len, c.d_model);
  for (int64_t i = 0; i < c.n_layers; ++i)
    blocks_.push_back(std::make_unique<Block>(c, host.block_recipe(i), static_cast<uint32_t>(i), run_seed, linear_ctx_,
                                             attn_workspace_));
  // The norms' parameter gradients are finished together after each backward (one launch).
  for (auto& b : blocks_) norms_.insert(norms_.end(), {&b->norm1, &b->norm2});
  norms_.push_back(&norm_f_);
  for (ncu::NormCuda* n : norms_) n->set_defer_param_finish(true);
  if (!c.tied_embeddings) {
    head_weight_.resize(static_cast<size_t>(c.vocab_size * c.d_model));
    head_grad_.resize(head_weight_.size());
    head_grad_.zero();
  }

  // The parameter list, in Gpt::parameters()'s order and names.
  // written: whether micro-batch 0 writes the whole gradient (DeviceParameter::written_by_first_microbatch).
  const auto add = [&](std::string name, int64_t count, float* value, float* grad, bool decay, bool written,
                       ncu::LinearCuda* linear = nullptr) {
    params_.push_back({std::move(name), count, value, grad, decay, written});
    param_linears_.push_back(linear);
  };
  const int64_t d = c.d_model;
  const auto norm = [&](const std::string& name, ncu::NormCuda& n) {
    add(name + ".weight", d, n.weight(), n.weight_grad(), false, false);
    if (n.has_bias()) add(name + ".bias", d, n.bias(), n.bias_grad(), false, false);
  };
  const auto linear = [&](const std::string& name, ncu::LinearCuda& l) {
    add(name, l.in_features() * l.out_features(), l.weight(), l.weight_grad(), true, true, &l);
  };
  // Tied, the table's gradient starts with the LM head's Wgrad (the backward's first GEMM); untied, it
  // is only the rows of the batch's ids.
  add("embed.weight", c.vocab_size * d, tok_embed_.weight(), tok_embed_.weight_grad(), true, c.tied_embeddings);
  if (pos_embed_)
    add("pos_embed.weight", c.seq_len * d, pos_embed_->weight(), pos_embed_->weight_grad(), true, false);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = *blocks_[i];
    const std::string p = "blocks." + std::to_string(i) + ".";
    norm(p + "norm1", b.norm1);
    linear(p + "attn.qkv.weight", b.qkv);
    linear(p + "attn.proj.weight", b.proj);
    norm(p + "norm2", b.norm2);
    linear(p + "mlp.fc.weight", b.fc);
    linear(p + "mlp.proj.weight", b.proj2);
  }
  norm("norm_f", norm_f_);
  if (!c.tied_embeddings)
    add("lm_head.weight", c.vocab_size * d, head_weight_.data(), head_grad_.data(), true, true);
  upload_from(host);
}

GptCuda::~GptCuda() = default;

void GptCuda::upload_from(Gpt& host) {
  const std::vector<Parameter> hp = host.parameters();
  if (hp.size() != params_.size())
    throw std::logic_error("GptCuda: the host model has " + std::to_string(hp.size()) + " parameters, the device " +
                           std::to_string(params_.size()));
  for (size_t i = 0; i < hp.size(); ++i) {
    if (hp[i].name != params_[i].name || static_cast<int64_t>(hp[i].value.size()) != params_[i].count)
      throw std::logic_error("GptCuda: parameter " + std::to_string(i) + " is " + hp[i].name + " on the host and " +
                             params_[i].name + " on the device");
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(params_[i].value, hp[i].value.data(), hp[i].value.size() * sizeof(float),
                                      cudaMemcpyHostToDevice, stream_));
  }
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  weights_changed();
}

void GptCuda::download_to(Gpt& host) {
  const std::vector<Parameter> hp = host.parameters();
  if (hp.size() != params_.size())
    throw std::logic_error("GptCuda: the host model has " + std::to_string(hp.size()) + " parameters, the device " +
                           std::to_string(params_.size()));
  for (size_t i = 0; i < hp.size(); ++i)
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(hp[i].value.data(), params_[i].value, hp[i].value.size() * sizeof(float),
                                      cudaMemcpyDeviceToHost, stream_));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::vector<nibble::cuda::AmaxSlots> GptCuda::weight_amaxes_for_optimizer() {
  std::vector<nibble::cuda::AmaxSlots> amaxes;
  for (ncu::LinearCuda* l : param_linears_)
    amaxes.push_back(l != nullptr ? l->weight_amax_for_writer(stream_) : nibble::cuda::AmaxSlots{});
  return amaxes;
}

std::vector<bf16_t*> GptCuda::weight_bf16_for_optimizer() {
  std::vector<bf16_t*> copies(params_.size(), nullptr);
  if (!optimizer_bf16_weights_) return copies;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (param_linears_[i] != nullptr)
      copies[i] = param_linears_[i]->weight_bf16_for_writer();
    else if (params_[i].value == head_weight())
      copies[i] = head_.weight_bf16_for_writer(head_weight());
  }
  return copies;
}

int64_t GptCuda::weight_bf16_adoptions() const {
  int64_t n = 0;
  for (const ncu::LinearCuda* l : param_linears_)
    if (l != nullptr) n += l->weight_bf16_adoptions();
  return n;
}

void GptCuda::weights_changed(bool amaxes_produced, bool bf16_produced) {
  for (auto& b : blocks_)
    for (ncu::LinearCuda* l : b->linears()) l->weight_changed(amaxes_produced, bf16_produced);
  head_.weight_changed(bf16_produced);
}

float* GptCuda::head_weight() { return host_.config().tied_embeddings ? tok_embed_.weight() : head_weight_.data(); }
float* GptCuda::head_grad() { return host_.config().tied_embeddings ? tok_embed_.weight_grad() : head_grad_.data(); }

void GptCuda::apply_recipes() {
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const nn::Recipe& r = host_.block_recipe(static_cast<int64_t>(i));
    for (ncu::LinearCuda* l : blocks_[i]->linears())
      if (!(l->recipe() == r)) l->set_recipe(r);
  }
}

void GptCuda::set_bf16_everywhere(bool on) {
  host_.set_bf16_everywhere(on);
  apply_recipes();
}

void GptCuda::set_step(uint64_t step, uint32_t microbatch) {
  microbatch_ = microbatch;
  for (auto& b : blocks_)
    for (ncu::LinearCuda* l : b->linears()) l->set_step(step, microbatch);
}

void GptCuda::set_first_microbatch_writes_grads(bool on) { linear_ctx_.first_microbatch_writes_grads = on; }

void GptCuda::zero_grad() {
  tok_embed_.zero_grad(stream_);
  if (pos_embed_) pos_embed_->zero_grad(stream_);
  head_grad_.zero(stream_);  // empty (a no-op) with tied embeddings
  norm_f_.zero_grad(stream_);
  for (auto& b : blocks_) {
    b->norm1.zero_grad(stream_);
    b->norm2.zero_grad(stream_);
    for (ncu::LinearCuda* l : b->linears()) l->zero_grad(stream_);
  }
}

void GptCuda::upload_tokens(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                            int64_t seq) {
  const GptConfig& c = host_.config();
  if (batch <= 0 || seq <= 0 || seq > c.seq_len)
    throw std::invalid_argument("GptCuda: batch " + std::to_string(batch) + " x seq " + std::to_string(seq) +
                                " is empty or longer than the model's seq_len " + std::to_string(c.seq_len));
  const int64_t rows = batch * seq;
  if (static_cast<int64_t>(inputs.size()) != rows || static_cast<int64_t>(targets.size()) != rows)
    throw std::invalid_argument("GptCuda: expected " + std::to_string(rows) + " input and target ids");
  if (rows != rows_) {
    const int64_t d = c.d_model;
    const auto sz = [&](int64_t width) { return static_cast<size_t>(rows * width); };
    tokens_.resize(sz(2));
    for (DeviceBuffer<float>* b : {&x_, &dx_, &dtmp_}) b->resize(sz(d));
    rows_ = rows;
  }
  // Through pinned memory: the caller may reuse its vectors at once, and the host does not wait for
  // the GPU (which may still be running the previous step's optimizer).
  uint32_t* staged = token_staging_.write(static_cast<size_t>(2 * rows));
  std::copy(inputs.begin(), inputs.end(), staged);
  std::copy(targets.begin(), targets.end(), staged + rows);
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(tokens_.data(), staged, 2 * rows * 4, cudaMemcpyHostToDevice, stream_));
  token_staging_.copied(stream_);
}

namespace {

// The amax of the NVFP4 pass over a linear layer's BF16 input (get() asks the layer), for the GELU
// that writes that input (activation_forward / activation_backward take it with GELU only); none
// for an FP32 input.
template <typename Dst, typename Get>
nibble::cuda::ProducerAmax gelu_amax(nn::MlpKind kind, Dst*, Get get) {
  if constexpr (std::is_same_v<Dst, bf16_t>) {
    if (kind == nn::MlpKind::kGelu) return get();
  }
  return {};
}

}  // namespace

void GptCuda::forward_hidden(int64_t batch, int64_t seq) {
  const int64_t rows = batch * seq;
  if (batched_weight_quantization_) {  // 40 small launches a step become two (GPT-2 124M)
    weight_jobs_.clear();
    for (auto& b : blocks_)
      for (ncu::LinearCuda* l : b->linears()) l->prepare_weight_copies(stream_, weight_jobs_);
    nibble::cuda::nvfp4_quantize_tile16_jobs(weight_jobs_, stream_);
    batched_weight_passes_ += static_cast<int64_t>(weight_jobs_.size());
  }
  if (pos_embed_)
    tok_embed_.forward_with_positions(device_ids(), batch, seq, *pos_embed_, x_.data(), stream_);
  else
    tok_embed_.forward(device_ids(), rows, x_.data(), /*accumulate=*/false, stream_);
  // A linear layer's input is written by its producer in BF16 straight into the layer when no operand
  // made from it is FP32 (LinearCuda::takes_bf16_input: bf16 layers get the bits an FP32 input would
  // give, quantized layers quantize the BF16 values), otherwise into the FP32 buffer `fp32` (allocated
  // on first use: the bf16 and quantized recipes never touch it). `produce(dst)` writes the input to
  // dst (float* or bf16_t*). With `residual` the output is added to y (the residual stream) in the GEMM.
  const auto linear_forward = [&](ncu::LinearCuda& linear, bool producer_writes_bf16, DeviceBuffer<float>& fp32,
                                  auto produce, float* y, bool residual) {
    if (producer_writes_bf16 && linear.takes_bf16_input()) {
      produce(linear.bf16_input(rows));
      linear.forward_bf16_input(rows, y, stream_, residual);
    } else {
      fp32.reserve(static_cast<size_t>(rows * linear.in_features()));
      produce(fp32.data());
      linear.forward(fp32.data(), rows, y, stream_, residual);
    }
  };
  // The norm's output in BF16 straight into the linear layer (which takes BF16), with the amax of
  // the layer's NVFP4 pass where one will run.
  const auto norm_into = [&](ncu::NormCuda& norm, ncu::LinearCuda& linear) {
    bf16_t* input = linear.bf16_input(rows);
    norm.forward(x_.data(), rows, input, stream_, linear.bf16_input_amax(rows, stream_));
  };
  // A linear layer after a norm whose output only BF16-reading consumers use (the attention core, the
  // MLP activation): Y in BF16 where the layer takes BF16 input, rounded by its GEMM's epilogue (the
  // consumers give the bits of the same values in FP32), else in FP32. Returns where Y went.
  const auto norm_then_linear = [&](ncu::NormCuda& norm, ncu::LinearCuda& linear, DeviceBuffer<float>& y32,
                                    DeviceBuffer<bf16_t>& y16) {
    const auto n = static_cast<size_t>(rows * linear.out_features());
    if (linear.takes_bf16_input()) {
      norm_into(norm, linear);
      y16.reserve(n);
      linear.forward_bf16_input(rows, y16.data(), stream_);
      return Values{nullptr, y16.data()};
    }
    y32.reserve(n);
    linear_forward(linear, true, ln_, [&](auto* dst) { norm.forward(x_.data(), rows, dst, stream_); }, y32.data(),
                   false);
    return Values{y32.data(), nullptr};
  };
  for (auto& bp : blocks_) {
    Block& b = *bp;
    const bool keep_qkv = b.core.reads_kept_qkv(seq);
    norm_then_linear(b.norm1, b.qkv, wide_, keep_qkv ? b.qkv16 : wide16_).visit([&](const auto* qkv) {
      linear_forward(b.proj, b.core.writes_bf16_output(), narrow_,
                     [&](auto* dst) {
                       attention_forward(b.core, qkv, keep_qkv, batch, seq, dst,
                                         [&] { return b.proj.bf16_input_amax(rows, stream_); }, stream_);
                     },
                     x_.data(), true);
    });
    if (b.gelu_in_fprop()) {  // the GELU in fc's GEMM, straight into proj2's input
      norm_into(b.norm2, b.fc);
      b.pre16.reserve(static_cast<size_t>(rows * b.hidden));
      b.fc.forward_bf16_input_gelu(rows, b.proj2, b.pre16.data(), stream_);
      b.pre = Values{nullptr, b.pre16.data()};
      b.proj2.forward_bf16_input(rows, x_.data(), stream_, /*accumulate=*/true);
      continue;
    }
    b.pre = norm_then_linear(b.norm2, b.fc, b.pre32, b.pre16);
    b.pre.visit([&](const auto* pre) {
      linear_forward(b.proj2, true, wide2_, [&](auto* dst) {
        ncu::activation_forward(b.mlp, pre, rows, b.hidden, dst, stream_, gelu_amax(b.mlp, dst, [&] {
          return b.proj2.bf16_input_amax(rows, stream_);
        }));
      }, x_.data(), true);
    });
  }
  // The LM head's input, which its GEMMs take rounded to BF16: straight into the head where the
  // blocks' activations are BF16 (the norm then saves its rows in BF16 as the others do), else in
  // FP32 (the fp32 recipe's FP32 rows), then rounded into the head.
  if (!blocks_.empty() && blocks_.back()->fc.takes_bf16_input()) {
    norm_f_.forward(x_.data(), rows, head_.bf16_hidden(rows), stream_);
    return;
  }
  hidden_.reserve(static_cast<size_t>(rows * norm_f_.dim()));
  norm_f_.forward(x_.data(), rows, hidden_.data(), stream_);
  head_.round_hidden(hidden_.data(), rows, stream_);
}

double GptCuda::read_loss() {
  double loss = 0;
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(&loss, loss_dev_.data(), sizeof loss, cudaMemcpyDeviceToHost, stream_));
  check_ids();
  return loss;
}

void GptCuda::check_ids() {
  tok_embed_.read_ids(stream_);
  head_.read_ids(stream_);
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));  // one wait for both flags
  tok_embed_.report_ids(stream_);
  head_.report_ids(stream_);
}

double GptCuda::loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                     int64_t seq) {
  upload_tokens(inputs, targets, batch, seq);
  forward_hidden(batch, seq);
  head_.loss_bf16_hidden(head_weight(), device_targets(), rows_, loss_dev_.data(), stream_);
  return read_loss();
}

double GptCuda::forward_backward(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                                 int64_t seq, float grad_scale) {
  enqueue_forward_backward(inputs, targets, batch, seq, grad_scale, loss_dev_.data());
  return read_loss();
}

void GptCuda::enqueue_forward_backward(std::span<const uint32_t> inputs, std::span<const uint32_t> targets,
                                       int64_t batch, int64_t seq, float grad_scale, double* loss) {
  upload_tokens(inputs, targets, batch, seq);
  const int64_t rows = rows_;
  for (ncu::NormCuda* n : norms_) n->drop_param_finish();  // left by a backward cut short, if any
  forward_hidden(batch, seq);
  // The logits' gradient is grad_scale / rows * (softmax - onehot), as on the CPU; with tied
  // embeddings the head's weight gradient goes straight into the table's, as on the CPU.
  head_.forward_backward_bf16_hidden(head_weight(), device_targets(), rows, grad_scale / static_cast<float>(rows),
                                     loss, dtmp_.data(), head_grad(), stream_,
                                     linear_ctx_.first_microbatch_writes_grads && microbatch_ == 0);
  // As in forward_hidden: dY in BF16 straight into the layer where no operand made from it is FP32
  // (`produce(dst)` writes it, float* or bf16_t*; fp32 is the FP32 dY buffer otherwise). dX is then
  // BF16 too, rounded by the Dgrad GEMM's epilogue into dx16 (what the next backward reads), else
  // FP32 into dx32.
  const auto linear_backward = [&](ncu::LinearCuda& linear, DeviceBuffer<float>& fp32, auto produce,
                                   DeviceBuffer<float>& dx32, DeviceBuffer<bf16_t>& dx16) {
    if (linear.takes_bf16_dy()) {
      produce(linear.bf16_dy_input());
      dx16.reserve(static_cast<size_t>(rows * linear.in_features()));
      linear.backward_bf16_input(dx16.data(), stream_);
      return Values{nullptr, dx16.data()};
    }
    fp32.reserve(static_cast<size_t>(rows * linear.out_features()));
    produce(fp32.data());
    dx32.reserve(static_cast<size_t>(rows * linear.in_features()));
    linear.backward(fp32.data(), dx32.data(), stream_);
    return Values{dx32.data(), nullptr};
  };
  // The output projections' dY is the residual stream's gradient dx_, which a norm's backward has
  // just finished (adding its part): that norm writes it in BF16 for the projection as well.
  const auto dx_bf16_for = [&](ncu::LinearCuda* next) -> bf16_t* {
    return next != nullptr && next->takes_bf16_dy() ? next->bf16_dy_input() : nullptr;
  };
  // ... and the amax of the NVFP4 pass over it, where one will run.
  const auto dx_amax_for = [&](ncu::LinearCuda* next) -> nibble::cuda::ProducerAmax {
    return next != nullptr && next->takes_bf16_dy() ? next->bf16_dy_amax(stream_) : nibble::cuda::ProducerAmax{};
  };
  const auto already_there = [](auto*) {};
  ncu::LinearCuda* const last_proj2 = blocks_.empty() ? nullptr : &blocks_.back()->proj2;
  norm_f_.backward(dtmp_.data(), dx_.data(), stream_, /*accumulate=*/false, dx_bf16_for(last_proj2),
                   dx_amax_for(last_proj2));
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& b = **it;
    Block* below = std::next(it) != blocks_.rend() ? std::next(it)->get() : nullptr;
    Values dln;
    // MLP: proj2, the activation (its backward writes fc's dY), fc, then norm2 adds its part to dx_.
    if (b.gelu_in_dgrad()) {  // GELU's derivative in proj2's Dgrad GEMM, which writes fc's dY
      b.proj2.backward_bf16_input_gelu(b.fc, b.pre.b16, stream_);
      dln = linear_backward(b.fc, wide_, already_there, ln_, ln16_);
    } else {
      const Values dact = linear_backward(b.proj2, dx_, already_there, wide2_, wide2_16_);
      b.pre.visit([&](const auto* pre) {
        dact.visit([&](const auto* d) {
          dln = linear_backward(b.fc, wide_, [&](auto* dst) {
            ncu::activation_backward(b.mlp, pre, d, rows, b.hidden, dst, stream_,
                                     gelu_amax(b.mlp, dst, [&] { return b.fc.bf16_dy_amax(stream_); }));
          }, ln_, ln16_);
        });
      });
    }
    dln.visit([&](const auto* g) {
      b.norm2.backward(g, dx_.data(), stream_, /*accumulate=*/true, dx_bf16_for(&b.proj), dx_amax_for(&b.proj));
    });
    // Attention: proj, the attention core (its backward writes qkv's dY), qkv, then norm1.
    const Values dout = linear_backward(b.proj, dx_, already_there, narrow_, narrow16_);
    dout.visit([&](const auto* g) {
      dln = linear_backward(b.qkv, wide_, [&](auto* dst) {
        attention_backward(b.core, g, dst, [&] { return b.qkv.bf16_dy_amax(stream_); }, stream_);
      }, ln_, ln16_);
    });
    ncu::LinearCuda* const below_proj2 = below != nullptr ? &below->proj2 : nullptr;
    dln.visit([&](const auto* g) {
      b.norm1.backward(g, dx_.data(), stream_, /*accumulate=*/true, dx_bf16_for(below_proj2),
                       dx_amax_for(below_proj2));
    });
  }
  ncu::NormCuda::finish_deferred(norms_, stream_);
  tok_embed_.backward(device_ids(), rows, dx_.data(), stream_);
  if (pos_embed_) pos_embed_->backward_positions(batch, seq, dx_.data(), stream_);
}

}  // namespace nibble::model::cuda
