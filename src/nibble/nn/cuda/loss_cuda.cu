// Fused softmax cross-entropy and its gradient on the GPU, mirroring nn::softmax_cross_entropy
// (see layers_cuda.h).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/nn/cuda/loss_kernels.cuh"

namespace nibble::nn::cuda {

namespace {

using detail::kLossThreads;

// One block: the rows' losses summed in a fixed order (strided per thread, then the block tree).
__global__ void __launch_bounds__(kLossThreads) mean_kernel(const double* __restrict__ v, int64_t n, double* out) {
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

// The staged kernel for each logit type: FP32 (in place), BF16 (chunks).
const void* staged_kernel(size_t bytes) {
  if (bytes == sizeof(float)) return reinterpret_cast<const void*>(&detail::cross_entropy_staged_kernel<float>);
  return reinterpret_cast<const void*>(&detail::cross_entropy_staged_kernel<__nv_bfloat16>);
}

}  // namespace

unsigned CrossEntropyCuda::staged_blocks(int64_t rows, int64_t vocab, const void* logits, const void* out,
                                         size_t bytes) {
  if (kernel_ != CrossEntropyKernel::kStaged) return 0;
  int device = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  if (device != stage_.device) {
    StageLimits limits;
    int major = 0, optin = 0;
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sms, cudaDevAttrMultiProcessorCount, device));
    if (major >= 9) {  // bulk copies and mbarrier transaction counts: sm_90 and later
      size_t static_bytes = 0;
      for (const size_t bytes : {sizeof(float), sizeof(__nv_bfloat16)}) {
        cudaFuncAttributes attributes{};
        NIBBLE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, staged_kernel(bytes)));
        static_bytes = std::max(static_bytes, attributes.sharedSizeBytes);
      }
      if (static_cast<size_t>(optin) > static_bytes)
        limits.max_dynamic_shared = static_cast<size_t>(optin) - static_bytes;
      for (const size_t bytes : {sizeof(float), sizeof(__nv_bfloat16)})
        NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(staged_kernel(bytes), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(limits.max_dynamic_shared)));
    }
    limits.device = device;
    stage_ = limits;
  }
  if (!detail::stage_fits(vocab, logits, out, bytes, stage_.max_dynamic_shared)) return 0;
  if (vocab != stage_.vocab) {
    for (int i = 0; i < 2; ++i) {
      const size_t type_bytes = i == 0 ? sizeof(float) : sizeof(__nv_bfloat16);
      const void* kernel = staged_kernel(type_bytes);
      NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&stage_.blocks_per_sm[i], kernel, kLossThreads,
                                                                      detail::stage_shared_bytes(vocab, type_bytes)));
    }
    stage_.vocab = vocab;
  }
  const int64_t resident = static_cast<int64_t>(stage_.blocks_per_sm[bytes == sizeof(float) ? 0 : 1]) * stage_.sms;
  return static_cast<unsigned>(std::min(rows, resident));  // 0 when none fits: the strided kernel
}

bool CrossEntropyCuda::staged(int64_t vocab) {
  return vocab > 0 && staged_blocks(1, vocab, nullptr, nullptr, sizeof(__nv_bfloat16)) > 0 &&
         staged_blocks(1, vocab, nullptr, nullptr, sizeof(float)) > 0;
}

void CrossEntropyCuda::forward_backward(float* logits, const uint32_t* targets, int64_t rows, int64_t vocab,
                                        float grad_scale, double* loss_mean, cudaStream_t stream) {
  check_shape(rows, vocab);
  row_loss_.reserve(static_cast<size_t>(rows));
  if (const unsigned blocks = staged_blocks(rows, vocab, logits, logits, sizeof(float))) {
    detail::cross_entropy_staged_kernel<float>
        <<<blocks, kLossThreads, detail::stage_shared_bytes(vocab, sizeof(float)), stream>>>(
        logits, targets, 0, rows, vocab, grad_scale, logits, row_loss_.data(), bad_target_.device());
  } else {
    detail::cross_entropy_kernel<<<static_cast<unsigned>(rows), kLossThreads, 0, stream>>>(
        logits, targets, vocab, grad_scale, row_loss_.data(), bad_target_.device());
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
  mean(rows, loss_mean, stream);
}

void CrossEntropyCuda::chunk(const __nv_bfloat16* logits, const uint32_t* targets, int64_t row0, int64_t rows,
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
  if (const unsigned blocks = staged_blocks(rows, vocab, logits, dlogits, sizeof(__nv_bfloat16))) {
    const size_t bytes = detail::stage_shared_bytes(vocab, sizeof(__nv_bfloat16));
    detail::cross_entropy_staged_kernel<__nv_bfloat16><<<blocks, kLossThreads, bytes, stream>>>(
        logits, targets, row0, rows, vocab, grad_scale, dlogits, row_loss_.data(), bad_target_.device());
  } else {
    detail::cross_entropy_chunk_kernel<<<static_cast<unsigned>(rows), kLossThreads, 0, stream>>>(
        logits, targets, row0, vocab, grad_scale, dlogits, row_loss_.data(), bad_target_.device());
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void CrossEntropyCuda::mean(int64_t total_rows, double* loss_mean, cudaStream_t stream) {
  if (total_rows <= 0 || row_loss_.size() < static_cast<size_t>(total_rows))
    throw std::invalid_argument("CrossEntropyCuda::mean: " + std::to_string(total_rows) +
                                " rows, but the losses of only " + std::to_string(row_loss_.size()) + " are kept");
  mean_kernel<<<1, kLossThreads, 0, stream>>>(row_loss_.data(), total_rows, loss_mean);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::nn::cuda
