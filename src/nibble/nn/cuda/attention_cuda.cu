// Causal self-attention core on the GPU: packing kernels (RoPE, BF16 rounding, head-major padded
// layout) shared by both implementations, the fused kernels' driver (attention_flash.cu holds the
// kernels), and the batched-GEMM implementation (cuBLASLt BF16 GEMMs with FP32 accumulation, FP32
// softmax and its backward). See layers_cuda.h for the layout and what is saved.
#include <cuda_bf16.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/attention_flash_util.cuh"
#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"

namespace nibble::nn::cuda {

using detail::blocks_for;
using nibble::cuda::GemmMatrix;
using nibble::cuda::GemmOutput;
using nibble::cuda::GemmType;

namespace {

constexpr int64_t kPad = 8;  // kGemm: BF16 rows padded to 16 bytes

struct Dims {
  int64_t B, T, Tp, H, KV, hd, hdp;
  __host__ __device__ int64_t width() const { return (H + 2 * KV) * hd; }
};

// Angles in double, as the CPU computes them: cos/sin(t * theta^(-2i/hd)), rounded to float.
__global__ void rope_table_kernel(int64_t seq, int64_t hd, double theta, float* __restrict__ cos_out,
                                  float* __restrict__ sin_out) {
  const int64_t half = hd / 2;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= seq * half) return;
  const int64_t t = idx / half, i = idx % half;
  const double freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
  const double angle = static_cast<double>(t) * freq;
  cos_out[idx] = static_cast<float>(cos(angle));
  sin_out[idx] = static_cast<float>(sin(angle));
}

// Row t of head hh of sequence b in the head-major arrays q [B, H, Tp, hdp], k and v [B, KV, Tp,
// hdp]: the qkv row's heads are the H query heads, then the KV key heads, then the KV value heads.
template <typename P>
__device__ __forceinline__ P* head_row(P* q, P* k, P* v, const Dims& d, int64_t b, int hh, int64_t t) {
  if (hh < d.H) return q + ((b * d.H + hh) * d.Tp + t) * d.hdp;
  if (hh < d.H + d.KV) return k + ((b * d.KV + hh - d.H) * d.Tp + t) * d.hdp;
  return v + ((b * d.KV + hh - d.H - d.KV) * d.Tp + t) * d.hdp;
}

// qkv [B*T x width] -> q [B, H, Tp, hdp], k and v [B, KV, Tp, hdp] in BF16, RoPE on q and k,
// zeros in the padding. One block per token slot (b, t < Tp); a thread writes 8 consecutive columns
// (16 bytes) of one head, so the index arithmetic is per block and per 8 elements (hdp is a
// multiple of 8 for both implementations).
constexpr int kPackThreads = 128;

// qkv in FP32, or in BF16 (In = bf16_t: the GPU model's qkv output; read as FP32, exactly).
template <typename In>
__global__ void __launch_bounds__(kPackThreads)
pack_qkv_kernel(const In* __restrict__ qkv, Dims d, bool rope, const float* __restrict__ cs,
                const float* __restrict__ sn, __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ k,
                __nv_bfloat16* __restrict__ v) {
  const int64_t b = blockIdx.x / d.Tp, t = blockIdx.x % d.Tp;
  const int heads = static_cast<int>(d.H + 2 * d.KV), chunks = static_cast<int>(d.hdp / 8);
  const int hd = static_cast<int>(d.hd), half = hd / 2;
  const In* row = qkv + (b * d.T + t) * d.width();  // read only when t < T
  for (int job = threadIdx.x; job < heads * chunks; job += blockDim.x) {
    const int hh = job / chunks, c0 = (job % chunks) * 8;
    const In* x = row + static_cast<int64_t>(hh) * hd;
    const bool rotate = rope && hh < d.H + d.KV;
    uint32_t packed[4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = c0 + j;
      float val = 0.0f;
      if (t < d.T && c < hd) {
        if (rotate) {
          const int jj = c % half;
          const float co = cs[t * half + jj], si = sn[t * half + jj];
          val = c < half ? to_float(x[c]) * co - to_float(x[c + half]) * si
                         : to_float(x[c]) * co + to_float(x[c - half]) * si;
        } else {
          val = to_float(x[c]);
        }
      }
      const uint32_t bits = __bfloat16_as_ushort(__float2bfloat16_rn(val));
      packed[j / 2] = j % 2 == 0 ? bits : packed[j / 2] | (bits << 16);
    }
    __nv_bfloat16* dst = head_row(q, k, v, d, b, hh, t);
    *reinterpret_cast<uint4*>(dst + c0) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// One warp per score row (b, h, t): P = softmax(scale * S) over j <= t, zeros elsewhere (the
// causal mask, and the padding rows t >= T), written in BF16 for the PV GEMM; the row's
// log-sum-exp is saved for backward.
__global__ void softmax_kernel(const float* __restrict__ s, __nv_bfloat16* __restrict__ p_bf16,
                               float* __restrict__ lse, int64_t rows, int64_t T, int64_t Tp, float scale) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const int64_t t = r % Tp;
  const float* row = s + r * Tp;
  __nv_bfloat16* prow = p_bf16 + r * Tp;
  const int64_t last = t < T ? t : -1;  // attends to keys 0..last
  float mx = -INFINITY;
  for (int64_t j = lane; j <= last; j += 32) mx = fmaxf(mx, row[j] * scale);
  mx = detail::warp_max(mx);
  float sum = 0.0f;
  for (int64_t j = lane; j <= last; j += 32) sum += expf(row[j] * scale - mx);
  sum = detail::warp_sum(sum);
  const float inv = last >= 0 ? 1.0f / sum : 0.0f;
  for (int64_t j = lane; j < Tp; j += 32) prow[j] = __float2bfloat16_rn(j <= last ? expf(row[j] * scale - mx) * inv : 0.0f);
  if (lane == 0) lse[r] = last >= 0 ? mx + logf(sum) : 0.0f;
}

// Backward's P from the recomputed scores and the saved log-sum-exp, in BF16 for the dv GEMM.
__global__ void probs_from_lse_kernel(const float* __restrict__ s, const float* __restrict__ lse,
                                      __nv_bfloat16* __restrict__ p_bf16, int64_t rows, int64_t T, int64_t Tp,
                                      float scale) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * Tp) return;
  const int64_t r = i / Tp, j = i % Tp, t = r % Tp;
  p_bf16[i] = __float2bfloat16_rn(t < T && j <= t ? expf(s[i] * scale - lse[r]) : 0.0f);
}

// O [B, H, Tp, hdp] -> out [B*T x H*hd].
__global__ void unpack_out_kernel(const float* __restrict__ o, Dims d, float* __restrict__ out) {
  const int64_t width = d.H * d.hd;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= d.B * d.T * width) return;
  const int64_t row = i / width, col = i % width;
  const int64_t b = row / d.T, t = row % d.T, h = col / d.hd, c = col % d.hd;
  out[i] = o[((b * d.H + h) * d.Tp + t) * d.hdp + c];
}

// Eight lanes per row (b, h, t), 8 consecutive columns each at a time: d_out [B*T x H*hd] -> dO
// [B, H, Tp, hdp] in BF16, zeros in the padding (packed = nullptr: not written; the fused kernels
// read dO in place); with `o` (kFused), also delta[row] = sum_c dO o over the BF16 values that
// backward multiplies (D of the softmax backward, rowsum(P dP) in exact arithmetic): each lane's
// columns in order, then the 8 lanes' sums pairwise. hdp is a multiple of 8 for both kernels.
constexpr int kDoutLanes = 8;
template <typename In>  // float, or bf16_t (the GPU model's proj dX in BF16: the same bits as its FP32 rounded)
__global__ void pack_dout_kernel(const In* __restrict__ dout, Dims d, __nv_bfloat16* __restrict__ packed,
                                 const __nv_bfloat16* __restrict__ o, float* __restrict__ delta) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kDoutLanes;
  const int sub = threadIdx.x % kDoutLanes;
  const bool row_ok = r < d.B * d.H * d.Tp;  // the whole group of 8 lanes agrees (no early return: shuffles)
  float dot = 0.0f;
  if (row_ok) {
    const int64_t t = r % d.Tp, h = (r / d.Tp) % d.H, b = r / (d.Tp * d.H);
    const In* src = dout + (b * d.T + t) * d.H * d.hd + h * d.hd;
    for (int64_t c0 = sub * 8; c0 < d.hdp; c0 += kDoutLanes * 8) {
      uint32_t bits[4];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t c = c0 + j;
        const uint32_t b16 = __bfloat16_as_ushort(__float2bfloat16_rn(t < d.T && c < d.hd ? to_float(src[c]) : 0.0f));
        bits[j / 2] = j % 2 == 0 ? b16 : bits[j / 2] | b16 << 16;
      }
      if (packed != nullptr)
        *reinterpret_cast<uint4*>(packed + r * d.hdp + c0) = make_uint4(bits[0], bits[1], bits[2], bits[3]);
      if (o != nullptr)
        dot = detail::bf16x8_dot(make_uint4(bits[0], bits[1], bits[2], bits[3]),
                                 *reinterpret_cast<const uint4*>(o + r * d.hdp + c0), dot);
    }
  }
  if (o == nullptr) return;  // uniform across the grid
#pragma unroll
  for (int m = 1; m < kDoutLanes; m *= 2) dot += __shfl_xor_sync(0xFFFFFFFFu, dot, m);
  if (row_ok && sub == 0) delta[r] = dot;
}

// One warp per row: dS = scale * P (dP - sum_j P_j dP_j) over j <= t (the CPU's softmax backward
// with the score scale folded in), P = exp(scale * S - lse) in FP32; dS in BF16 for the dq and dk
// GEMMs, zeros elsewhere.
__global__ void softmax_backward_kernel(const float* __restrict__ s, const float* __restrict__ lse,
                                        const float* __restrict__ dp, __nv_bfloat16* __restrict__ ds, int64_t rows,
                                        int64_t T, int64_t Tp, float scale) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const int64_t t = r % Tp, last = t < T ? t : -1;
  const float* sr = s + r * Tp;
  const float* dr = dp + r * Tp;
  const float l = lse[r];
  float dot = 0.0f;
  for (int64_t j = lane; j <= last; j += 32) dot += expf(sr[j] * scale - l) * dr[j];
  dot = detail::warp_sum(dot);
  for (int64_t j = lane; j < Tp; j += 32) {
    const float p = j <= last ? expf(sr[j] * scale - l) : 0.0f;
    ds[r * Tp + j] = __float2bfloat16_rn(j <= last ? scale * p * (dr[j] - dot) : 0.0f);
  }
}

// dq [B, H, Tp, hdp], dk and dv [B, KV, Tp, hdp] (FP32) -> dqkv [B*T x width], RoPE's transpose on
// dq and dk. One block per token (b, t < T); a thread writes 4 consecutive columns of one head.
template <typename Out>
__global__ void __launch_bounds__(kPackThreads)
unpack_dqkv_kernel(const float* __restrict__ dq, const float* __restrict__ dk, const float* __restrict__ dv, Dims d,
                   bool rope, const float* __restrict__ cs, const float* __restrict__ sn, Out* __restrict__ dqkv) {
  const int64_t b = blockIdx.x / d.T, t = blockIdx.x % d.T;
  const int heads = static_cast<int>(d.H + 2 * d.KV), hd = static_cast<int>(d.hd), half = hd / 2;
  const int chunks = (hd + 3) / 4;
  // Whole 4-element stores need every row and head to start on a 4-element boundary, and dqkv itself
  // aligned to 4 elements: a caller's pointer may point into a larger buffer at any element.
  const bool vec = hd % 4 == 0 && reinterpret_cast<uintptr_t>(dqkv) % (4 * sizeof(Out)) == 0;
  Out* out_row = dqkv + blockIdx.x * d.width();
  for (int job = threadIdx.x; job < heads * chunks; job += blockDim.x) {
    const int hh = job / chunks, c0 = (job % chunks) * 4;
    const float* g = head_row(dq, dk, dv, d, b, hh, t);
    const bool rotate = rope && hh < d.H + d.KV;
    float val[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + j;
      val[j] = 0.0f;
      if (c >= hd) continue;
      if (rotate) {
        const int jj = c % half;
        const float co = cs[t * half + jj], si = sn[t * half + jj];
        val[j] = c < half ? g[c] * co + g[c + half] * si : g[c] * co - g[c - half] * si;
      } else {
        val[j] = g[c];
      }
    }
    Out* dst = out_row + static_cast<int64_t>(hh) * hd + c0;
    if constexpr (std::is_same_v<Out, float>) {
      if (vec) {
        *reinterpret_cast<float4*>(dst) = make_float4(val[0], val[1], val[2], val[3]);
        continue;
      }
      for (int j = 0; j < 4 && c0 + j < hd; ++j) dst[j] = val[j];
    } else {  // BF16, nearest even
      uint16_t bits[4];
      for (int j = 0; j < 4; ++j) bits[j] = __bfloat16_as_ushort(__float2bfloat16_rn(val[j]));
      if (vec) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(bits[0] | static_cast<uint32_t>(bits[1]) << 16,
                                                    bits[2] | static_cast<uint32_t>(bits[3]) << 16);
        continue;
      }
      for (int j = 0; j < 4 && c0 + j < hd; ++j) reinterpret_cast<uint16_t*>(dst)[j] = bits[j];
    }
  }
}

GemmMatrix bf16(const __nv_bfloat16* p, bool transposed, int64_t stride) {
  return GemmMatrix{p, GemmType::kBF16, transposed, stride};
}
GemmOutput f32(float* p, int64_t stride) { return GemmOutput{p, GemmType::kF32, stride}; }

constexpr int kWarpRowsThreads = 128;  // 4 rows (warps) per block

}  // namespace

AttentionCoreCuda::AttentionCoreCuda(AttentionShape shape, nibble::cuda::GemmRunner& gemm, AttentionWorkspace& workspace,
                                     AttentionKernel kernel)
    : shape_(shape), gemm_(gemm), ws_(workspace), kernel_(kernel) {
  if (shape.d_model <= 0 || shape.n_heads <= 0 || shape.n_kv_heads <= 0 || shape.d_model % shape.n_heads != 0 ||
      shape.n_heads % shape.n_kv_heads != 0 || (shape.rope && shape.head_dim() % 2 != 0))
    throw std::invalid_argument("AttentionCoreCuda: d_model " + std::to_string(shape.d_model) + ", n_heads " +
                                std::to_string(shape.n_heads) + ", n_kv_heads " + std::to_string(shape.n_kv_heads) +
                                " do not form valid heads (rope needs an even head dimension)");
  // The fused kernels need head_dim <= 128 and, at head_dim > 64, more shared memory per block
  // than GPUs of compute capability 8.6, 8.9 and 12.x allow (flash_shared_bytes).
  const int64_t flash_hd = detail::flash_head_dim(shape.head_dim());
  if (flash_hd == 0) {
    if (kernel_ == AttentionKernel::kFused)
      throw std::invalid_argument("AttentionCoreCuda: the fused kernels take head_dim up to 128, not " +
                                  std::to_string(shape.head_dim()) + " (use AttentionKernel::kGemm or kAuto)");
    kernel_ = AttentionKernel::kGemm;
    return;
  }
  if (kernel_ == AttentionKernel::kGemm) return;
  const bool fits = detail::flash_fits_device(flash_hd);
  if (kernel_ == AttentionKernel::kFused && !fits)
    throw std::invalid_argument("AttentionCoreCuda: the fused kernels at head_dim " + std::to_string(shape.head_dim()) +
                                " need " + std::to_string(detail::flash_shared_bytes(flash_hd)) +
                                " bytes of shared memory per block, more than this device allows (use "
                                "AttentionKernel::kGemm or kAuto)");
  kernel_ = fits ? AttentionKernel::kFused : AttentionKernel::kGemm;
}

void AttentionCoreCuda::forward(const float* qkv, int64_t batch, int64_t seq, float* out, cudaStream_t stream) {
  forward_impl(qkv, batch, seq, out, nullptr, stream);
}
void AttentionCoreCuda::forward(const bf16_t* qkv, int64_t batch, int64_t seq, float* out, cudaStream_t stream) {
  forward_impl(qkv, batch, seq, out, nullptr, stream);
}

void AttentionCoreCuda::forward(const float* qkv, int64_t batch, int64_t seq, bf16_t* out, cudaStream_t stream,
                                nibble::cuda::ProducerAmax amax) {
  forward_impl(qkv, batch, seq, nullptr, reinterpret_cast<__nv_bfloat16*>(out), stream, amax);
}
void AttentionCoreCuda::forward(const bf16_t* qkv, int64_t batch, int64_t seq, bf16_t* out, cudaStream_t stream,
                                nibble::cuda::ProducerAmax amax) {
  forward_impl(qkv, batch, seq, nullptr, reinterpret_cast<__nv_bfloat16*>(out), stream, amax);
}

bool AttentionCoreCuda::reads_kept_qkv(int64_t seq) const {
  const int64_t hd = shape_.head_dim();
  return kernel_ == AttentionKernel::kFused && !shape_.rope && detail::flash_head_dim(hd) == hd &&
         seq % detail::kFlashTile == 0;
}

void AttentionCoreCuda::forward_kept(const bf16_t* qkv, int64_t batch, int64_t seq, bf16_t* out, cudaStream_t stream,
                                     nibble::cuda::ProducerAmax amax) {
  forward_impl(qkv, batch, seq, nullptr, reinterpret_cast<__nv_bfloat16*>(out), stream, amax, /*kept=*/true);
}

template <typename In>
void AttentionCoreCuda::forward_impl(const In* qkv, int64_t batch, int64_t seq, float* out, __nv_bfloat16* out16,
                                     cudaStream_t stream, const nibble::cuda::ProducerAmax& amax, bool kept) {
  if (out16 != nullptr && !writes_bf16_output())
    throw std::logic_error("AttentionCoreCuda::forward: BF16 output needs the fused kernels");
  if (batch <= 0 || seq <= 0)
    throw std::invalid_argument("AttentionCoreCuda::forward: batch and seq must be positive");
  const bool fused = kernel_ == AttentionKernel::kFused;
  const int64_t H = shape_.n_heads, KV = shape_.n_kv_heads, hd = shape_.head_dim();
  batch_ = batch;
  seq_ = seq;
  seq_pad_ = detail::round_up(seq, fused ? detail::kFlashTile : kPad);
  hd_pad_ = fused ? detail::flash_head_dim(hd) : detail::round_up(hd, kPad);
  const int64_t Tp = seq_pad_, hdp = hd_pad_;
  const auto n = [](int64_t v) { return static_cast<size_t>(v); };
  lse_.reserve(n(batch * H * Tp));
  const detail::FlashDims fd{batch, seq, Tp, H, KV, hd, hdp, 1.0f / std::sqrt(static_cast<float>(hd))};
  // The fused kernels read q, k and v in place from a BF16 qkv that stays until backward (no RoPE
  // to apply, no padding), else from packed copies.
  bool in_place = false;
  if constexpr (std::is_same_v<In, bf16_t>) {
    in_place = kept && reads_kept_qkv(seq) && reinterpret_cast<uintptr_t>(qkv) % 16 == 0;
    if (in_place) {
      const auto* base = reinterpret_cast<const __nv_bfloat16*>(qkv);
      q_heads_ = detail::heads_in_rows(base, fd, qkv_width(), 0);
      k_heads_ = detail::heads_in_rows(base, fd, qkv_width(), H * hd);
      v_heads_ = detail::heads_in_rows(base, fd, qkv_width(), (H + KV) * hd);
    }
  }
  if (!in_place) {
    q_.reserve(n(batch * H * Tp * hdp));
    k_.reserve(n(batch * KV * Tp * hdp));
    v_.reserve(n(batch * KV * Tp * hdp));
    q_heads_ = detail::packed_heads<const __nv_bfloat16>(q_.data(), fd, H);
    k_heads_ = detail::packed_heads<const __nv_bfloat16>(k_.data(), fd, KV);
    v_heads_ = detail::packed_heads<const __nv_bfloat16>(v_.data(), fd, KV);
  }
  if (shape_.rope && seq > rope_seq_) {
    const int64_t half = hd / 2;
    rope_cos_.resize(n(seq * half));
    rope_sin_.resize(n(seq * half));
    rope_table_kernel<<<blocks_for(seq * half, 256), 256, 0, stream>>>(
        seq, hd, static_cast<double>(shape_.rope_theta), rope_cos_.data(), rope_sin_.data());
    NIBBLE_CUDA_CHECK_LAUNCH();
    rope_seq_ = seq;
  }
  const Dims d{batch, seq, Tp, H, KV, hd, hdp};
  if (!in_place) {
    pack_qkv_kernel<<<blocks_for(batch * Tp, 1), kPackThreads, 0, stream>>>(
        qkv, d, shape_.rope, rope_cos_.data(), rope_sin_.data(), q_.data(), k_.data(), v_.data());
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  if (fused) {
    o_.reserve(n(batch * H * Tp * hdp));
    if (detail::flash_forward(fd, q_heads_, k_heads_, v_heads_, out, o_.data(), lse_.data(), stream, out16, amax))
      ++amaxes_in_kernels_;
    else if (amax)
      nibble::cuda::nvfp4_amax(reinterpret_cast<const bf16_t*>(out16), batch * seq, out_width(), amax, stream);
  } else {
    gemm_forward(out, stream);
  }
  saved_ = true;
}

void AttentionCoreCuda::backward(const float* d_out, float* d_qkv, cudaStream_t stream) {
  backward_impl(d_out, d_qkv, stream);
}
void AttentionCoreCuda::backward(const float* d_out, bf16_t* d_qkv, cudaStream_t stream,
                                 nibble::cuda::ProducerAmax amax) {
  backward_impl(d_out, d_qkv, stream, amax);
}
void AttentionCoreCuda::backward(const bf16_t* d_out, float* d_qkv, cudaStream_t stream) {
  backward_impl(d_out, d_qkv, stream);
}
void AttentionCoreCuda::backward(const bf16_t* d_out, bf16_t* d_qkv, cudaStream_t stream,
                                 nibble::cuda::ProducerAmax amax) {
  backward_impl(d_out, d_qkv, stream, amax);
}

template <typename In, typename Out>
void AttentionCoreCuda::backward_impl(const In* d_out, Out* d_qkv, cudaStream_t stream,
                                      const nibble::cuda::ProducerAmax& amax) {
  if (!saved_) throw std::logic_error("AttentionCoreCuda::backward without a forward");
  const bool fused = kernel_ == AttentionKernel::kFused;
  const Dims d{batch_, seq_, seq_pad_, shape_.n_heads, shape_.n_kv_heads, shape_.head_dim(), hd_pad_};
  const auto n = [](int64_t v) { return static_cast<size_t>(v); };
  const detail::FlashDims fd{d.B, d.T, d.Tp, d.H, d.KV, d.hd, d.hdp, 1.0f / std::sqrt(static_cast<float>(d.hd))};
  // The fused kernels read a BF16 d_out in place and write a BF16 d_qkv in place (no RoPE to
  // undo) where nothing is padded: the bits of the packed route, two passes over memory fewer.
  const bool unpadded = fused && d.T == d.Tp && d.hd == d.hdp;
  detail::BF16Heads dout_heads;
  if constexpr (std::is_same_v<In, bf16_t>) {
    if (unpadded && reinterpret_cast<uintptr_t>(d_out) % 16 == 0)
      dout_heads = detail::heads_in_rows(reinterpret_cast<const __nv_bfloat16*>(d_out), fd, out_width(), 0);
  }
  detail::HeadGrad dq, dk, dv;
  if constexpr (std::is_same_v<Out, bf16_t>) {
    if (unpadded && !shape_.rope && reinterpret_cast<uintptr_t>(d_qkv) % 4 == 0) {
      auto* base = reinterpret_cast<__nv_bfloat16*>(d_qkv);
      dq.b16 = detail::heads_in_rows(base, fd, qkv_width(), 0);
      dk.b16 = detail::heads_in_rows(base, fd, qkv_width(), d.H * d.hd);
      dv.b16 = detail::heads_in_rows(base, fd, qkv_width(), (d.H + d.KV) * d.hd);
    }
  }
  // Another layer may have used the workspace since this layer's forward (and grown it).
  if (dout_heads.base == nullptr) ws_.dout.reserve(n(d.B * d.H * d.Tp * d.hdp));
  if (dq.b16.base == nullptr) {
    ws_.dq.reserve(n(d.B * d.H * d.Tp * d.hdp));
    ws_.dk.reserve(n(d.B * d.KV * d.Tp * d.hdp));
    ws_.dv.reserve(n(d.B * d.KV * d.Tp * d.hdp));
    dq.f32 = detail::packed_heads(ws_.dq.data(), fd, d.H);
    dk.f32 = detail::packed_heads(ws_.dk.data(), fd, d.KV);
    dv.f32 = detail::packed_heads(ws_.dv.data(), fd, d.KV);
  }
  if (fused) ws_.delta.reserve(n(d.B * d.H * d.Tp));
  // dO packed for the kernels (unless they read it in place), and delta = rowsum(dO o) for the fused
  // kernels, unless the Hopper kernels compute it (dO in place, nothing padded).
  const bool delta_in_kernel = fused && dout_heads.base != nullptr && detail::flash_delta_in_kernel(fd);
  const bool delta_here = fused && !delta_in_kernel;
  if (dout_heads.base == nullptr || delta_here) {
    pack_dout_kernel<<<blocks_for(d.B * d.H * d.Tp * kDoutLanes, kWarpRowsThreads), kWarpRowsThreads, 0, stream>>>(
        d_out, d, dout_heads.base == nullptr ? ws_.dout.data() : nullptr, delta_here ? o_.data() : nullptr,
        delta_here ? ws_.delta.data() : nullptr);
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  bool amax_done = false;
  if (fused) {
    if (dout_heads.base == nullptr) dout_heads = detail::packed_heads<const __nv_bfloat16>(ws_.dout.data(), fd, d.H);
    const detail::BF16Heads o_heads =
        delta_in_kernel ? detail::packed_heads<const __nv_bfloat16>(o_.data(), fd, d.H) : detail::BF16Heads{};
    amax_done = detail::flash_backward(fd, q_heads_, k_heads_, v_heads_, dout_heads, lse_.data(), ws_.delta.data(), dq,
                                       dk, dv, stream, amax, o_heads);
  } else {
    gemm_backward(stream);
  }
  if (dq.b16.base == nullptr) {
    unpack_dqkv_kernel<<<blocks_for(d.B * d.T, 1), kPackThreads, 0, stream>>>(
        ws_.dq.data(), ws_.dk.data(), ws_.dv.data(), d, shape_.rope, rope_cos_.data(), rope_sin_.data(), d_qkv);
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  if (amax_done)
    ++amaxes_in_kernels_;
  else if (amax)
    nibble::cuda::nvfp4_amax(d_qkv, d.B * d.T, qkv_width(), amax, stream);
  saved_ = false;
}

// ---------------------------------------------------------------- kGemm

void AttentionCoreCuda::gemm_scores(cudaStream_t stream) {
  const int64_t group = shape_.n_heads / shape_.n_kv_heads, Tp = seq_pad_, hdp = hd_pad_;
  // Scores of a KV group: [group*Tp x hdp] q rows against its k [Tp x hdp]^T, one GEMM per (b, group).
  gemm_.run(group * Tp, Tp, hdp, bf16(q_.data(), false, group * Tp * hdp), bf16(k_.data(), true, Tp * hdp),
            f32(ws_.scores.data(), group * Tp * Tp), nullptr, false, stream, batch_ * shape_.n_kv_heads);
}

void AttentionCoreCuda::gemm_forward(float* out, cudaStream_t stream) {
  const Dims d{batch_, seq_, seq_pad_, shape_.n_heads, shape_.n_kv_heads, shape_.head_dim(), hd_pad_};
  const int64_t group = d.H / d.KV, Tp = d.Tp, hdp = d.hdp;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  const auto n = [](int64_t v) { return static_cast<size_t>(v); };
  ws_.scores.reserve(n(d.B * d.H * Tp * Tp));
  ws_.probs.reserve(n(d.B * d.H * Tp * Tp));
  ws_.out_heads.reserve(n(d.B * d.H * Tp * hdp));
  gemm_scores(stream);
  const int64_t rows = d.B * d.H * Tp;
  softmax_kernel<<<blocks_for(rows * 32, kWarpRowsThreads), kWarpRowsThreads, 0, stream>>>(
      ws_.scores.data(), ws_.probs.data(), lse_.data(), rows, d.T, Tp, scale);
  NIBBLE_CUDA_CHECK_LAUNCH();
  // O = P v per group.
  gemm_.run(group * Tp, hdp, Tp, bf16(ws_.probs.data(), false, group * Tp * Tp), bf16(v_.data(), false, Tp * hdp),
            f32(ws_.out_heads.data(), group * Tp * hdp), nullptr, false, stream, d.B * d.KV);
  unpack_out_kernel<<<blocks_for(d.B * d.T * d.H * d.hd, 256), 256, 0, stream>>>(ws_.out_heads.data(), d, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

// From ws_.dout (packed dO) to ws_.dq, dk, dv.
void AttentionCoreCuda::gemm_backward(cudaStream_t stream) {
  const Dims d{batch_, seq_, seq_pad_, shape_.n_heads, shape_.n_kv_heads, shape_.head_dim(), hd_pad_};
  const int64_t group = d.H / d.KV, Tp = d.Tp, hdp = d.hdp;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  const auto n = [](int64_t v) { return static_cast<size_t>(v); };
  ws_.scores.reserve(n(d.B * d.H * Tp * Tp));
  ws_.probs.reserve(n(d.B * d.H * Tp * Tp));
  ws_.dprobs.reserve(n(d.B * d.H * Tp * Tp));
  // Recompute the scores and P (BF16) from the saved log-sum-exp.
  gemm_scores(stream);
  const int64_t rows = d.B * d.H * Tp;
  probs_from_lse_kernel<<<blocks_for(rows * Tp, 256), 256, 0, stream>>>(ws_.scores.data(), lse_.data(),
                                                                        ws_.probs.data(), rows, d.T, Tp, scale);
  NIBBLE_CUDA_CHECK_LAUNCH();
  // dv = P^T dO: the group's heads add up inside the reduction (k = group * Tp).
  gemm_.run(Tp, hdp, group * Tp, bf16(ws_.probs.data(), true, group * Tp * Tp),
            bf16(ws_.dout.data(), false, group * Tp * hdp), f32(ws_.dv.data(), Tp * hdp), nullptr, false, stream,
            d.B * d.KV);
  // dP = dO v^T.
  gemm_.run(group * Tp, Tp, hdp, bf16(ws_.dout.data(), false, group * Tp * hdp), bf16(v_.data(), true, Tp * hdp),
            f32(ws_.dprobs.data(), group * Tp * Tp), nullptr, false, stream, d.B * d.KV);
  // dS (BF16) replaces the BF16 P, which dv was the last to need.
  softmax_backward_kernel<<<blocks_for(rows * 32, kWarpRowsThreads), kWarpRowsThreads, 0, stream>>>(
      ws_.scores.data(), lse_.data(), ws_.dprobs.data(), ws_.probs.data(), rows, d.T, Tp, scale);
  NIBBLE_CUDA_CHECK_LAUNCH();
  const __nv_bfloat16* ds = ws_.probs.data();
  // dq = dS k;  dk = dS^T q (summed over the group).
  gemm_.run(group * Tp, hdp, Tp, bf16(ds, false, group * Tp * Tp), bf16(k_.data(), false, Tp * hdp),
            f32(ws_.dq.data(), group * Tp * hdp), nullptr, false, stream, d.B * d.KV);
  gemm_.run(Tp, hdp, group * Tp, bf16(ds, true, group * Tp * Tp), bf16(q_.data(), false, group * Tp * hdp),
            f32(ws_.dk.data(), Tp * hdp), nullptr, false, stream, d.B * d.KV);
}

}  // namespace nibble::nn::cuda
