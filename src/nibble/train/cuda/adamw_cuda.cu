// AdamW step, global gradient norm and clipping factor on the GPU (see adamw_cuda.h). This file is
// compiled with -fmad=false: the update must round exactly as the CPU optimizer's float code.
#include <cmath>
#include <stdexcept>
#include <vector>
#include <string>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/train/cuda/adamw_cuda.h"

namespace nibble::train::cuda {

using nibble::nn::cuda::detail::blocks_for;

namespace {

struct StepArgs {
  float b1, b2, eps, bias1, bias2, lr, decay;
};

__global__ void adamw_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, StepArgs a, const float* __restrict__ multiplier) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float mult = multiplier != nullptr ? *multiplier : 1.0f;
  const float gi = g[i] * mult;
  const float mi = a.b1 * m[i] + (1.0f - a.b1) * gi;
  const float vi = a.b2 * v[i] + (1.0f - a.b2) * gi * gi;
  m[i] = mi;
  v[i] = vi;
  const float update = (mi / a.bias1) / (sqrtf(vi / a.bias2) + a.eps);
  w[i] -= a.lr * (update + a.decay * w[i]);
}

constexpr int kNormThreads = 256;
constexpr int64_t kNormChunk = kNormThreads * 16;  // elements per partial sum

__global__ void __launch_bounds__(kNormThreads)
sq_partials_kernel(const float* __restrict__ g, int64_t n, double* __restrict__ partials) {
  __shared__ double scratch[32];
  const int64_t begin = blockIdx.x * kNormChunk, end = min(n, begin + kNormChunk);
  double s = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += static_cast<double>(g[i]) * g[i];
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

__global__ void clip_kernel(const double* norm, double max_norm, float* multiplier) {
  const double nv = *norm;
  *multiplier = max_norm > 0 && nv > max_norm ? static_cast<float>(max_norm / nv) : 1.0f;
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
                     const float* grad_multiplier, cudaStream_t stream) {
  std::vector<ParamTensor> tensors;
  for (const ParamRange& r : ranges)
    tensors.push_back({value + r.offset, grad + r.offset, r.count, r.weight_decay, r.offset});
  step(tensors, lr, grad_multiplier, stream);
}

void AdamWCuda::step(std::span<const ParamTensor> tensors, double lr, const float* grad_multiplier,
                     cudaStream_t stream) {
  for (const ParamTensor& t : tensors)
    if (t.offset < 0 || t.count < 0 || t.offset + t.count > numel_)
      throw std::invalid_argument("AdamWCuda::step: range [" + std::to_string(t.offset) + ", " +
                                  std::to_string(t.offset + t.count) + ") is outside the " + std::to_string(numel_) +
                                  " parameters");
  ++t_;
  // The CPU optimizer's bias corrections: pow in double, rounded to float, subtracted in float.
  const float b1 = options_.beta1, b2 = options_.beta2;
  StepArgs a{b1, b2, options_.eps,
             1.0f - static_cast<float>(std::pow(static_cast<double>(b1), static_cast<double>(t_))),
             1.0f - static_cast<float>(std::pow(static_cast<double>(b2), static_cast<double>(t_))),
             static_cast<float>(lr), 0.0f};
  for (const ParamTensor& t : tensors) {
    if (t.count == 0) continue;
    a.decay = t.weight_decay ? options_.weight_decay : 0.0f;
    adamw_kernel<<<blocks_for(t.count, 256), 256, 0, stream>>>(t.value, t.grad, m_.data() + t.offset,
                                                               v_.data() + t.offset, t.count, a, grad_multiplier);
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
}

void GradNormCuda::compute(std::span<const GradSpan> grads, double* norm_out, cudaStream_t stream) {
  int64_t total = 0;
  for (const GradSpan& g : grads) total += (g.count + kNormChunk - 1) / kNormChunk;
  partials_.reserve(static_cast<size_t>(total > 0 ? total : 1));
  int64_t offset = 0;
  for (const GradSpan& g : grads) {
    const int64_t chunks = (g.count + kNormChunk - 1) / kNormChunk;
    if (chunks == 0) continue;
    sq_partials_kernel<<<static_cast<unsigned>(chunks), kNormThreads, 0, stream>>>(g.data, g.count,
                                                                                   partials_.data() + offset);
    NIBBLE_CUDA_CHECK_LAUNCH();
    offset += chunks;
  }
  sqrt_sum_kernel<<<1, kNormThreads, 0, stream>>>(partials_.data(), total, norm_out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void clip_multiplier(const double* norm, double max_norm, float* multiplier, cudaStream_t stream) {
  clip_kernel<<<1, 1, 0, stream>>>(norm, max_norm, multiplier);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::train::cuda
