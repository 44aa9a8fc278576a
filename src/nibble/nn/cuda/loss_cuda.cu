// Fused softmax cross-entropy and its gradient on the GPU, mirroring nn::softmax_cross_entropy
// (see layers_cuda.h).
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"

namespace nibble::nn::cuda {

namespace {

constexpr int kThreads = 256;

// One block per row: max, sum of exp in double, then the row is overwritten by
// scale * exp(x - max) (scale = grad_scale / sum, or 1 / sum for the probabilities) and the
// target's entry loses grad_scale. A bad target skips the row (its loss counts 0) and is flagged.
__global__ void __launch_bounds__(kThreads)
cross_entropy_kernel(float* __restrict__ logits, const uint32_t* __restrict__ targets, int64_t vocab,
                     float grad_scale, double* __restrict__ row_loss, unsigned long long* bad) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int64_t r = blockIdx.x;
  const uint32_t target = targets[r];
  if (target >= vocab) {
    if (threadIdx.x == 0) {
      detail::flag_bad_id(bad, r, target);
      row_loss[r] = 0.0;
    }
    return;
  }
  float* row = logits + r * vocab;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = detail::block_max(mx, fscratch);
  const float target_logit = row[target];
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(row[j] - mx);
  sum = detail::block_sum(sum, dscratch);
  const float scale = static_cast<float>((grad_scale != 0.0f ? grad_scale : 1.0f) / sum);
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float g = expf(row[j] - mx) * scale;
    if (grad_scale != 0.0f && j == target) g -= grad_scale;
    row[j] = g;
  }
  if (threadIdx.x == 0) row_loss[r] = log(sum) - static_cast<double>(target_logit - mx);
}

// One block: the rows' losses summed in a fixed order (strided per thread, then the block tree).
__global__ void __launch_bounds__(kThreads) mean_kernel(const double* __restrict__ v, int64_t n, double* out) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += v[i];
  s = detail::block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s / static_cast<double>(n);
}

}  // namespace

void CrossEntropyCuda::forward_backward(float* logits, const uint32_t* targets, int64_t rows, int64_t vocab,
                                        float grad_scale, double* loss_mean, cudaStream_t stream) {
  if (rows <= 0 || vocab <= 0)
    throw std::invalid_argument("CrossEntropyCuda: rows " + std::to_string(rows) + " and vocab " +
                                std::to_string(vocab) + " must be positive");
  row_loss_.reserve(static_cast<size_t>(rows));
  cross_entropy_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, targets, vocab, grad_scale,
                                                                             row_loss_.data(), bad_target_.device());
  NIBBLE_CUDA_CHECK_LAUNCH();
  mean_kernel<<<1, kThreads, 0, stream>>>(row_loss_.data(), rows, loss_mean);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::nn::cuda
