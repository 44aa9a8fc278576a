// The GPU training engine (see engine_cuda.h).
#include "nibble/train/cuda/engine_cuda.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "nibble/model/cuda/gpt_cuda.h"
#include "nibble/train/cuda/adamw_cuda.h"

namespace nibble::train::cuda {
namespace {

using nibble::cuda::DeviceBuffer;

int64_t total_count(const std::vector<model::cuda::DeviceParameter>& ps) {
  int64_t n = 0;
  for (const auto& p : ps) n += p.count;
  return n;
}

class CudaEngine final : public Engine {
 public:
  CudaEngine(model::Gpt& host, AdamW& optimizer, uint64_t run_seed, const CudaEngineOptions& options)
      : host_(host),
        optimizer_(optimizer),
        gpu_(host, run_seed),
        adamw_(optimizer.options(), total_count(gpu_.parameters())) {
    int64_t offset = 0;
    // A step's first micro-batch writes most gradients whole (GptCuda::set_first_microbatch_writes_grads):
    // zero_grad() clears only the others.
    gpu_.set_first_microbatch_writes_grads(true);
    for (const auto& p : gpu_.parameters()) {
      tensors_.push_back({p.value, p.grad, p.count, p.weight_decay, offset});
      grads_.push_back({p.grad, p.count});
      if (!p.written_by_first_microbatch) zeroed_.push_back({p.grad, p.count});
      offset += p.count;
    }
    cudaDeviceProp prop{};
    NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    name_ = prop.name;
    gpu_.set_packed_fp4_gemm(options.packed_fp4_gemm);
    gpu_.set_gelu_in_gemm(options.gelu_in_gemm);
    from_host_moments();
  }

  std::string device() const override { return name_; }
  void set_bf16_everywhere(bool on) override { gpu_.set_bf16_everywhere(on); }
  // Every gradient is a parameter's (parameters()), so one launch over them zeroes what
  // GptCuda::zero_grad's memsets do, less those the first micro-batch writes whole. Those hold the
  // last step's finite values otherwise, but after a skipped step they may hold NaN or infinities,
  // which a GEMM with beta = 0 that still loaded C would carry on (0 x NaN): then, and on the first
  // step, all of them are zeroed.
  void zero_grad() override {
    const std::vector<GradSpan>& spans = zero_all_ ? grads_ : zeroed_;
    if (!spans.empty()) grad_zero_.zero(spans, gpu_.stream());
    zero_all_ = false;
  }
  void forward_backward(uint64_t step, uint32_t microbatch, std::span<const uint32_t> inputs,
                        std::span<const uint32_t> targets, int64_t batch, int64_t seq, float grad_scale) override {
    gpu_.set_step(step, microbatch);
    gpu_.enqueue_forward_backward(inputs, targets, batch, seq, grad_scale, loss_slot(microbatch));
    micro_batches_ = static_cast<int>(microbatch) + 1;
  }
  double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
              int64_t seq) override {
    return gpu_.loss(inputs, targets, batch, seq);
  }
  // The norm, the clipping factor and the decision to skip are made on the device (step_control),
  // so the host enqueues the whole step without waiting for it.
  void update(double lr, double grad_clip) override {
    if (micro_batches_ == 0) throw std::logic_error("CudaEngine::update: no micro-batch in the step");
    grad_norm_.compute(grads_, results_.data(), gpu_.stream());
    control_.resize(1);
    step_control(results_.data() + 1, micro_batches_, results_.data(), grad_clip, control_.data(), gpu_.stream());
    // The step also computes each NVFP4 weight's amax for its next quantization and writes the BF16
    // weight copies of the bf16 layers and the LM head (a pass fewer each).
    const std::vector<nibble::cuda::AmaxSlots> amaxes = gpu_.weight_amaxes_for_optimizer();
    const std::vector<bf16_t*> copies = gpu_.weight_bf16_for_optimizer();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      tensors_[i].amax = amaxes[i];
      tensors_[i].bf16 = copies[i];
    }
    adamw_.step(tensors_, lr, control_.data(), gpu_.stream());
    gpu_.weights_changed(/*amaxes_produced=*/true, /*bf16_produced=*/true);
  }
  // One wait for the step: the results and the StepControl go to pinned memory without the host
  // waiting for them, and check_ids() waits once for them and the id flags' copies.
  StepOutcome finish_step() override {
    const size_t count = static_cast<size_t>(1 + micro_batches_);
    results_host_.reserve(count);  // no copy into it is in flight: every finish_step waits
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(results_host_.data(), results_.data(), count * sizeof(double),
                                      cudaMemcpyDeviceToHost, gpu_.stream()));
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(control_host_.data(), control_.data(), sizeof(StepControl),
                                      cudaMemcpyDeviceToHost, gpu_.stream()));
    zero_all_ = true;  // until the step is known to have been taken (check_ids may throw)
    const auto wait_start = std::chrono::steady_clock::now();
    gpu_.check_ids();
    const double wait_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wait_start).count();
    const double* values = results_host_.data();
    const StepControl control = *control_host_.data();
    if (control.skip != 0) adamw_.undo_step();  // as the CPU optimizer, which counts only the steps it takes
    zero_all_ = control.skip != 0;
    return StepOutcome{std::vector<double>(values + 1, values + count), values[0], control.skip == 0, wait_s};
  }
  void to_host() override {
    gpu_.download_to(host_);
    const std::vector<model::Parameter> ps = host_.parameters();
    std::vector<float> m, v;
    for (size_t i = 0; i < ps.size(); ++i) {
      m.resize(ps[i].value.size());
      v.resize(ps[i].value.size());
      NIBBLE_CUDA_CHECK(cudaMemcpy(m.data(), adamw_.exp_avg() + tensors_[i].offset, m.size() * 4, cudaMemcpyDeviceToHost));
      NIBBLE_CUDA_CHECK(cudaMemcpy(v.data(), adamw_.exp_avg_sq() + tensors_[i].offset, v.size() * 4,
                                   cudaMemcpyDeviceToHost));
      optimizer_.set_moments(ps[i], m, v);
    }
    optimizer_.set_steps(adamw_.steps());
  }
  void from_host() override {
    gpu_.set_bf16_everywhere(host_.bf16_everywhere());
    gpu_.upload_from(host_);
    from_host_moments();
  }
  double memory_mib() override {
    size_t free = 0, total = 0;
    NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    peak_ = std::max(peak_, static_cast<double>(total - free) / (1024.0 * 1024.0));
    return peak_;
  }
  // Dense BF16 peaks from NVIDIA's data sheets: H100/H200 SXM 989 TFLOP/s, NVL 835, H100 PCIe 756.
  // Other devices: not reported (0).
  double peak_flops() const override {
    const auto has = [&](const char* s) { return name_.find(s) != std::string::npos; };
    if (!has("H100") && !has("H200")) return 0.0;
    if (has("PCIe")) return 756e12;
    if (has("NVL")) return 835e12;
    return 989.4e12;
  }

 private:
  // Where micro-batch m's loss goes; the slots of the micro-batches before it survive a growth.
  double* loss_slot(uint32_t microbatch) {
    const size_t need = 2 + static_cast<size_t>(microbatch);
    if (results_.size() < need) {
      DeviceBuffer<double> grown(std::max(need, 2 * results_.size()));
      if (microbatch > 0)
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(grown.data() + 1, results_.data() + 1, microbatch * sizeof(double),
                                          cudaMemcpyDeviceToDevice, gpu_.stream()));
      NIBBLE_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream()));  // the copy, before the old buffer goes
      results_ = std::move(grown);
    }
    return results_.data() + 1 + microbatch;
  }

  void from_host_moments() {
    const std::vector<model::Parameter> ps = host_.parameters();
    std::vector<float> m, v;
    for (size_t i = 0; i < ps.size(); ++i) {
      float* dm = adamw_.exp_avg() + tensors_[i].offset;
      float* dv = adamw_.exp_avg_sq() + tensors_[i].offset;
      if (optimizer_.moments(ps[i].name, m, v)) {
        NIBBLE_CUDA_CHECK(cudaMemcpy(dm, m.data(), m.size() * 4, cudaMemcpyHostToDevice));
        NIBBLE_CUDA_CHECK(cudaMemcpy(dv, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
      } else {
        NIBBLE_CUDA_CHECK(cudaMemset(dm, 0, tensors_[i].count * 4));
        NIBBLE_CUDA_CHECK(cudaMemset(dv, 0, tensors_[i].count * 4));
      }
    }
    adamw_.set_steps(optimizer_.steps());
  }

  model::Gpt& host_;
  AdamW& optimizer_;
  model::cuda::GptCuda gpu_;
  AdamWCuda adamw_;
  GradNormCuda grad_norm_;
  GradZeroCuda grad_zero_;
  std::vector<ParamTensor> tensors_;
  std::vector<GradSpan> grads_;
  std::vector<GradSpan> zeroed_;  // the gradients zero_grad() clears
  bool zero_all_ = true;           // the first step, and the one after a skipped step, clear all
  // The step's results on the device: [0] the gradient norm, [1 + m] micro-batch m's mean loss.
  DeviceBuffer<double> results_;
  int micro_batches_ = 0;  // of the step being enqueued
  DeviceBuffer<StepControl> control_;
  nibble::cuda::PinnedBuffer<double> results_host_;  // their copies on the host
  nibble::cuda::PinnedBuffer<StepControl> control_host_{1};
  std::string name_;
  double peak_ = 0;
};

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(model::Gpt& model, AdamW& optimizer, uint64_t run_seed,
                                         const CudaEngineOptions& options) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0)
    throw std::runtime_error(std::string("--device cuda: no usable CUDA device (") +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "none found") + ")");
  return std::make_unique<CudaEngine>(model, optimizer, run_seed, options);
}

}  // namespace nibble::train::cuda
