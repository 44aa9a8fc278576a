// The chunked LM head and loss (see lm_head_cuda.h).
#include "nibble/nn/cuda/lm_head_cuda.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/kernel_util.cuh"

namespace nibble::nn::cuda {
namespace {

using nibble::cuda::GemmMatrix;
using nibble::cuda::GemmOutput;
using nibble::cuda::GemmType;

constexpr int kThreads = 256;

// FP32 -> BF16, nearest even: the rounding OperandCuda applies to a bf16 operand (BF16::encode).
__global__ void convert_to_bf16_kernel(const float* __restrict__ x, int64_t n, __nv_bfloat16* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) reinterpret_cast<uint16_t*>(out)[i] = BF16::encode(x[i], Rounding::kNearestEven);
}

void to_bf16(const float* x, int64_t n, __nv_bfloat16* out, cudaStream_t stream) {
  convert_to_bf16_kernel<<<detail::blocks_for(n, kThreads), kThreads, 0, stream>>>(x, n, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace

int64_t LmHeadLossCuda::default_chunk_rows(int64_t vocab) {
  if (vocab <= 0) throw std::invalid_argument("LmHeadLossCuda: vocab must be positive");
  const int64_t rows = kChunkLogitBytes / (vocab * static_cast<int64_t>(sizeof(__nv_bfloat16)));
  return std::max<int64_t>(64, rows / 64 * 64);
}

LmHeadLossCuda::LmHeadLossCuda(int64_t d_model, int64_t vocab, nibble::cuda::GemmRunner& gemm)
    : d_(d_model), vocab_(vocab), chunk_rows_(0), gemm_(gemm) {
  if (d_ <= 0 || vocab_ <= 0)
    throw std::invalid_argument("LmHeadLossCuda: d_model " + std::to_string(d_) + " and vocab " +
                                std::to_string(vocab_) + " must be positive");
  chunk_rows_ = default_chunk_rows(vocab_);
}

void LmHeadLossCuda::set_chunk_rows(int64_t rows) {
  if (rows <= 0) throw std::invalid_argument("LmHeadLossCuda: chunk rows must be positive, got " + std::to_string(rows));
  chunk_rows_ = rows;
}

int64_t LmHeadLossCuda::rows_per_chunk(int64_t rows) const {
  const int64_t chunks = (rows + chunk_rows_ - 1) / chunk_rows_;
  return (rows + chunks - 1) / chunks;
}

bf16_t* LmHeadLossCuda::bf16_hidden(int64_t rows) {
  if (rows <= 0) throw std::invalid_argument("LmHeadLossCuda: rows must be positive, got " + std::to_string(rows));
  hidden_bf16_.reserve(static_cast<size_t>(rows * d_));
  hidden_rows_ = rows;
  return reinterpret_cast<bf16_t*>(hidden_bf16_.data());
}

void LmHeadLossCuda::round_hidden(const float* hidden, int64_t rows, cudaStream_t stream) {
  to_bf16(hidden, rows * d_, reinterpret_cast<__nv_bfloat16*>(bf16_hidden(rows)), stream);
}

void LmHeadLossCuda::loss(const float* weight, const float* hidden, const uint32_t* targets, int64_t rows,
                          double* loss_mean, cudaStream_t stream) {
  round_hidden(hidden, rows, stream);
  loss_bf16_hidden(weight, targets, rows, loss_mean, stream);
}

void LmHeadLossCuda::loss_bf16_hidden(const float* weight, const uint32_t* targets, int64_t rows, double* loss_mean,
                                      cudaStream_t stream) {
  run(weight, targets, rows, 0.0f, /*backward=*/false, loss_mean, nullptr, nullptr, stream);
}

void LmHeadLossCuda::forward_backward(const float* weight, const float* hidden, const uint32_t* targets,
                                      int64_t rows, float grad_scale, double* loss_mean, float* dhidden,
                                      float* weight_grad, cudaStream_t stream, bool overwrite_grad) {
  round_hidden(hidden, rows, stream);
  forward_backward_bf16_hidden(weight, targets, rows, grad_scale, loss_mean, dhidden, weight_grad, stream,
                               overwrite_grad);
}

void LmHeadLossCuda::forward_backward_bf16_hidden(const float* weight, const uint32_t* targets, int64_t rows,
                                                  float grad_scale, double* loss_mean, float* dhidden,
                                                  float* weight_grad, cudaStream_t stream, bool overwrite_grad) {
  if (dhidden == nullptr || weight_grad == nullptr)
    throw std::invalid_argument("LmHeadLossCuda::forward_backward: dhidden and weight_grad are required");
  // CrossEntropyCuda reads grad_scale 0 as "write the probabilities": the backward GEMMs would take
  // them for the gradient instead of zeros.
  if (grad_scale == 0.0f)
    throw std::invalid_argument("LmHeadLossCuda::forward_backward: grad_scale must be non-zero (use loss())");
  run(weight, targets, rows, grad_scale, /*backward=*/true, loss_mean, dhidden, weight_grad, stream, overwrite_grad);
}

void LmHeadLossCuda::run(const float* weight, const uint32_t* targets, int64_t rows, float grad_scale, bool backward,
                         double* loss_mean, float* dhidden, float* weight_grad, cudaStream_t stream,
                         bool overwrite_grad) {
  if (rows <= 0) throw std::invalid_argument("LmHeadLossCuda: rows must be positive, got " + std::to_string(rows));
  if (rows > hidden_rows_)
    throw std::logic_error("LmHeadLossCuda: " + std::to_string(rows) + " rows of hidden asked for, " +
                           std::to_string(hidden_rows_) + " handed out by bf16_hidden()");
  if (!weight_valid_ || weight != weight_source_) {
    weight_bf16_.reserve(static_cast<size_t>(vocab_ * d_));
    to_bf16(weight, vocab_ * d_, weight_bf16_.data(), stream);
    weight_source_ = weight;
    weight_valid_ = true;
    ++weight_roundings_;
  }
  const int64_t chunk = rows_per_chunk(rows);
  logits_.reserve(static_cast<size_t>(chunk * vocab_));

  // W is stored [vocab x d]: Fprop reads it as B transposed (op(B) = W^T, [d x vocab]), Dgrad as B
  // as stored. The chunk's dlogits are stored [n x vocab]: Dgrad's A as stored, Wgrad's A transposed.
  const GemmMatrix w_t{weight_bf16_.data(), GemmType::kBF16, /*transposed=*/true};
  const GemmMatrix w{weight_bf16_.data(), GemmType::kBF16, /*transposed=*/false};
  const auto gemm = [&](const char* which, int64_t m, int64_t n, int64_t k, const GemmMatrix& a, const GemmMatrix& b,
                        const GemmOutput& c, bool accumulate) {
    try {
      gemm_.run(m, n, k, a, b, c, /*alpha=*/nullptr, accumulate, stream);
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("LmHeadLossCuda[") + std::to_string(d_) + "->" + std::to_string(vocab_) +
                               "] " + which + " GEMM: " + e.what());
    }
  };
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const GemmMatrix h{hidden_bf16_.data() + r0 * d_, GemmType::kBF16, /*transposed=*/false};
    // logits [n x vocab] = H_chunk [n x d] . (W [vocab x d])^T, rounded to BF16
    gemm("Fprop", n, vocab_, d_, h, w_t, GemmOutput{logits_.data(), GemmType::kBF16}, /*accumulate=*/false);
    // dlogits in place of the logits
    loss_.chunk(logits_.data(), targets, r0, n, rows, vocab_, backward ? grad_scale : 0.0f,
                backward ? logits_.data() : nullptr, stream);
    if (!backward) continue;
    const GemmMatrix dl{logits_.data(), GemmType::kBF16, /*transposed=*/false};
    const GemmMatrix dl_t{logits_.data(), GemmType::kBF16, /*transposed=*/true};
    // Dgrad: dH_chunk [n x d] = dlogits [n x vocab] . W [vocab x d]
    gemm("Dgrad", n, d_, vocab_, dl, w, GemmOutput{dhidden + r0 * d_, GemmType::kF32}, /*accumulate=*/false);
    // Wgrad: dW [vocab x d] += (dlogits [n x vocab])^T . H_chunk [n x d] (= for the first chunk with
    // overwrite_grad)
    gemm("Wgrad", vocab_, d_, n, dl_t, h, GemmOutput{weight_grad, GemmType::kF32},
         /*accumulate=*/!(overwrite_grad && r0 == 0));
  }
  loss_.mean(rows, loss_mean, stream);
}

}  // namespace nibble::nn::cuda
