// MLP activations (GELU tanh approximation, squared ReLU, SwiGLU) and the residual add, elementwise
// in FP32 with the same formulas as nn::Mlp (see layers_cuda.h).
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"

namespace nibble::nn::cuda {

using detail::blocks_for;

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

__device__ inline float gelu(float x) {
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x)));
}
__device__ inline float gelu_grad(float x) {
  const float t = tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x * x);
}
__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Four activation values in FP32, or in BF16 (detail::write_out's rounding), in one vector store.
using detail::bf16_bits;
using detail::write_out;
__device__ __forceinline__ void store4(float4* out, float a, float b, float c, float d) { *out = make_float4(a, b, c, d); }
__device__ __forceinline__ void store4(uint2* out, float a, float b, float c, float d) {
  *out = make_uint2(bf16_bits(a) | bf16_bits(b) << 16, bf16_bits(c) | bf16_bits(d) << 16);
}

// i indexes act/dact [rows x hidden]; SwiGLU's a and b sit at row * 2 hidden + col (+ hidden).
template <typename Out>
__global__ void activation_forward_kernel(MlpKind kind, const float* __restrict__ pre, int64_t n, int64_t hidden,
                                          Out* __restrict__ act) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  switch (kind) {
    case MlpKind::kGelu: write_out(act + i, gelu(pre[i])); break;
    case MlpKind::kRelu2: write_out(act + i, pre[i] > 0.0f ? pre[i] * pre[i] : 0.0f); break;
    case MlpKind::kSwiglu: {
      const int64_t row = i / hidden, col = i % hidden;
      const float a = pre[row * 2 * hidden + col], b = pre[row * 2 * hidden + hidden + col];
      write_out(act + i, a * sigmoid(a) * b);
      break;
    }
  }
}

template <typename Out>
__global__ void activation_backward_kernel(MlpKind kind, const float* __restrict__ pre,
                                           const float* __restrict__ dact, int64_t n, int64_t hidden,
                                           Out* __restrict__ dpre) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  switch (kind) {
    case MlpKind::kGelu: write_out(dpre + i, dact[i] * gelu_grad(pre[i])); break;
    case MlpKind::kRelu2: write_out(dpre + i, pre[i] > 0.0f ? 2.0f * pre[i] * dact[i] : 0.0f); break;
    case MlpKind::kSwiglu: {
      const int64_t row = i / hidden, col = i % hidden;
      const int64_t ia = row * 2 * hidden + col, ib = ia + hidden;
      const float a = pre[ia], b = pre[ib], s = sigmoid(a), d = dact[i];
      write_out(dpre + ib, d * a * s);
      write_out(dpre + ia, d * b * s * (1.0f + a * (1.0f - s)));  // silu'(a) = s (1 + a (1 - s))
      break;
    }
  }
}

// GELU on 16-byte vectors (the MLP's activation in GPT-2; n % 4 == 0 and aligned pointers, checked by
// the caller): the scalar kernels above issue 4-byte accesses and ran at ~60% of the copy bandwidth.
template <typename Out4>  // float4, or uint2 for four BF16 values
__global__ void gelu_forward4_kernel(const float4* __restrict__ pre, int64_t n4, Out4* __restrict__ act) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n4) return;
  const float4 p = pre[i];
  store4(act + i, gelu(p.x), gelu(p.y), gelu(p.z), gelu(p.w));
}
template <typename Out4>
__global__ void gelu_backward4_kernel(const float4* __restrict__ pre, const float4* __restrict__ dact, int64_t n4,
                                      Out4* __restrict__ dpre) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n4) return;
  const float4 p = pre[i], d = dact[i];
  store4(dpre + i, d.x * gelu_grad(p.x), d.y * gelu_grad(p.y), d.z * gelu_grad(p.z), d.w * gelu_grad(p.w));
}

bool vec4(int64_t n, std::initializer_list<const void*> pointers) {
  if (n % 4 != 0) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void check_shape(int64_t rows, int64_t hidden, const char* what) {
  if (rows <= 0 || hidden <= 0) throw std::invalid_argument(std::string(what) + ": rows and hidden must be positive");
}

template <typename Out, typename Out4>
void activation_forward_impl(MlpKind kind, const float* pre, int64_t rows, int64_t hidden, Out* act,
                             cudaStream_t stream) {
  check_shape(rows, hidden, "activation_forward");
  const int64_t n = rows * hidden;
  if (kind == MlpKind::kGelu && vec4(n, {pre, act}))
    gelu_forward4_kernel<<<blocks_for(n / 4, 256), 256, 0, stream>>>(reinterpret_cast<const float4*>(pre), n / 4,
                                                                      reinterpret_cast<Out4*>(act));
  else
    activation_forward_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(kind, pre, n, hidden, act);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

template <typename Out, typename Out4>
void activation_backward_impl(MlpKind kind, const float* pre, const float* dact, int64_t rows, int64_t hidden,
                              Out* dpre, cudaStream_t stream) {
  check_shape(rows, hidden, "activation_backward");
  const int64_t n = rows * hidden;
  if (kind == MlpKind::kGelu && vec4(n, {pre, dact, dpre}))
    gelu_backward4_kernel<<<blocks_for(n / 4, 256), 256, 0, stream>>>(
        reinterpret_cast<const float4*>(pre), reinterpret_cast<const float4*>(dact), n / 4,
        reinterpret_cast<Out4*>(dpre));
  else
    activation_backward_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(kind, pre, dact, n, hidden, dpre);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace

void activation_forward(MlpKind kind, const float* pre, int64_t rows, int64_t hidden, float* act,
                        cudaStream_t stream) {
  activation_forward_impl<float, float4>(kind, pre, rows, hidden, act, stream);
}
void activation_forward(MlpKind kind, const float* pre, int64_t rows, int64_t hidden, bf16_t* act,
                        cudaStream_t stream) {
  activation_forward_impl<bf16_t, uint2>(kind, pre, rows, hidden, act, stream);
}

void activation_backward(MlpKind kind, const float* pre, const float* dact, int64_t rows, int64_t hidden, float* dpre,
                         cudaStream_t stream) {
  activation_backward_impl<float, float4>(kind, pre, dact, rows, hidden, dpre, stream);
}
void activation_backward(MlpKind kind, const float* pre, const float* dact, int64_t rows, int64_t hidden, bf16_t* dpre,
                         cudaStream_t stream) {
  activation_backward_impl<bf16_t, uint2>(kind, pre, dact, rows, hidden, dpre, stream);
}

}  // namespace nibble::nn::cuda
