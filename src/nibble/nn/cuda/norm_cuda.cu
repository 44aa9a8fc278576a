// LayerNorm / RMSNorm forward and backward on the GPU, mirroring nn::Norm (see layers_cuda.h).
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"

namespace nibble::nn::cuda {

using detail::blocks_for;

namespace {

constexpr int kRowThreads = 256;  // 8 rows per block, one warp each
constexpr int kRowsPerBlock = kRowThreads / 32;
constexpr int64_t kChunkRows = 64;  // rows per partial sum of the parameter gradients

// One warp per row (rows are short: d_model elements; a block per row left most threads idle and
// synchronised the block twice): mean (LayerNorm) and variance in double, two passes as the CPU
// does. The row is re-read from L1 in each pass.
template <typename Out>
__global__ void __launch_bounds__(kRowThreads)
norm_forward_kernel(const float* __restrict__ x, int64_t rows, int64_t dim, bool centered, float eps,
                    const float* __restrict__ weight, const float* __restrict__ bias, Out* __restrict__ y,
                    float* __restrict__ xhat, float* __restrict__ rstd_out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const float* xr = x + r * dim;
  double mean = 0.0;
  if (centered) {
    double s = 0.0;
    for (int64_t i = lane; i < dim; i += 32) s += xr[i];
    mean = detail::warp_sum(s) / static_cast<double>(dim);
  }
  double v = 0.0;
  for (int64_t i = lane; i < dim; i += 32) {
    const double c = xr[i] - mean;
    v += c * c;
  }
  const double var = detail::warp_sum(v) / static_cast<double>(dim);
  const double rstd = 1.0 / sqrt(var + static_cast<double>(eps));
  if (lane == 0) rstd_out[r] = static_cast<float>(rstd);
  for (int64_t i = lane; i < dim; i += 32) {
    const float h = static_cast<float>((xr[i] - mean) * rstd);
    xhat[r * dim + i] = h;
    detail::write_out(y + r * dim + i, h * weight[i] + (bias != nullptr ? bias[i] : 0.0f));
  }
}

// dx = rstd * (dxhat - mean(dxhat) [LayerNorm] - xhat * mean(dxhat * xhat)), dxhat = dy * g.
// One warp per row, as the forward. dx16 (optional): the final dx rounded to BF16 as well.
// dy in FP32 or BF16 (DyT; the GPU model's linear dX in BF16), read as FP32 (exact).
template <typename DyT>
__global__ void __launch_bounds__(kRowThreads)
norm_backward_kernel(const DyT* __restrict__ dy, const float* __restrict__ xhat, const float* __restrict__ rstd,
                     const float* __restrict__ weight, int64_t rows, int64_t dim, bool centered, bool accumulate,
                     float* __restrict__ dx, bf16_t* __restrict__ dx16) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const DyT* dyr = dy + r * dim;
  const float* xh = xhat + r * dim;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t i = lane; i < dim; i += 32) {
    const double d = static_cast<double>(to_float(dyr[i])) * weight[i];
    s1 += d;
    s2 += d * xh[i];
  }
  const double mean_dxhat = centered ? detail::warp_sum(s1) / static_cast<double>(dim) : 0.0;
  const double mean_dxhat_xhat = detail::warp_sum(s2) / static_cast<double>(dim);
  const double rs = rstd[r];
  for (int64_t i = lane; i < dim; i += 32) {
    const double d = static_cast<double>(to_float(dyr[i])) * weight[i];
    const float g = static_cast<float>(rs * (d - mean_dxhat - xh[i] * mean_dxhat_xhat));
    const float out = accumulate ? dx[r * dim + i] + g : g;
    dx[r * dim + i] = out;
    if (dx16 != nullptr) detail::write_out(dx16 + r * dim + i, out);
  }
}

// Parameter-gradient partials: one thread per (column, chunk of kChunkRows rows), in double.
template <typename DyT>
__global__ void norm_param_partials_kernel(const DyT* __restrict__ dy, const float* __restrict__ xhat,
                                           int64_t rows, int64_t dim, bool with_bias, double* __restrict__ pw,
                                           double* __restrict__ pb) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (col >= dim) return;
  const int64_t r0 = chunk * kChunkRows, r1 = min(rows, r0 + kChunkRows);
  double sw = 0.0, sb = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float d = to_float(dy[r * dim + col]);
    sw += static_cast<double>(d) * xhat[r * dim + col];
    sb += d;
  }
  pw[chunk * dim + col] = sw;
  if (with_bias) pb[chunk * dim + col] = sb;
}

// grad[col] += sum over chunks. A block takes 32 columns; its 8 warps sum every 8th chunk in order,
// then warp 0 adds the 8 partial sums in warp order: a fixed order (deterministic), and 8 x 24
// warps at work for GPT-2's 768 columns instead of 24 (one thread per column walking 256 chunks).
constexpr int kFinishWarps = 8;
__global__ void __launch_bounds__(32 * kFinishWarps)
norm_param_finish_kernel(const double* __restrict__ pw, const double* __restrict__ pb, int64_t chunks, int64_t dim,
                         float* __restrict__ gw, float* __restrict__ gb) {
  __shared__ double part[2][kFinishWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t col = blockIdx.x * 32 + lane;
  double sw = 0.0, sb = 0.0;
  if (col < dim)
    for (int64_t c = warp; c < chunks; c += kFinishWarps) {
      sw += pw[c * dim + col];
      if (gb != nullptr) sb += pb[c * dim + col];
    }
  part[0][warp][lane] = sw;
  part[1][warp][lane] = sb;
  __syncthreads();
  if (warp != 0 || col >= dim) return;
  sw = sb = 0.0;
  for (int w = 0; w < kFinishWarps; ++w) {
    sw += part[0][w][lane];
    sb += part[1][w][lane];
  }
  gw[col] = static_cast<float>(gw[col] + sw);
  if (gb != nullptr) gb[col] = static_cast<float>(gb[col] + sb);
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = v;
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
  weight_grad_.zero(stream);
  bias_grad_.zero(stream);
}

void NormCuda::forward(const float* x, int64_t rows, float* y, cudaStream_t stream) { forward_impl(x, rows, y, stream); }
void NormCuda::forward(const float* x, int64_t rows, bf16_t* y, cudaStream_t stream) { forward_impl(x, rows, y, stream); }

template <typename Out>
void NormCuda::forward_impl(const float* x, int64_t rows, Out* y, cudaStream_t stream) {
  if (rows <= 0) throw std::invalid_argument("NormCuda::forward: rows must be positive, got " + std::to_string(rows));
  saved_xhat_.reserve(static_cast<size_t>(rows * dim_));
  saved_rstd_.reserve(static_cast<size_t>(rows));
  norm_forward_kernel<<<blocks_for(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
      x, rows, dim_, kind_ == NormKind::kLayerNorm, eps_, weight_.data(), has_bias() ? bias_.data() : nullptr, y,
      saved_xhat_.data(), saved_rstd_.data());
  NIBBLE_CUDA_CHECK_LAUNCH();
  saved_rows_ = rows;
}

void NormCuda::backward(const float* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16) {
  backward_impl(dy, dx, stream, accumulate, dx_bf16);
}
void NormCuda::backward(const bf16_t* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16) {
  backward_impl(dy, dx, stream, accumulate, dx_bf16);
}

template <typename DyT>
void NormCuda::backward_impl(const DyT* dy, float* dx, cudaStream_t stream, bool accumulate, bf16_t* dx_bf16) {
  if (saved_rows_ == 0) throw std::logic_error("NormCuda::backward without a forward");
  const int64_t rows = saved_rows_;
  const bool centered = kind_ == NormKind::kLayerNorm;
  norm_backward_kernel<<<blocks_for(rows, kRowsPerBlock), kRowThreads, 0, stream>>>(
      dy, saved_xhat_.data(), saved_rstd_.data(), weight_.data(), rows, dim_, centered, accumulate, dx, dx_bf16);
  NIBBLE_CUDA_CHECK_LAUNCH();
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  partials_.reserve(static_cast<size_t>(2 * chunks * dim_));
  double* pw = partials_.data();
  double* pb = pw + chunks * dim_;
  const dim3 grid(blocks_for(dim_, 128), static_cast<unsigned>(chunks));
  norm_param_partials_kernel<<<grid, 128, 0, stream>>>(dy, saved_xhat_.data(), rows, dim_, has_bias(), pw, pb);
  NIBBLE_CUDA_CHECK_LAUNCH();
  norm_param_finish_kernel<<<blocks_for(dim_, 32), 32 * kFinishWarps, 0, stream>>>(
      pw, pb, chunks, dim_, weight_grad_.data(), has_bias() ? bias_grad_.data() : nullptr);
  NIBBLE_CUDA_CHECK_LAUNCH();
  saved_rows_ = 0;
}

}  // namespace nibble::nn::cuda
