// LayerNorm / RMSNorm forward and backward on the GPU, mirroring nn::Norm (see layers_cuda.h).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/nn/cuda/norm_kernels.cuh"

namespace nibble::nn::cuda {

using detail::blocks_for;

namespace {

__global__ void fill_kernel(float* p, int64_t n, float v) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = v;
}

// Whether rows take the vector kernels: a multiple of 128 elements, at most 128 * kVecChunks, and
// rows aligned for 4-element loads and stores at the given input and output.
template <typename In, typename Out>
bool vector_rows(int64_t dim, const In* in, const Out* out) {
  const auto ok = [](const void* p, size_t elem) { return reinterpret_cast<uintptr_t>(p) % (4 * elem) == 0; };
  return dim % 128 == 0 && dim <= 128 * kVecChunks && ok(in, sizeof(In)) && ok(out, sizeof(Out));
}

// The finish of a norm's parameter gradients from its backward's partials (weight, then bias).
NormFinishJob finish_job(const double* partials, int64_t chunks, int64_t dim, float* gw, float* gb) {
  return {partials, partials + chunks * dim, chunks, dim, gw, gb};
}

}  // namespace

NormCuda::NormCuda(int64_t dim, NormKind kind, float eps) : dim_(dim), kind_(kind), eps_(eps) {
  if (dim <= 0) throw std::invalid_argument("NormCuda: dim must be positive");
  weight_.resize(static_cast<size_t>(dim));
  weight_grad_.resize(weight_.size());
  fill_kernel<<<blocks_for(dim, 256), 256>>>(weight_.data(), dim, 1.0f);
  NIBBLE_CUDA_CHECK_LAUNCH();
  weight_grad_.zero();
  if (has_bias()) {
    bias_.resize(weight_.size());
    bias_grad_.resize(weight_.size());
    bias_.zero();
    bias_grad_.zero();
  }
}

void NormCuda::zero_grad(cudaStream_t stream) {
  pending_finish_ = false;  // the partials of a backward that did not finish add to nothing now
  weight_grad_.zero(stream);
  bias_grad_.zero(stream);
}

void NormCuda::forward(const float* x, int64_t rows, float* y, cudaStream_t stream) { forward_impl(x, rows, y, stream, {}); }
void NormCuda::forward(const float* x, int64_t rows, bf16_t* y, cudaStream_t stream,
                       nibble::cuda::ProducerAmax amax) {
  forward_impl(x, rows, y, stream, amax);
}

template <typename Out>
void NormCuda::forward_impl(const float* x, int64_t rows, Out* y, cudaStream_t stream,
                            const nibble::cuda::ProducerAmax& amax) {
  if (rows <= 0) throw std::invalid_argument("NormCuda::forward: rows must be positive, got " + std::to_string(rows));
  constexpr bool bf16_rows = std::is_same_v<Out, bf16_t>;
  Out* xhat;  // the normalized rows, saved in the output's precision (see layers_cuda.h)
  if constexpr (bf16_rows) {
    saved_xhat16_.reserve(static_cast<size_t>(rows * dim_));
    xhat = saved_xhat16_.data();
  } else {
    saved_xhat_.reserve(static_cast<size_t>(rows * dim_));
    xhat = saved_xhat_.data();
  }
  saved_bf16_ = bf16_rows;
  saved_rstd_.reserve(static_cast<size_t>(rows));
  const bool vector = vector_rows(dim_, x, y);
  const float* bias = has_bias() ? bias_.data() : nullptr;
  bool amax_done = false;
  if constexpr (bf16_rows) {
    if (amax && vector && rows % kAmaxRows == 0) {  // the amax in the same kernel
      norm_forward_vec_amax_kernel<<<static_cast<unsigned>(rows / kAmaxRows), 32 * kAmaxRows, 0, stream>>>(
          x, dim_, kind_ == NormKind::kLayerNorm, eps_, weight_.data(), bias, y, xhat, saved_rstd_.data(), amax);
      amax_done = true;
    }
  }
  if (!amax_done) {
    const auto kernel = vector ? norm_forward_vec_kernel<Out> : norm_forward_kernel<Out>;
    kernel<<<blocks_for(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
        x, rows, dim_, kind_ == NormKind::kLayerNorm, eps_, weight_.data(), bias, y, xhat, saved_rstd_.data());
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
  if (amax && !amax_done) nibble::cuda::nvfp4_amax(y, rows, dim_, amax, stream);  // other shapes: after the forward
  saved_rows_ = rows;
}

void NormCuda::backward(const float* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16,
                        nibble::cuda::ProducerAmax amax) {
  backward_saved(dy, dx, stream, accumulate, dx_bf16, amax);
}
void NormCuda::backward(const bf16_t* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16,
                        nibble::cuda::ProducerAmax amax) {
  backward_saved(dy, dx, stream, accumulate, dx_bf16, amax);
}

template <typename DyT>
void NormCuda::backward_saved(const DyT* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16,
                              const nibble::cuda::ProducerAmax& amax) {
  if (saved_rows_ == 0) throw std::logic_error("NormCuda::backward without a forward");
  if (pending_finish_)
    throw std::logic_error("NormCuda::backward: the last backward's parameter gradients are not finished "
                           "(finish_deferred)");
  if (amax && dx_bf16 == nullptr) throw std::logic_error("NormCuda::backward: an amax asked for without dx in BF16");
  if (saved_bf16_) backward_impl(dy, saved_xhat16_.data(), dx, stream, accumulate, dx_bf16, amax);
  else backward_impl(dy, saved_xhat_.data(), dx, stream, accumulate, dx_bf16, amax);
  saved_rows_ = 0;
}

template <typename DyT, typename XhT>
void NormCuda::backward_impl(const DyT* dy, const XhT* xhat, float* dx, cudaStream_t stream, bool accumulate,
                             bf16_t* dx_bf16, const nibble::cuda::ProducerAmax& amax) {
  const int64_t rows = saved_rows_;
  const bool centered = kind_ == NormKind::kLayerNorm;
  const bool vector = vector_rows(dim_, dy, dx) && (dx_bf16 == nullptr || vector_rows(dim_, dx_bf16, dx_bf16));
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  bool amax_done = false;
  partials_.reserve(static_cast<size_t>(2 * chunks * dim_));
  double* pw = partials_.data();
  double* pb = pw + chunks * dim_;
  if (vector) {  // dx and the partials in one pass
    const auto kernel = norm_backward_params_vec_kernel<DyT, XhT>;
    const size_t smem = static_cast<size_t>((has_bias() ? 2 : 1) * kRowsPerBlock * dim_) * sizeof(float);
    // Beyond 48 KiB of shared memory a block, static (the amax's block maximum) and dynamic
    // together, the kernel must opt in (GPT-2's 768 with a bias: 48 KiB dynamic; 1024: 64 KiB).
    static const size_t static_smem = [&] {
      cudaFuncAttributes attributes{};
      NIBBLE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
      return attributes.sharedSizeBytes;
    }();
    if (smem + static_smem > 48 * 1024)
      NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const bool amax_here = amax && rows % 16 == 0;
    kernel<<<static_cast<unsigned>(chunks), kRowThreads, smem, stream>>>(
        dy, xhat, saved_rstd_.data(), weight_.data(), rows, dim_, centered, accumulate, dx, dx_bf16, has_bias(), pw,
        pb, amax_here ? amax : nibble::cuda::ProducerAmax{});
    NIBBLE_CUDA_CHECK_LAUNCH();
    amax_done = amax_here;
  } else {
    norm_backward_kernel<DyT, XhT><<<blocks_for(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
        dy, xhat, saved_rstd_.data(), weight_.data(), rows, dim_, centered, accumulate, dx, dx_bf16);
    NIBBLE_CUDA_CHECK_LAUNCH();
    const dim3 grid(blocks_for(dim_, 128), static_cast<unsigned>(chunks));
    norm_param_partials_kernel<<<grid, 128, 0, stream>>>(dy, xhat, rows, dim_, has_bias(), pw, pb);
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  if (defer_finish_) {
    pending_finish_ = true;
    pending_chunks_ = chunks;
  } else {
    norm_param_finish_kernel<<<blocks_for(dim_, 32), 32 * kFinishWarps, 0, stream>>>(
        finish_job(partials_.data(), chunks, dim_, weight_grad_.data(), has_bias() ? bias_grad_.data() : nullptr));
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  if (amax && !amax_done) nibble::cuda::nvfp4_amax(dx_bf16, rows, dim_, amax, stream);
}

void NormCuda::finish_deferred(std::span<NormCuda* const> norms, cudaStream_t stream) {
  static_assert(sizeof(NormFinishJobs) <= 4096, "kernel parameters are limited to 4 KiB");
  NormFinishJobs jobs{};
  NormCuda* in_launch[kFinishJobsPerLaunch];
  unsigned count = 0, col_blocks = 0;
  const auto launch = [&] {
    if (count == 0) return;
    norm_param_finish_jobs_kernel<<<dim3(col_blocks, count), 32 * kFinishWarps, 0, stream>>>(jobs);
    NIBBLE_CUDA_CHECK_LAUNCH();
    for (unsigned i = 0; i < count; ++i) in_launch[i]->pending_finish_ = false;
    count = col_blocks = 0;
  };
  for (NormCuda* norm : norms) {
    if (!norm->pending_finish_) continue;
    jobs.job[count] = finish_job(norm->partials_.data(), norm->pending_chunks_, norm->dim_, norm->weight_grad_.data(),
                                 norm->has_bias() ? norm->bias_grad_.data() : nullptr);
    in_launch[count++] = norm;
    col_blocks = std::max(col_blocks, blocks_for(norm->dim_, 32));
    if (count == kFinishJobsPerLaunch) launch();
  }
  launch();
}

}  // namespace nibble::nn::cuda
