// Fused softmax cross-entropy and its gradient on the GPU, mirroring nn::softmax_cross_entropy
// (see layers_cuda.h).
#include <stdexcept>
#include <string>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"

namespace nibble::nn::cuda {

namespace {

constexpr int kThreads = 256;

// How one gradient value is stored: FP32 as computed, or BF16 rounded to nearest even exactly as
// OperandCuda rounds a bf16 operand (BF16::encode), so that the chunked head's BF16 dlogits are the
// bits the unchunked head fed its GEMMs.
__device__ __forceinline__ void store(float* out, float g) { *out = g; }
__device__ __forceinline__ void store(__nv_bfloat16* out, float g) {
  *reinterpret_cast<uint16_t*>(out) = BF16::encode(g, Rounding::kNearestEven);
}

// One row, one block: max, sum of exp in double, then out (when not nullptr) = scale * exp(x - max)
// (scale = grad_scale / sum, or 1 / sum for the probabilities) and the target's entry loses
// grad_scale. `out` may be `row` itself (each thread rewrites only the entries it read). A bad
// target zeroes the output row, counts 0 and is flagged at its batch position.
//
// Every instantiation runs the same float operations in the same order (the per-thread strided
// sums and the block tree depend only on the block size); the multiply and the subtraction are
// written as _rn intrinsics so that no instantiation contracts them into an FMA, which would round
// once instead of twice. That is what makes the BF16 output the rounding of the FP32 one, bit for bit.
template <typename Out>
__device__ void cross_entropy_row(const float* row, uint32_t target, int64_t vocab, float grad_scale, int64_t position,
                                  Out* out, double* row_loss, unsigned long long* bad) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  if (target >= vocab) {
    if (threadIdx.x == 0) {
      detail::flag_bad_id(bad, position, target);
      *row_loss = 0.0;
    }
    if (out != nullptr)
      for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) store(out + j, 0.0f);
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = detail::block_max(mx, fscratch);
  const float target_logit = row[target];
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(row[j] - mx);
  sum = detail::block_sum(sum, dscratch);
  // Every thread has read row[target] before any thread writes (block_sum synchronises).
  if (out != nullptr) {
    const float scale = static_cast<float>((grad_scale != 0.0f ? grad_scale : 1.0f) / sum);
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      float g = __fmul_rn(expf(row[j] - mx), scale);
      if (grad_scale != 0.0f && j == target) g = __fsub_rn(g, grad_scale);
      store(out + j, g);
    }
  }
  if (threadIdx.x == 0) *row_loss = log(sum) - static_cast<double>(target_logit - mx);
}

// In place: the logits become the gradient (or the probabilities).
__global__ void __launch_bounds__(kThreads)
cross_entropy_kernel(float* __restrict__ logits, const uint32_t* __restrict__ targets, int64_t vocab,
                     float grad_scale, double* __restrict__ row_loss, unsigned long long* bad) {
  const int64_t r = blockIdx.x;
  float* row = logits + r * vocab;
  cross_entropy_row(row, targets[r], vocab, grad_scale, r, row, row_loss + r, bad);
}

// A chunk of rows [row0, row0 + gridDim.x) of a batch: logits and dlogits hold the chunk's rows;
// targets and row_loss are the batch's.
__global__ void __launch_bounds__(kThreads)
cross_entropy_chunk_kernel(const float* __restrict__ logits, const uint32_t* __restrict__ targets, int64_t row0,
                           int64_t vocab, float grad_scale, __nv_bfloat16* __restrict__ dlogits,
                           double* __restrict__ row_loss, unsigned long long* bad) {
  const int64_t r = blockIdx.x, position = row0 + r;
  cross_entropy_row(logits + r * vocab, targets[position], vocab, grad_scale, position,
                    dlogits != nullptr ? dlogits + r * vocab : nullptr, row_loss + position, bad);
}

// One block: the rows' losses summed in a fixed order (strided per thread, then the block tree).
__global__ void __launch_bounds__(kThreads) mean_kernel(const double* __restrict__ v, int64_t n, double* out) {
  __shared__ double scratch[32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += v[i];
  s = detail::block_sum(s, scratch);
  if (threadIdx.x == 0) *out = s / static_cast<double>(n);
}

void check_shape(int64_t rows, int64_t vocab) {
  if (rows <= 0 || vocab <= 0)
    throw std::invalid_argument("CrossEntropyCuda: rows " + std::to_string(rows) + " and vocab " +
                                std::to_string(vocab) + " must be positive");
  if (rows > 0x7fffffffLL) throw std::invalid_argument("CrossEntropyCuda: more rows than a grid takes");
}

}  // namespace

void CrossEntropyCuda::forward_backward(float* logits, const uint32_t* targets, int64_t rows, int64_t vocab,
                                        float grad_scale, double* loss_mean, cudaStream_t stream) {
  check_shape(rows, vocab);
  row_loss_.reserve(static_cast<size_t>(rows));
  cross_entropy_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, targets, vocab, grad_scale,
                                                                             row_loss_.data(), bad_target_.device());
  NIBBLE_CUDA_CHECK_LAUNCH();
  mean(rows, loss_mean, stream);
}

void CrossEntropyCuda::chunk(const float* logits, const uint32_t* targets, int64_t row0, int64_t rows,
                             int64_t total_rows, int64_t vocab, float grad_scale, __nv_bfloat16* dlogits,
                             cudaStream_t stream) {
  check_shape(rows, vocab);
  if (row0 < 0 || row0 + rows > total_rows)
    throw std::invalid_argument("CrossEntropyCuda::chunk: rows [" + std::to_string(row0) + ", " +
                                std::to_string(row0 + rows) + ") are not inside the batch's " +
                                std::to_string(total_rows));
  // Grows only at a batch's first chunk in practice (total_rows is the same for all its chunks).
  if (row_loss_.size() < static_cast<size_t>(total_rows) && row0 != 0)
    throw std::logic_error("CrossEntropyCuda::chunk: a batch's first chunk must start at row 0");
  row_loss_.reserve(static_cast<size_t>(total_rows));
  cross_entropy_chunk_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, targets, row0, vocab, grad_scale, dlogits, row_loss_.data(), bad_target_.device());
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void CrossEntropyCuda::mean(int64_t total_rows, double* loss_mean, cudaStream_t stream) {
  if (total_rows <= 0 || row_loss_.size() < static_cast<size_t>(total_rows))
    throw std::invalid_argument("CrossEntropyCuda::mean: " + std::to_string(total_rows) +
                                " rows, but the losses of only " + std::to_string(row_loss_.size()) + " are kept");
  mean_kernel<<<1, kThreads, 0, stream>>>(row_loss_.data(), total_rows, loss_mean);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::nn::cuda
