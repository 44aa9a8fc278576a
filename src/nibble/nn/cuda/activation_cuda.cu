// MLP activations (GELU tanh approximation, squared ReLU, SwiGLU), elementwise in FP32 with the
// same formulas as nn::Mlp (see layers_cuda.h); `pre` in FP32 or BF16 (read as FP32, exactly).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/quant/cuda/amax_device.cuh"

namespace nibble::nn::cuda {

using detail::blocks_for;

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

// GELU's tanh form, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as
// x s with s = 0.5 (1 + tanh(u)) = 1 / (1 + e^(-2u)): one fast exponential (ex2.approx) and one
// fast division in place of tanhf, whose arithmetic made the BF16 kernels compute-bound (GELU
// forward in training took as long as the FP32 one moving twice the bytes). Agrees with the CPU's
// tanh form to about 1e-6 relative (ActivationCudaTest's tolerance is 1e-5). For u below about
// -44 the exponential overflows to +inf and s is 0, the limit.
__device__ inline float gelu_sigmoid(float x) {
  const float u = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
  return __fdividef(1.0f, 1.0f + __expf(-2.0f * u));
}
__device__ inline float gelu(float x) { return x * gelu_sigmoid(x); }
// d/dx x s(x) = s + x s (1 - s) 2 u'(x), u' = sqrt(2/pi) (1 + 3 0.044715 x^2): the derivative of the
// tanh form, with 1 - tanh^2 = 4 s (1 - s).
__device__ inline float gelu_grad(float x) {
  const float s = gelu_sigmoid(x);
  return s + x * s * (1.0f - s) * (2.0f * kSqrt2OverPi) * (1.0f + 3.0f * kGeluCubic * x * x);
}
__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Four activation values in FP32, or in BF16 (detail::write_out's rounding), in one vector store.
using detail::bf16x2_bits;
using detail::bf16x4_bits;
using detail::write_out;
__device__ __forceinline__ void store4(float4* out, float a, float b, float c, float d) { *out = make_float4(a, b, c, d); }
__device__ __forceinline__ void store4(uint2* out, float a, float b, float c, float d) {
  *out = bf16x4_bits(a, b, c, d);
}

// i indexes act/dact [rows x hidden]; SwiGLU's a and b sit at row * 2 hidden + col (+ hidden).
template <typename In, typename Out>
__global__ void activation_forward_kernel(MlpKind kind, const In* __restrict__ pre, int64_t n, int64_t hidden,
                                          Out* __restrict__ act) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  switch (kind) {
    case MlpKind::kGelu: write_out(act + i, gelu(to_float(pre[i]))); break;
    case MlpKind::kRelu2: {
      const float p = to_float(pre[i]);
      write_out(act + i, p > 0.0f ? p * p : 0.0f);
      break;
    }
    case MlpKind::kSwiglu: {
      const int64_t row = i / hidden, col = i % hidden;
      const float a = to_float(pre[row * 2 * hidden + col]), b = to_float(pre[row * 2 * hidden + hidden + col]);
      write_out(act + i, a * sigmoid(a) * b);
      break;
    }
  }
}

template <typename In, typename D, typename Out>
__global__ void activation_backward_kernel(MlpKind kind, const In* __restrict__ pre, const D* __restrict__ dact,
                                           int64_t n, int64_t hidden, Out* __restrict__ dpre) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  switch (kind) {
    case MlpKind::kGelu: write_out(dpre + i, to_float(dact[i]) * gelu_grad(to_float(pre[i]))); break;
    case MlpKind::kRelu2: {
      const float p = to_float(pre[i]);
      write_out(dpre + i, p > 0.0f ? 2.0f * p * to_float(dact[i]) : 0.0f);
      break;
    }
    case MlpKind::kSwiglu: {
      const int64_t row = i / hidden, col = i % hidden;
      const int64_t ia = row * 2 * hidden + col, ib = ia + hidden;
      const float a = to_float(pre[ia]), b = to_float(pre[ib]), s = sigmoid(a), d = to_float(dact[i]);
      write_out(dpre + ib, d * a * s);
      write_out(dpre + ia, d * b * s * (1.0f + a * (1.0f - s)));  // silu'(a) = s (1 + a (1 - s))
      break;
    }
  }
}

// GELU on vectors of 4 (the MLP's activation in GPT-2; n % 4 == 0 and 16-byte aligned pointers,
// checked by the caller): the scalar kernels above issue 4-byte accesses and ran at ~60% of the copy
// bandwidth.
template <typename In, typename Out4>  // Out4: float4, or uint2 for four BF16 values
__global__ void gelu_forward4_kernel(const In* __restrict__ pre, int64_t n4, Out4* __restrict__ act) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n4) return;
  const float4 p = detail::load4(pre + 4 * i);
  store4(act + i, gelu(p.x), gelu(p.y), gelu(p.z), gelu(p.w));
}
template <typename In, typename D, typename Out4>
__global__ void gelu_backward4_kernel(const In* __restrict__ pre, const D* __restrict__ dact, int64_t n4,
                                      Out4* __restrict__ dpre) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n4) return;
  const float4 p = detail::load4(pre + 4 * i), d = detail::load4(dact + 4 * i);
  store4(dpre + i, d.x * gelu_grad(p.x), d.y * gelu_grad(p.y), d.z * gelu_grad(p.z), d.w * gelu_grad(p.w));
}

// Two neighbouring elements (p 2-element aligned) as floats, and their store (BF16: nearest even).
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const bf16_t* p) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
__device__ __forceinline__ float2 store2(float* p, float2 v) {  // returns the values as stored
  *reinterpret_cast<float2*>(p) = v;
  return v;
}
__device__ __forceinline__ float2 store2(bf16_t* p, float2 v) {
  const uint32_t ab = bf16x2_bits(v.x, v.y);
  *reinterpret_cast<uint32_t*>(p) = ab;
  return make_float2(__uint_as_float(ab << 16), __uint_as_float(ab & 0xFFFF0000u));
}

// GELU forward (kBackward false: out = gelu(pre)) or backward (out = dact gelu'(pre)) that also
// computes the amax of the fused NVFP4 pass over `out` (ProducerAmax), from the values as stored
// (BF16-rounded for BF16 output). A thread takes 2 columns of 16 rows, a block of the columnwise
// copy's RHT, so that the butterfly runs in registers: it loads all 16 rows first (a warp reads
// whole 128-byte lines of a row), then computes and stores them. The grid holds a few times as many
// blocks as fit on the device at once and loops, so that few blocks add their maxima into the two
// words (atomics on one address). Needs rows % 16 == 0, hidden % 2 == 0 and aligned pairs (checked
// by the caller).
constexpr int kGeluAmaxThreads = 128;
template <bool kBackward, typename In, typename D, typename Out>
__global__ void __launch_bounds__(kGeluAmaxThreads)
    gelu_amax_kernel(const In* __restrict__ pre, const D* __restrict__ dact, int64_t rows, int64_t hidden,
                     Out* __restrict__ out, nibble::cuda::ProducerAmax amax) {
  const int64_t pairs = hidden / 2, items = rows / 16 * pairs;
  float row_max = 0.0f, col_max = 0.0f;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = (item / pairs) * 16 * hidden + 2 * (item % pairs);
    float2 p[16], d[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      p[r] = load2(pre + first + r * hidden);
      if constexpr (kBackward) d[r] = load2(dact + first + r * hidden);
    }
    float v[16][2];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      float2 y;
      if constexpr (kBackward)
        y = make_float2(d[r].x * gelu_grad(p[r].x), d[r].y * gelu_grad(p[r].y));
      else
        y = make_float2(gelu(p[r].x), gelu(p[r].y));
      const float2 stored = store2(out + first + r * hidden, y);
      v[r][0] = stored.x, v[r][1] = stored.y;
    }
    nibble::cuda::accumulate_amax16<2>(v, amax, row_max, col_max);
  }
  nibble::cuda::finish_amax(row_max, col_max, amax.slots, amax.col_rht);
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

template <typename Out>
using Vec4 = std::conditional_t<std::is_same_v<Out, float>, float4, uint2>;

// The GELU kernels with the amax, where `amax` asks for it; throws std::invalid_argument where they
// cannot take it (the GPU model asks only where they can).
template <bool kBackward, typename In, typename D, typename Out>
bool launch_gelu_amax(MlpKind kind, const In* pre, const D* dact, int64_t rows, int64_t hidden, Out* out,
                      const nibble::cuda::ProducerAmax& amax, cudaStream_t stream) {
  if (!amax) return false;
  if (kind != MlpKind::kGelu || rows % 16 != 0 || !vec4(hidden, {pre, dact, out}))
    throw std::invalid_argument(std::string(kBackward ? "activation_backward" : "activation_forward") +
                                ": the NVFP4 amax is computed with GELU only, on rows that are a multiple of 16 and "
                                "columns of 4 (16-byte aligned), got " +
                                std::to_string(rows) + " x " + std::to_string(hidden));
  const auto kernel = gelu_amax_kernel<kBackward, In, D, Out>;
  static const int per_sm = [&] {  // resident blocks per SM, once per kernel variant
    int n = 0;
    NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kGeluAmaxThreads, 0));
    return std::max(n, 1);
  }();
  const int64_t resident = static_cast<int64_t>(per_sm) * nibble::cuda::device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = std::min<int64_t>(blocks_for(rows / 16 * (hidden / 2), kGeluAmaxThreads), 4 * resident);
  kernel<<<static_cast<unsigned>(blocks), kGeluAmaxThreads, 0, stream>>>(pre, dact, rows, hidden, out, amax);
  NIBBLE_CUDA_CHECK_LAUNCH();
  return true;
}

template <typename In, typename Out>
void activation_forward_impl(MlpKind kind, const In* pre, int64_t rows, int64_t hidden, Out* act,
                             const nibble::cuda::ProducerAmax& amax, cudaStream_t stream) {
  check_shape(rows, hidden, "activation_forward");
  const int64_t n = rows * hidden;
  if (launch_gelu_amax<false>(kind, pre, pre, rows, hidden, act, amax, stream)) return;
  if (kind == MlpKind::kGelu && vec4(n, {pre, act}))
    gelu_forward4_kernel<<<blocks_for(n / 4, 256), 256, 0, stream>>>(pre, n / 4, reinterpret_cast<Vec4<Out>*>(act));
  else
    activation_forward_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(kind, pre, n, hidden, act);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

template <typename In, typename D, typename Out>
void activation_backward_impl(MlpKind kind, const In* pre, const D* dact, int64_t rows, int64_t hidden, Out* dpre,
                              const nibble::cuda::ProducerAmax& amax, cudaStream_t stream) {
  check_shape(rows, hidden, "activation_backward");
  const int64_t n = rows * hidden;
  if (launch_gelu_amax<true>(kind, pre, dact, rows, hidden, dpre, amax, stream)) return;
  if (kind == MlpKind::kGelu && vec4(n, {pre, dact, dpre}))
    gelu_backward4_kernel<<<blocks_for(n / 4, 256), 256, 0, stream>>>(pre, dact, n / 4,
                                                                       reinterpret_cast<Vec4<Out>*>(dpre));
  else
    activation_backward_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(kind, pre, dact, n, hidden, dpre);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace

template <typename In, typename Out>
void activation_forward(MlpKind kind, const In* pre, int64_t rows, int64_t hidden, Out* act, cudaStream_t stream,
                        nibble::cuda::ProducerAmax amax) {
  activation_forward_impl(kind, pre, rows, hidden, act, amax, stream);
}
template <typename In, typename D, typename Out>
void activation_backward(MlpKind kind, const In* pre, const D* dact, int64_t rows, int64_t hidden, Out* dpre,
                         cudaStream_t stream, nibble::cuda::ProducerAmax amax) {
  activation_backward_impl(kind, pre, dact, rows, hidden, dpre, amax, stream);
}

#define NIBBLE_ACTIVATION(In, Out)                                                                             \
  template void activation_forward(MlpKind, const In*, int64_t, int64_t, Out*, cudaStream_t,                  \
                                   nibble::cuda::ProducerAmax);                                                \
  template void activation_backward(MlpKind, const In*, const float*, int64_t, int64_t, Out*, cudaStream_t,   \
                                    nibble::cuda::ProducerAmax);                                               \
  template void activation_backward(MlpKind, const In*, const bf16_t*, int64_t, int64_t, Out*, cudaStream_t,  \
                                    nibble::cuda::ProducerAmax);
NIBBLE_ACTIVATION(float, float)
NIBBLE_ACTIVATION(float, bf16_t)
NIBBLE_ACTIVATION(bf16_t, float)
NIBBLE_ACTIVATION(bf16_t, bf16_t)
#undef NIBBLE_ACTIVATION

}  // namespace nibble::nn::cuda
