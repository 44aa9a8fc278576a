// LayerNorm / RMSNorm kernels behind NormCuda (layers_cuda.h); included by norm_cuda.cu only, and
// compiled as host C++ by tests/cuda_emulation/norm_emulation_test.cpp (NIBBLE_NORM_HOST_EMULATION,
// which brings its own shuffles, barriers, atomics and dynamic shared memory, and, through
// NIBBLE_ROWCOL_HOST_EMULATION, amax_device.cuh's fmax_abs_nan).
#pragma once

#include <cstdint>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/quant/cuda/amax_device.cuh"

namespace nibble::nn::cuda {
namespace {

using detail::load4;
using detail::store4;

constexpr int kRowThreads = 256;  // 8 rows per block, one warp each
constexpr int kRowsPerBlock = kRowThreads / 32;
constexpr int64_t kChunkRows = 64;  // rows per partial sum of the parameter gradients

// One warp per row (rows are short: d_model elements; a block per row left most threads idle and
// synchronised the block twice): mean (LayerNorm) and variance in double, two passes as the CPU
// does. The row is re-read from L1 in each pass. The normalized rows saved for backward (xhat) are
// in y's precision (BF16: the FP32 value rounded to nearest even; y is computed from the FP32 value).
template <typename Out>
__global__ void __launch_bounds__(kRowThreads)
norm_forward_kernel(const float* __restrict__ x, int64_t rows, int64_t dim, bool centered, float eps,
                    const float* __restrict__ weight, const float* __restrict__ bias, Out* __restrict__ y,
                    Out* __restrict__ xhat, float* __restrict__ rstd_out) {
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
    detail::write_out(xhat + r * dim + i, h);
    detail::write_out(y + r * dim + i, h * weight[i] + (bias != nullptr ? bias[i] : 0.0f));
  }
}

// The same forward for rows of a multiple of 128 elements, up to 128 * kVecChunks (GPT-2's 768 and
// 1024): each lane holds its 4-element chunks 4 lane + 128 c in registers, loaded with 16-byte
// loads all at once (the strided kernel above keeps few loads in flight and re-reads the row), and
// adds them in double in the same per-element expressions.
constexpr int kVecChunks = 8;

__device__ __forceinline__ float get(const float4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }
__device__ __forceinline__ void set(float4& v, int j, float x) {
  if (j == 0) v.x = x;
  else if (j == 1) v.y = x;
  else if (j == 2) v.z = x;
  else v.w = x;
}

// Row r of the vector forward, by one warp; `out` (nullptr: none) receives the lane's output values
// (as computed, before any BF16 rounding of y), kVecChunks float4s.
template <typename Out>
__device__ __forceinline__ void norm_forward_row_vec(const float* __restrict__ x, int64_t r, int64_t dim,
                                                     bool centered, float eps, const float* __restrict__ weight,
                                                     const float* __restrict__ bias, Out* __restrict__ y,
                                                     Out* __restrict__ xhat, float* __restrict__ rstd_out,
                                                     float4* out) {
  const int lane = threadIdx.x & 31, chunks = static_cast<int>(dim / 128);
  const int64_t row = r * dim + 4 * lane;
  float4 v[kVecChunks];
#pragma unroll
  for (int c = 0; c < kVecChunks; ++c)
    if (c < chunks) v[c] = load4(x + row + 128 * c);
  double mean = 0.0;
  if (centered) {
    double s = 0.0;
#pragma unroll
    for (int c = 0; c < kVecChunks; ++c)
      if (c < chunks)
#pragma unroll
        for (int j = 0; j < 4; ++j) s += get(v[c], j);
    mean = detail::warp_sum(s) / static_cast<double>(dim);
  }
  double sq = 0.0;
#pragma unroll
  for (int c = 0; c < kVecChunks; ++c)
    if (c < chunks)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const double d = get(v[c], j) - mean;
        sq += d * d;
      }
  const double var = detail::warp_sum(sq) / static_cast<double>(dim);
  const double rstd = 1.0 / sqrt(var + static_cast<double>(eps));
  if (lane == 0) rstd_out[r] = static_cast<float>(rstd);
#pragma unroll
  for (int c = 0; c < kVecChunks; ++c) {
    if (c >= chunks) continue;
    const int64_t col = 4 * lane + 128 * c;
    const float4 w = load4(weight + col), b = bias != nullptr ? load4(bias + col) : make_float4(0, 0, 0, 0);
    float4 h, o;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      set(h, j, static_cast<float>((get(v[c], j) - mean) * rstd));
      set(o, j, get(h, j) * get(w, j) + get(b, j));
    }
    store4(xhat + row + 128 * c, h);
    store4(y + row + 128 * c, o);
    if (out != nullptr) out[c] = o;
  }
}

template <typename Out>
__global__ void __launch_bounds__(kRowThreads)
norm_forward_vec_kernel(const float* __restrict__ x, int64_t rows, int64_t dim, bool centered, float eps,
                        const float* __restrict__ weight, const float* __restrict__ bias, Out* __restrict__ y,
                        Out* __restrict__ xhat, float* __restrict__ rstd_out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / 32;
  if (r >= rows) return;
  norm_forward_row_vec(x, r, dim, centered, eps, weight, bias, y, xhat, rstd_out, static_cast<float4*>(nullptr));
}

// The vector forward with BF16 output (and so BF16 xhat) that also computes the amax of the fused
// NVFP4 pass over y (ProducerAmax): 16 rows a block, one warp each; the rows' BF16 values are staged
// in shared memory, then each thread takes pairs of columns of the 16 rows (a block of the
// columnwise copy's RHT) for the maxima. Grid: rows / 16 blocks (rows a multiple of 16).
constexpr int kAmaxRows = 16;
__global__ void __launch_bounds__(32 * kAmaxRows)
    norm_forward_vec_amax_kernel(const float* __restrict__ x, int64_t dim, bool centered, float eps,
                                 const float* __restrict__ weight, const float* __restrict__ bias,
                                 bf16_t* __restrict__ y, bf16_t* __restrict__ xhat, float* __restrict__ rstd_out,
                                 nibble::cuda::ProducerAmax amax) {
  __shared__ uint32_t staged[kAmaxRows][kVecChunks * 128 / 2];  // BF16 pairs, as y holds them
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, chunks = static_cast<int>(dim / 128);
  float4 out[kVecChunks];
  norm_forward_row_vec(x, blockIdx.x * static_cast<int64_t>(kAmaxRows) + warp, dim, centered, eps, weight, bias, y,
                       xhat, rstd_out, out);
#pragma unroll
  for (int c = 0; c < kVecChunks; ++c) {
    if (c >= chunks) continue;
    const int pair = 2 * lane + 64 * c;  // the chunk's 4 elements: columns 4 lane + 128 c ..
    staged[warp][pair] = detail::bf16x2_bits(out[c].x, out[c].y);
    staged[warp][pair + 1] = detail::bf16x2_bits(out[c].z, out[c].w);
  }
  __syncthreads();
  float row_max = 0.0f, col_max = 0.0f;
  for (int pair = threadIdx.x; pair < dim / 2; pair += blockDim.x) {
    float v[kAmaxRows][2];
#pragma unroll
    for (int r = 0; r < kAmaxRows; ++r) {
      v[r][0] = bits_float(staged[r][pair] << 16);
      v[r][1] = bits_float(staged[r][pair] & 0xFFFF0000u);
    }
    nibble::cuda::accumulate_amax16<2>(v, amax, row_max, col_max);
  }
  nibble::cuda::finish_amax(row_max, col_max, amax.slots, amax.col_rht);
}

// dx = rstd * (dxhat - mean(dxhat) [LayerNorm] - xhat * mean(dxhat * xhat)), dxhat = dy * g.
// One warp per row, as the forward. dx16 (optional): the final dx rounded to BF16 as well.
// dy in FP32 or BF16 (DyT; the GPU model's linear dX in BF16), xhat as the forward saved it (XhT),
// both read as FP32 (exact).
template <typename DyT, typename XhT>
__global__ void __launch_bounds__(kRowThreads)
norm_backward_kernel(const DyT* __restrict__ dy, const XhT* __restrict__ xhat, const float* __restrict__ rstd,
                     const float* __restrict__ weight, int64_t rows, int64_t dim, bool centered, bool accumulate,
                     float* __restrict__ dx, bf16_t* __restrict__ dx16) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const DyT* dyr = dy + r * dim;
  const XhT* xh = xhat + r * dim;
  double s1 = 0.0, s2 = 0.0;
  for (int64_t i = lane; i < dim; i += 32) {
    const double d = static_cast<double>(to_float(dyr[i])) * weight[i];
    s1 += d;
    s2 += d * to_float(xh[i]);
  }
  const double mean_dxhat = centered ? detail::warp_sum(s1) / static_cast<double>(dim) : 0.0;
  const double mean_dxhat_xhat = detail::warp_sum(s2) / static_cast<double>(dim);
  const double rs = rstd[r];
  for (int64_t i = lane; i < dim; i += 32) {
    const double d = static_cast<double>(to_float(dyr[i])) * weight[i];
    const float g = static_cast<float>(rs * (d - mean_dxhat - to_float(xh[i]) * mean_dxhat_xhat));
    const float out = accumulate ? dx[r * dim + i] + g : g;
    dx[r * dim + i] = out;
    if (dx16 != nullptr) detail::write_out(dx16 + r * dim + i, out);
  }
}

// The same backward with 16-byte loads and the row in registers (rows as norm_forward_vec_kernel's),
// and the parameter-gradient partials of its rows in the same pass (norm_param_partials_kernel's
// output, without its second read of dy and xhat: 50-75 MB a call at GPT-2's shapes). A block takes
// one chunk of kChunkRows rows, each warp every kRowsPerBlock-th of them. A warp adds dy * xhat and
// dy for its rows in FP32 (fmaf) into its own shared-memory row of sums (no atomics: a lane owns its
// columns); then the block adds the warps' sums in double, in warp order, into the chunk's partials.
// Deterministic. The FP32 sums are over kChunkRows / kRowsPerBlock = 8 rows: relative error about
// 8 x 2^-24 of their terms, within NormCudaTest's tolerance (5e-5).
// Shared memory (dynamic): [warp][dim] weight sums, then [warp][dim] bias sums where there is a bias.
// With `amax` (ProducerAmax; rows a multiple of 16, dx16 given), the block then reads its chunk's
// dx16 back (just written: from L2) in 16-row column blocks and adds them to the two words of the
// fused NVFP4 pass that will quantize dx16 (the next linear layer's dY): that pass's own amax kernel
// would read the whole tensor again in a launch of its own.
#ifndef NIBBLE_NORM_HOST_EMULATION
__device__ __forceinline__ float4* dynamic_sums() {
  extern __shared__ float4 norm_sums[];
  return norm_sums;
}
#endif

template <typename DyT, typename XhT>
__global__ void __launch_bounds__(kRowThreads)
norm_backward_params_vec_kernel(const DyT* __restrict__ dy, const XhT* __restrict__ xhat,
                                const float* __restrict__ rstd, const float* __restrict__ weight, int64_t rows,
                                int64_t dim, bool centered, bool accumulate, float* __restrict__ dx,
                                bf16_t* __restrict__ dx16, bool with_bias, double* __restrict__ pw,
                                double* __restrict__ pb, nibble::cuda::ProducerAmax amax) {
  float4* sums = dynamic_sums();
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, chunks = static_cast<int>(dim / 128);
  const int64_t chunk = blockIdx.x, vecs = dim / 4;
  float4* sum_w = sums + warp * vecs;
  float4* sum_b = sums + (kRowsPerBlock + warp) * vecs;
#pragma unroll
  for (int c = 0; c < kVecChunks; ++c)
    if (c < chunks) {
      sum_w[lane + 32 * c] = make_float4(0, 0, 0, 0);
      if (with_bias) sum_b[lane + 32 * c] = make_float4(0, 0, 0, 0);
    }
  for (int64_t r = chunk * kChunkRows + warp; r < min(rows, (chunk + 1) * kChunkRows); r += kRowsPerBlock) {
    const int64_t row = r * dim + 4 * lane;
    float4 g[kVecChunks], xh[kVecChunks];
#pragma unroll
    for (int c = 0; c < kVecChunks; ++c)
      if (c < chunks) {
        g[c] = load4(dy + row + 128 * c);
        xh[c] = load4(xhat + row + 128 * c);
      }
    double s1 = 0.0, s2 = 0.0;
#pragma unroll
    for (int c = 0; c < kVecChunks; ++c)
      if (c < chunks) {
        const float4 w = load4(weight + 4 * lane + 128 * c);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const double d = static_cast<double>(get(g[c], j)) * get(w, j);
          s1 += d;
          s2 += d * get(xh[c], j);
        }
      }
    const double mean_dxhat = centered ? detail::warp_sum(s1) / static_cast<double>(dim) : 0.0;
    const double mean_dxhat_xhat = detail::warp_sum(s2) / static_cast<double>(dim);
    const double rs = rstd[r];
#pragma unroll
    for (int c = 0; c < kVecChunks; ++c) {
      if (c >= chunks) continue;
      const float4 w = load4(weight + 4 * lane + 128 * c);
      float4 out = accumulate ? load4(dx + row + 128 * c) : make_float4(0, 0, 0, 0);
      float4 sw = sum_w[lane + 32 * c];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const double d = static_cast<double>(get(g[c], j)) * get(w, j);
        const float gj = static_cast<float>(rs * (d - mean_dxhat - get(xh[c], j) * mean_dxhat_xhat));
        set(out, j, accumulate ? get(out, j) + gj : gj);
        set(sw, j, fmaf(get(g[c], j), get(xh[c], j), get(sw, j)));
      }
      sum_w[lane + 32 * c] = sw;
      if (with_bias) {
        float4 sb = sum_b[lane + 32 * c];
        sb.x += g[c].x, sb.y += g[c].y, sb.z += g[c].z, sb.w += g[c].w;
        sum_b[lane + 32 * c] = sb;
      }
      store4(dx + row + 128 * c, out);
      if (dx16 != nullptr)  // not store4: see bf16x2_bits
        *reinterpret_cast<uint2*>(dx16 + row + 128 * c) = detail::bf16x4_bits(out.x, out.y, out.z, out.w);
    }
  }
  __syncthreads();
  const float* fw = reinterpret_cast<const float*>(sums);
  const float* fb = fw + kRowsPerBlock * dim;
  for (int64_t col = threadIdx.x; col < dim; col += kRowThreads) {
    double tw = 0.0, tb = 0.0;
#pragma unroll
    for (int w = 0; w < kRowsPerBlock; ++w) {
      tw += fw[w * dim + col];
      if (with_bias) tb += fb[w * dim + col];
    }
    pw[chunk * dim + col] = tw;
    if (with_bias) pb[chunk * dim + col] = tb;
  }
  if (amax.slots.current == nullptr) return;
  // The chunk's dx16 (visible to the whole block after the barrier above), as BF16 pairs.
  const int64_t row0 = chunk * kChunkRows, pairs = dim / 2;
  const int64_t items = (min(rows, row0 + kChunkRows) - row0) / 16 * pairs;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(dx16) + row0 * pairs;
  float row_max = 0.0f, col_max = 0.0f;
  for (int64_t item = threadIdx.x; item < items; item += kRowThreads) {
    const uint32_t* w = words + item / pairs * 16 * pairs + item % pairs;
    float v[16][2];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const uint32_t pair = w[r * pairs];
      v[r][0] = bits_float(pair << 16);
      v[r][1] = bits_float(pair & 0xFFFF0000u);
    }
    nibble::cuda::accumulate_amax16<2>(v, amax, row_max, col_max);
  }
  nibble::cuda::finish_amax(row_max, col_max, amax.slots, amax.col_rht);
}

// Parameter-gradient partials: one thread per (column, chunk of kChunkRows rows), in double.
template <typename DyT, typename XhT>
__global__ void norm_param_partials_kernel(const DyT* __restrict__ dy, const XhT* __restrict__ xhat,
                                           int64_t rows, int64_t dim, bool with_bias, double* __restrict__ pw,
                                           double* __restrict__ pb) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (col >= dim) return;
  const int64_t r0 = chunk * kChunkRows, r1 = min(rows, r0 + kChunkRows);
  double sw = 0.0, sb = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float d = to_float(dy[r * dim + col]);
    sw += static_cast<double>(d) * to_float(xhat[r * dim + col]);
    sb += d;
  }
  pw[chunk * dim + col] = sw;
  if (with_bias) pb[chunk * dim + col] = sb;
}

// A norm's parameter gradients to finish: the partials of its backward ([chunks x dim] doubles for
// the weight, then the bias: pb and gb null without one) and the gradients they are added to.
struct NormFinishJob {
  const double* pw;
  const double* pb;
  int64_t chunks, dim;
  float* gw;
  float* gb;
};

// grad[col] += sum over chunks, for the 32 columns from col_block * 32. A block's 8 warps sum every
// 8th chunk in order, then warp 0 adds the 8 partial sums in warp order: a fixed order
// (deterministic), and 8 x 24 warps at work for GPT-2's 768 columns instead of 24 (one thread per
// column walking 256 chunks).
constexpr int kFinishWarps = 8;
__device__ __forceinline__ void finish_param_columns(const NormFinishJob& job, int64_t col_block) {
  __shared__ double part[2][kFinishWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t col = col_block * 32 + lane;
  double sw = 0.0, sb = 0.0;
  if (col < job.dim)
    for (int64_t c = warp; c < job.chunks; c += kFinishWarps) {
      sw += job.pw[c * job.dim + col];
      if (job.gb != nullptr) sb += job.pb[c * job.dim + col];
    }
  part[0][warp][lane] = sw;
  part[1][warp][lane] = sb;
  __syncthreads();
  if (warp != 0 || col >= job.dim) return;
  sw = sb = 0.0;
  for (int w = 0; w < kFinishWarps; ++w) {
    sw += part[0][w][lane];
    sb += part[1][w][lane];
  }
  job.gw[col] = static_cast<float>(job.gw[col] + sw);
  if (job.gb != nullptr) job.gb[col] = static_cast<float>(job.gb[col] + sb);
}

// One norm: blocks over its columns.
__global__ void __launch_bounds__(32 * kFinishWarps) norm_param_finish_kernel(NormFinishJob job) {
  finish_param_columns(job, blockIdx.x);
}

// Several norms in one launch (NormCuda::finish_deferred): norm blockIdx.y, its columns from
// blockIdx.x * 32 (blocks past a narrower norm's columns do nothing). Each norm's columns get the
// single kernel's operations in its order: the same bits. The GPU model's 25 norms at GPT-2 124M
// took 25 launches of about 6 us each (a grid of 24 blocks reading 3 MB), one after its norm's backward.
constexpr int kFinishJobsPerLaunch = 64;
struct NormFinishJobs {  // by value in the kernel's parameters (3 KiB, under their 4 KiB)
  NormFinishJob job[kFinishJobsPerLaunch];
};
__global__ void __launch_bounds__(32 * kFinishWarps) norm_param_finish_jobs_kernel(NormFinishJobs jobs) {
  const NormFinishJob& job = jobs.job[blockIdx.y];
  if (static_cast<int64_t>(blockIdx.x) * 32 >= job.dim) return;  // the whole block: before the barrier
  finish_param_columns(job, blockIdx.x);
}

}  // namespace
}  // namespace nibble::nn::cuda
