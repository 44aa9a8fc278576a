// AdamW and the global gradient norm on the GPU, for parameters kept in flat FP32 device arrays.
//
// AdamWCuda::step applies nibble::train::AdamW's update (same formula, same float operations in the
// same order, bias corrections computed on the host in double then rounded to float as the CPU
// does); the kernel is compiled without fused multiply-adds, so with the same inputs it gives the
// CPU optimizer's bits. Moments m, v are FP32, owned here, laid out like the flat parameter array.
// Weight decay applies per range of the array (norm gains and biases are not decayed).
//
// The whole step can stay on the device: GradNormCuda writes the norm (double), step_control()
// turns it and the micro-batches' losses into the clipping factor and the decision to skip the
// update (what the trainer decides on the CPU), and step() reads both through a device pointer, so
// a step needs no host synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "nibble/quant/cuda/quantize_cuda.h"  // AmaxSlots
#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/train/optimizer.h"

namespace nibble::train::cuda {

struct ParamRange {
  int64_t offset = 0;  // elements into the flat arrays
  int64_t count = 0;
  bool weight_decay = true;
};

// A parameter tensor in its own allocation, and where its moments lie in the optimizer's arrays.
struct ParamTensor {
  float* value = nullptr;
  const float* grad = nullptr;
  int64_t count = 0;
  bool weight_decay = true;
  int64_t offset = 0;  // elements into m and v
  // Where the step also puts max |value| after the update, as the NVFP4 amax pass's word 0
  // (nvfp4_amax over value, rowwise; amax.zero_next zeroed as that pass does): the amax of the next
  // quantization of a weight, which then reads no amax of its own (OperandCuda::tile16_producer_amax).
  // amax.current nullptr: none.
  nibble::cuda::AmaxSlots amax{};
  // Where the step also writes the updated values rounded to BF16 (nearest even, as BF16::encode; the
  // weight's BF16 GEMM copy, which the layer then makes no conversion pass for: GptCuda::
  // weight_bf16_for_optimizer). Written for a skipped step too. nullptr: none.
  bf16_t* bf16 = nullptr;
};

// The optimizer and the gradient norm each run as one launch over all tensors, reading a table of
// segments (one a tensor) from device memory; the table is uploaded when it changes (the gradient
// norm's: on the first step; the optimizer's: every step under NVFP4, whose weights' amax slots
// alternate, about 6 KB for GPT-2 124M).
struct AdamWSegment {
  float* value = nullptr;
  const float* grad = nullptr;
  int64_t moment_offset = 0;  // into m and v
  int64_t count = 0;
  float decay = 0.0f;
  uint32_t first_block = 0;  // the launch's blocks before this segment's
  uint32_t* amax = nullptr;  // ParamTensor::amax
  uint32_t* amax_zero_next = nullptr;
  uint16_t* bf16 = nullptr;  // ParamTensor::bf16's bits
  bool operator==(const AdamWSegment&) const = default;
};

// A gradient array cut into chunks, one block each (gradient norm, zeroing).
struct ChunkSegment {
  float* data = nullptr;
  int64_t count = 0;
  uint32_t first_block = 0;
  bool operator==(const ChunkSegment&) const = default;
};

template <typename Segment>
class SegmentTable {
 public:
  // Makes device() hold `segs`, copying them only when they differ from the last ones (the copy is
  // ordered on `stream` after the launches that read the previous table). Through pinned memory: a
  // copy from pageable memory may wait for the stream, and the step is enqueued while the GPU runs.
  void set(const std::vector<Segment>& segs, cudaStream_t stream) {
    if (segs == host_) return;
    host_ = segs;
    device_.reserve(host_.size());
    Segment* staged = staging_.write(host_.size());
    std::copy(host_.begin(), host_.end(), staged);
    NIBBLE_CUDA_CHECK(
        cudaMemcpyAsync(device_.data(), staged, host_.size() * sizeof(Segment), cudaMemcpyHostToDevice, stream));
    staging_.copied(stream);
  }
  const Segment* device() const { return device_.data(); }

 private:
  std::vector<Segment> host_;
  nibble::cuda::HostStaging<Segment> staging_;
  nibble::cuda::DeviceBuffer<Segment> device_;
};

// What an optimizer step reads from the device (step_control() writes it).
struct StepControl {
  float grad_multiplier = 1.0f;  // the gradient clipping factor
  uint32_t skip = 0;             // nonzero: parameters and moments stay as they are (amaxes, BF16 copies still written)
};

class AdamWCuda {
 public:
  // Moments for `numel` parameters, zeroed.
  AdamWCuda(AdamWOptions options, int64_t numel);

  const AdamWOptions& options() const { return options_; }
  int64_t steps() const { return t_; }
  int64_t numel() const { return numel_; }
  float* exp_avg() { return m_.data(); }     // m [numel], for checkpoints
  float* exp_avg_sq() { return v_.data(); }  // v [numel]
  void set_steps(int64_t t) { t_ = t; }      // when moments are restored from a checkpoint

  // One step over every range: value -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * value), with the
  // gradient multiplied by control->grad_multiplier, or nothing changed where control->skip is set
  // (device memory; nullptr: multiplier 1, no skip). Ranges must lie in [0, numel). The bias
  // corrections count the step on the host: after a skipped step, undo_step() before the next one.
  void step(float* value, const float* grad, std::span<const ParamRange> ranges, double lr,
            const StepControl* control, cudaStream_t stream);
  // The same step over tensors that live in separate allocations (a model's layers).
  void step(std::span<const ParamTensor> tensors, double lr, const StepControl* control, cudaStream_t stream);
  void undo_step() { --t_; }  // the last step was skipped on the device (StepControl::skip)

 private:
  AdamWOptions options_;
  int64_t numel_;
  int64_t t_ = 0;
  nibble::cuda::DeviceBuffer<float> m_, v_;
  SegmentTable<AdamWSegment> segments_;
};

// A gradient array on the device (the norm reads it, the zeroing writes it).
struct GradSpan {
  float* data = nullptr;
  int64_t count = 0;
};

// sqrt(sum of squared gradients) over several device arrays, deterministic: each array is cut into
// fixed chunks whose double partial sums are added in a fixed order (same bits run after run).
class GradNormCuda {
 public:
  void compute(std::span<const GradSpan> grads, double* norm_out, cudaStream_t stream);

 private:
  nibble::cuda::DeviceBuffer<double> partials_;
  SegmentTable<ChunkSegment> segments_;
};

// Zeroes several device arrays in one launch: the gradients before a step (GPT-2 124M has 101 of
// them, whose memsets left 0.16 ms of gaps a step between them).
class GradZeroCuda {
 public:
  void zero(std::span<const GradSpan> arrays, cudaStream_t stream);

 private:
  SegmentTable<ChunkSegment> segments_;
};

// The trainer's decisions on the device, from the `count` micro-batches' mean losses and the
// gradient norm: skip the update where the step's loss (the sum of each loss / count, in order, as
// the trainer adds them) or the norm is not finite; otherwise clip: grad_multiplier =
// (max_norm > 0 && norm > max_norm) ? float(max_norm / norm) : 1.
void step_control(const double* losses, int count, const double* norm, double max_norm, StepControl* control,
                  cudaStream_t stream);

}  // namespace nibble::train::cuda
