// AdamW step, global gradient norm, clipping factor and skip decision on the GPU (see adamw_cuda.h). This file is
// compiled with -fmad=false: the update must round exactly as the CPU optimizer's float code.
#include <cmath>
#include <stdexcept>
#include <vector>
#include <string>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/quant/cuda/amax_device.cuh"
#include "nibble/train/cuda/adamw_cuda.h"
#include "nibble/train/step_rule.h"

namespace nibble::train::cuda {

using nibble::nn::cuda::detail::blocks_for;

namespace {

struct StepArgs {
  float b1, b2, eps, bias1, bias2, lr;
};

// The step runs as one launch over every tensor: block b updates kAdamWBlockElements elements of the
// segment whose blocks start at or before b (found by binary search in the table, which the host
// builds once per list of tensors).
constexpr int kAdamWThreads = 256;
constexpr int kAdamWPerThread = 4;
constexpr int64_t kAdamWBlockElements = kAdamWThreads * kAdamWPerThread;

// The first segment whose blocks start at or before `block`, of segments sorted by first_block.
template <typename Segment>
__device__ const Segment& segment_of(const Segment* segs, int n, unsigned block) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (segs[mid].first_block <= block) lo = mid;
    else hi = mid - 1;
  }
  return segs[lo];
}

__global__ void __launch_bounds__(kAdamWThreads)
    adamw_kernel(const AdamWSegment* __restrict__ segs, int n_segs, float* __restrict__ m, float* __restrict__ v,
                 StepArgs a, const StepControl* __restrict__ control) {
  const AdamWSegment& seg = segment_of(segs, n_segs, blockIdx.x);
  float* __restrict__ w = seg.value;
  const float* __restrict__ g = seg.grad;
  const float decay = seg.decay;
  const float mult = control != nullptr ? control->grad_multiplier : 1.0f;
  const bool apply = control == nullptr || control->skip == 0;
  const int64_t begin = (blockIdx.x - seg.first_block) * kAdamWBlockElements;
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < kAdamWPerThread; ++k) {
    const int64_t i = begin + k * kAdamWThreads + threadIdx.x;
    if (i >= seg.count) break;
    float wi = w[i];
    if (apply) {
      const int64_t j = seg.moment_offset + i;
      const float gi = g[i] * mult;
      const float mi = a.b1 * m[j] + (1.0f - a.b1) * gi;
      const float vi = a.b2 * v[j] + (1.0f - a.b2) * gi * gi;
      m[j] = mi;
      v[j] = vi;
      const float update = (mi / a.bias1) / (sqrtf(vi / a.bias2) + a.eps);
      wi = wi - a.lr * (update + decay * wi);
      w[i] = wi;
    }
    if (seg.bf16 != nullptr) seg.bf16[i] = BF16::encode(wi, Rounding::kNearestEven);
    amax = nibble::cuda::fmax_abs_nan(amax, wi);
  }
  // The amax pass's word of the updated tensor (the same maximum, NaN included), uniform per block;
  // written for a skipped step too, whose readers expect it.
  if (seg.amax != nullptr) {
    if (blockIdx.x == seg.first_block && threadIdx.x == 0) seg.amax_zero_next[0] = seg.amax_zero_next[1] = 0;
    nibble::cuda::block_max_to_global(float_bits(amax), seg.amax);
  }
}

constexpr int kNormThreads = 256;
constexpr int64_t kNormChunk = kNormThreads * 16;  // elements per partial sum

// One launch over every gradient array: block b sums the squares of chunk b of the concatenated
// chunk list (each array cut into chunks of kNormChunk from its start).
__global__ void __launch_bounds__(kNormThreads)
    sq_partials_kernel(const ChunkSegment* __restrict__ segs, int n_segs, double* __restrict__ partials) {
  __shared__ double scratch[32];
  const ChunkSegment& seg = segment_of(segs, n_segs, blockIdx.x);
  const int64_t begin = (blockIdx.x - seg.first_block) * kNormChunk, end = min(seg.count, begin + kNormChunk);
  double s = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += static_cast<double>(seg.data[i]) * seg.data[i];
  s = nibble::nn::cuda::detail::block_sum(s, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kNormThreads) sqrt_sum_kernel(const double* __restrict__ p, int64_t n, double* out) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += p[i];
  s = nibble::nn::cuda::detail::block_sum(s, scratch);
  if (threadIdx.x == 0) *out = sqrt(s);
}

constexpr int kZeroThreads = 256;
constexpr int64_t kZeroChunk = kZeroThreads * 16;  // elements a block zeroes

__global__ void __launch_bounds__(kZeroThreads) zero_kernel(const ChunkSegment* __restrict__ segs, int n_segs) {
  const ChunkSegment& seg = segment_of(segs, n_segs, blockIdx.x);
  const int64_t begin = (blockIdx.x - seg.first_block) * kZeroChunk, end = min(seg.count, begin + kZeroChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += kZeroThreads) seg.data[i] = 0.0f;
}

// As the CPU engine decides (step_rule.h).
__global__ void step_control_kernel(const double* losses, int count, const double* norm, double max_norm,
                                    StepControl* control) {
  const double loss = step_loss(losses, count), nv = *norm;
  control->skip = !isfinite(loss) || !isfinite(nv);
  control->grad_multiplier = clip_multiplier(max_norm, nv);
}

}  // namespace

AdamWCuda::AdamWCuda(AdamWOptions options, int64_t numel) : options_(options), numel_(numel) {
  if (numel <= 0) throw std::invalid_argument("AdamWCuda: numel must be positive");
  m_.resize(static_cast<size_t>(numel));
  v_.resize(static_cast<size_t>(numel));
  m_.zero();
  v_.zero();
}

void AdamWCuda::step(float* value, const float* grad, std::span<const ParamRange> ranges, double lr,
                     const StepControl* control, cudaStream_t stream) {
  std::vector<ParamTensor> tensors;
  for (const ParamRange& r : ranges)
    tensors.push_back({value + r.offset, grad + r.offset, r.count, r.weight_decay, r.offset});
  step(tensors, lr, control, stream);
}

void AdamWCuda::step(std::span<const ParamTensor> tensors, double lr, const StepControl* control,
                     cudaStream_t stream) {
  for (const ParamTensor& t : tensors)
    if (t.offset < 0 || t.count < 0 || t.offset + t.count > numel_)
      throw std::invalid_argument("AdamWCuda::step: range [" + std::to_string(t.offset) + ", " +
                                  std::to_string(t.offset + t.count) + ") is outside the " + std::to_string(numel_) +
                                  " parameters");
  ++t_;
  // The CPU optimizer's bias corrections: pow in double, rounded to float, subtracted in float.
  const float b1 = options_.beta1, b2 = options_.beta2;
  const StepArgs a{b1, b2, options_.eps,
                   1.0f - static_cast<float>(std::pow(static_cast<double>(b1), static_cast<double>(t_))),
                   1.0f - static_cast<float>(std::pow(static_cast<double>(b2), static_cast<double>(t_))),
                   static_cast<float>(lr)};
  std::vector<AdamWSegment> segs;
  int64_t blocks = 0;
  for (const ParamTensor& t : tensors) {
    if (t.count == 0) continue;
    if ((t.amax.current == nullptr) != (t.amax.zero_next == nullptr))
      throw std::invalid_argument("AdamWCuda::step: an amax slot without the slot to zero, or the reverse");
    segs.push_back({t.value, t.grad, t.offset, t.count, t.weight_decay ? options_.weight_decay : 0.0f,
                    static_cast<uint32_t>(blocks), t.amax.current, t.amax.zero_next,
                    reinterpret_cast<uint16_t*>(t.bf16)});
    blocks += (t.count + kAdamWBlockElements - 1) / kAdamWBlockElements;
  }
  if (segs.empty()) return;
  if (blocks > 0x7fffffffLL) throw std::invalid_argument("AdamWCuda::step: too many parameters for one launch");
  segments_.set(segs, stream);
  adamw_kernel<<<static_cast<unsigned>(blocks), kAdamWThreads, 0, stream>>>(
      segments_.device(), static_cast<int>(segs.size()), m_.data(), v_.data(), a, control);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

namespace {

// The segments of a launch in which block b handles chunk b of the arrays' chunks of `chunk`
// elements (each array cut from its start; empty arrays have none). Returns the number of blocks.
int64_t chunk_segments(std::span<const GradSpan> arrays, int64_t chunk, std::vector<ChunkSegment>& segs,
                       const char* what) {
  int64_t total = 0;
  for (const GradSpan& a : arrays) {
    const int64_t chunks = (a.count + chunk - 1) / chunk;
    if (chunks == 0) continue;
    segs.push_back({a.data, a.count, static_cast<uint32_t>(total)});
    total += chunks;
  }
  if (total > 0x7fffffffLL) throw std::invalid_argument(std::string(what) + ": too many elements for one launch");
  return total;
}

}  // namespace

void GradNormCuda::compute(std::span<const GradSpan> grads, double* norm_out, cudaStream_t stream) {
  std::vector<ChunkSegment> segs;
  const int64_t total = chunk_segments(grads, kNormChunk, segs, "GradNormCuda::compute");
  partials_.reserve(static_cast<size_t>(total > 0 ? total : 1));
  if (!segs.empty()) {
    segments_.set(segs, stream);
    sq_partials_kernel<<<static_cast<unsigned>(total), kNormThreads, 0, stream>>>(
        segments_.device(), static_cast<int>(segs.size()), partials_.data());
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  sqrt_sum_kernel<<<1, kNormThreads, 0, stream>>>(partials_.data(), total, norm_out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void GradZeroCuda::zero(std::span<const GradSpan> arrays, cudaStream_t stream) {
  std::vector<ChunkSegment> segs;
  const int64_t total = chunk_segments(arrays, kZeroChunk, segs, "GradZeroCuda::zero");
  if (segs.empty()) return;
  segments_.set(segs, stream);
  zero_kernel<<<static_cast<unsigned>(total), kZeroThreads, 0, stream>>>(segments_.device(),
                                                                         static_cast<int>(segs.size()));
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void step_control(const double* losses, int count, const double* norm, double max_norm, StepControl* control,
                  cudaStream_t stream) {
  if (count <= 0) throw std::invalid_argument("step_control: no micro-batch losses");
  step_control_kernel<<<1, 1, 0, stream>>>(losses, count, norm, max_norm, control);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::train::cuda
