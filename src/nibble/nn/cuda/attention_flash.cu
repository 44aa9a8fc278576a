// Fused causal attention kernels (see attention_flash.cuh): BF16 mma.sync m16n8k16 with FP32
// accumulation, operand tiles staged in shared memory by cp.async (double-buffered: the next
// tile loads while the current one is multiplied) and read into fragments with ldmatrix.
//
// Every block has 4 warps; a warp owns 16 rows of the block's 64-row tile (queries in forward and
// dq, keys in dk/dv), so row statistics (max, sum, lse, delta) stay within the 4 lanes of a quad.
// Fragment layout of an mma accumulator c[nb][e] (16 rows x 8 columns per n-block nb), lane =
// 4 g + t: row g + 8 (e / 2), column 8 nb + 2 t + (e % 2). The same registers, rounded to BF16 and
// paired, are the A operand of the next product (the flash-attention trick: P never leaves the
// registers).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/attention_flash_util.cuh"
#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::nn::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;  // 4 warps
constexpr int kT = static_cast<int>(kFlashTile);

// ---------------------------------------------------------------- PTX wrappers

// NIBBLE_FLASH_HOST_EMULATION: tests/cuda_emulation/flash_emulation_test.cpp compiles this file
// as host C++ with its own (CPU) versions of these wrappers and of the launchers, to run the
// kernels' indexing and pipelining on machines without a GPU.
#ifndef NIBBLE_FLASH_HOST_EMULATION

__device__ inline uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ inline void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most one committed group (the prefetch of the next tile) is still in flight.
__device__ inline void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

__device__ inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b: a 16 x 16 (row-major fragment), b 16 x 8 (column fragment), c 16 x 8 FP32.
__device__ inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // NIBBLE_FLASH_HOST_EMULATION

// ---------------------------------------------------------------- tiles in shared memory

// Rows of HD BF16 padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix then fall
// in distinct bank groups.
template <int HD>
constexpr int kStride = HD + 8;

// rows x HD BF16 at gmem, `stride` elements from row to row -> smem (stride kStride), asynchronously.
template <int ROWS, int HD>
__device__ inline void load_tile(bf16* smem, const bf16* gmem, int64_t stride) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads)
    cp_async16(smem + (i / kChunks) * kStride<HD> + (i % kChunks) * 8,
               gmem + (i / kChunks) * stride + (i % kChunks) * 8);
}
// N contiguous floats (N a multiple of 4, gmem 16-byte aligned) -> smem, asynchronously.
template <int N>
__device__ inline void load_floats(float* smem, const float* gmem) {
  for (int i = threadIdx.x; i < N / 4; i += kThreads) cp_async16(smem + 4 * i, gmem + 4 * i);
}

// Lane addresses for ldmatrix.x4, from a tile of stride S:
// A operand, rows r0..r0+15, columns c0..c0+15 (the four 8x8 quarters in a0..a3 order).
template <int S>
__device__ inline uint32_t a_addr(const bf16* tile, int r0, int c0, int lane) {
  return smem_u32(tile + (r0 + (lane & 15)) * S + c0 + (lane >> 4) * 8);
}
// B operands of n-blocks n0 and n0 + 8 at k-step k0, where B[k][n] = tile[n][k] (the tile's rows
// are the product's columns): {b0, b1} of n0, then {b0, b1} of n0 + 8.
template <int S>
__device__ inline uint32_t b_rows_n_addr(const bf16* tile, int n0, int k0, int lane) {
  return smem_u32(tile + (n0 + (lane & 7) + (lane >> 4) * 8) * S + k0 + ((lane >> 3) & 1) * 8);
}
// The same where B[k][n] = tile[k][n] (the tile's rows are the reduction), for ldmatrix.trans.
template <int S>
__device__ inline uint32_t b_rows_k_addr(const bf16* tile, int k0, int n0, int lane) {
  return smem_u32(tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + n0 + (lane >> 4) * 8);
}

// acc [16 x 8 NB] += A B^T with A = a[r0 .. r0+16) x [0, HD) and B = b[0 .. 8 NB) x [0, HD), both
// tiles in shared memory (S = Q K^T, dP = dO V^T and their transposes).
template <int HD, int NB>
__device__ inline void mma_abt(float (&acc)[NB][4], const bf16* a, int r0, const bf16* b, int lane) {
  constexpr int S = kStride<HD>;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t af[4];
    ldsm_x4(af, a_addr<S>(a, r0, kk * 16, lane));
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t bf[4];
      ldsm_x4(bf, b_rows_n_addr<S>(b, nb * 8, kk * 16, lane));
      mma(acc[nb], af, bf[0], bf[1]);
      mma(acc[nb + 1], af, bf[2], bf[3]);
    }
  }
}

// acc [16 x HD] += bf16(P) B with P [16 x 8 KB] an accumulator in registers and B = b[0 .. 8 KB) x
// [0, HD) in shared memory (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K).
template <int HD, int KB>
__device__ inline void mma_pb(float (&acc)[HD / 8][4], const float (&p)[KB][4], const bf16* b, int lane) {
  constexpr int S = kStride<HD>;
#pragma unroll
  for (int kk = 0; kk < KB / 2; ++kk) {
    const uint32_t af[4] = {pack_bf16(p[2 * kk][0], p[2 * kk][1]), pack_bf16(p[2 * kk][2], p[2 * kk][3]),
                            pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nb = 0; nb < HD / 8; nb += 2) {
      uint32_t bf[4];
      ldsm_x4_trans(bf, b_rows_k_addr<S>(b, kk * 16, nb * 8, lane));
      mma(acc[nb], af, bf[0], bf[1]);
      mma(acc[nb + 1], af, bf[2], bf[3]);
    }
  }
}

// ---------------------------------------------------------------- forward

// Block: 64 queries of one (batch, head), grid (Tp / 64, H, B); blockIdx.x is reversed so that,
// within each (batch, head), the last query tiles (the most key tiles) are issued first. Shared
// memory: Q, then two K and two V buffers.
template <int HD>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(FlashDims d, BF16Heads q, BF16Heads k, BF16Heads v,
                                                                 float* __restrict__ out, bf16* __restrict__ o,
                                                                 float* __restrict__ lse,
                                                                 bf16* __restrict__ out16 = nullptr) {
  constexpr int S = kStride<HD>, kTile = kT * S;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sK = sQ + kTile;       // [2][kTile]
  bf16* sV = sK + 2 * kTile;   // [2][kTile]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t head = b * d.H + h, kvh = h / (d.H / d.KV);
  const bf16* kg = k.at(b, kvh, 0);
  const bf16* vg = v.at(b, kvh, 0);
  load_tile<kT, HD>(sQ, q.at(b, h, qt * kT), q.row);
  load_tile<kT, HD>(sK, kg, k.row);
  load_tile<kT, HD>(sV, vg, v.row);
  cp_async_commit();

  const float c = d.scale * kLog2e;  // scores in base-2 units: exp(s scale) = 2^(s c)
  const int64_t row0 = qt * kT + warp * 16 + g;  // this thread's rows: row0, row0 + 8
  float acc[HD / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // running max (base 2), partial sums
  const int64_t n_kv = qt + 1;  // key tiles 0..qt: those above the diagonal are all masked
  for (int64_t it = 0; it < n_kv; ++it) {
    const int buf = static_cast<int>(it & 1);
    if (it + 1 < n_kv) {
      load_tile<kT, HD>(sK + (buf ^ 1) * kTile, kg + (it + 1) * kT * k.row, k.row);
      load_tile<kT, HD>(sV + (buf ^ 1) * kTile, vg + (it + 1) * kT * v.row, v.row);
    }
    cp_async_commit();  // possibly empty: keeps the wait below uniform
    cp_async_wait_one();
    __syncthreads();

    float s[kT / 8][4] = {};
    mma_abt<HD, kT / 8>(s, sQ, warp * 16, sK + buf * kTile, lane);
    if (it == qt) {  // the diagonal tile: mask the keys after each query (tile-local indices)
#pragma unroll
      for (int nb = 0; nb < kT / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (nb * 8 + 2 * t4 + (e & 1) > warp * 16 + g + 8 * (e >> 1)) s[nb][e] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kT / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      // Finite: key tile 0 comes first and every row attends to key 0. (c > 0: the maximum of
      // the scaled scores is the scaled maximum.)
      const float m_new = fmaxf(m[r], quad_max(mx) * c);
      const float alpha = exp2_ftz(m[r] - m_new);  // 0 on the first tile
      m[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int nb = 0; nb < kT / 8; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float p = exp2_ftz(fmaf(s[nb][2 * r + j], c, -m_new));  // 0 where masked
          s[nb][2 * r + j] = p;
          sum += p;
        }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int nb = 0; nb < HD / 8; ++nb) acc[nb][2 * r] *= alpha, acc[nb][2 * r + 1] *= alpha;
    }
    mma_pb<HD, kT / 8>(acc, s, sV + buf * kTile, lane);  // O += bf16(P) V
    __syncthreads();  // all warps are done with this buffer before it is refilled
  }

  const int64_t out_width = d.H * d.hd;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + 8 * r;
    const float total = quad_sum(l[r]);  // >= 1: the maximum's own term
    const float inv = 1.0f / total;
    if (t4 == 0) lse[head * d.Tp + row] = m[r] + log2f(total);
    // out in FP32, or (out16) its BF16 rounding: the very values of o, in the unpadded layout.
    const int64_t dst_offset = (b * d.T + row) * out_width + h * d.hd;
    float* dst = row < d.T && out16 == nullptr ? out + dst_offset : nullptr;
    bf16* dst16 = row < d.T && out16 != nullptr ? out16 + dst_offset : nullptr;
    // Pairs of columns in one 4-byte store: an even head dimension and out16 itself 4-byte aligned
    // (the caller's pointer may point into a larger buffer at an odd element).
    const bool pairs = d.hd % 2 == 0 && reinterpret_cast<uintptr_t>(out16) % 4 == 0;
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb) {
      const int col = nb * 8 + 2 * t4;
      const float o0 = acc[nb][2 * r] * inv, o1 = acc[nb][2 * r + 1] * inv;
      const uint32_t pair = pack_bf16(o0, o1);
      *reinterpret_cast<uint32_t*>(o + (head * d.Tp + row) * HD + col) = pair;
      if (dst != nullptr) {
        if (col < d.hd) dst[col] = o0;
        if (col + 1 < d.hd) dst[col + 1] = o1;
      }
      if (dst16 != nullptr) {
        uint16_t* dst_bits = reinterpret_cast<uint16_t*>(dst16);
        if (pairs && col + 1 < d.hd) {  // an even offset: one 4-byte store
          *reinterpret_cast<uint32_t*>(dst_bits + col) = pair;
        } else {
          if (col < d.hd) dst_bits[col] = static_cast<uint16_t>(pair);
          if (col + 1 < d.hd) dst_bits[col + 1] = static_cast<uint16_t>(pair >> 16);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- backward: dk, dv

// Block: 64 keys of one (batch, KV head), grid (Tp / 64, KV, B). Loops over the heads of the
// group and, for each, over the query tiles of BQ rows at or below the diagonal, in a fixed
// order; dk and dv stay in registers. Shared memory: K, V, then two buffers each of Q, dO
// (BQ x HD), lse and delta (BQ floats).
template <int HD, int BQ>
__global__ void __launch_bounds__(kThreads) flash_dkdv_kernel(FlashDims d, BF16Heads q, BF16Heads k, BF16Heads v,
                                                              BF16Heads dout, const float* __restrict__ lse,
                                                              const float* __restrict__ delta, HeadGrad dk,
                                                              HeadGrad dv) {
  constexpr int S = kStride<HD>, kTile = kT * S, kQTile = BQ * S;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sK = reinterpret_cast<bf16*>(smem);
  bf16* sV = sK + kTile;
  bf16* sQ = sV + kTile;          // [2][kQTile]
  bf16* sdO = sQ + 2 * kQTile;    // [2][kQTile]
  float* sL = reinterpret_cast<float*>(sdO + 2 * kQTile);  // [2][BQ]
  float* sD = sL + 2 * BQ;                                 // [2][BQ]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, group = d.H / d.KV;
  load_tile<kT, HD>(sK, k.at(b, kvh, kt * kT), k.row);
  load_tile<kT, HD>(sV, v.at(b, kvh, kt * kT), v.row);
  // Steps: (head of the group, query tile), query tiles from the one holding this tile's first key.
  const int64_t first = kt * kT / BQ, n_q = d.Tp / BQ - first, steps = group * n_q;
  const auto load_step = [&](int64_t step, int buf) {
    const int64_t h = kvh * group + step / n_q, qi = first + step % n_q;
    const int64_t row = (b * d.H + h) * d.Tp + qi * BQ;  // of lse and delta
    load_tile<BQ, HD>(sQ + buf * kQTile, q.at(b, h, qi * BQ), q.row);
    load_tile<BQ, HD>(sdO + buf * kQTile, dout.at(b, h, qi * BQ), dout.row);
    load_floats<BQ>(sL + buf * BQ, lse + row);
    load_floats<BQ>(sD + buf * BQ, delta + row);
  };
  load_step(0, 0);
  cp_async_commit();

  const float c = d.scale * kLog2e;
  float dka[HD / 8][4] = {}, dva[HD / 8][4] = {};
  for (int64_t step = 0; step < steps; ++step) {
    const int buf = static_cast<int>(step & 1);
    if (step + 1 < steps) load_step(step + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    const int64_t q0 = (first + step % n_q) * BQ;
    const bf16* cQ = sQ + buf * kQTile;
    const bf16* cdO = sdO + buf * kQTile;
    const float* cL = sL + buf * BQ;
    const float* cD = sD + buf * BQ;

    float p[BQ / 8][4] = {};  // P^T: rows keys, columns queries
    mma_abt<HD, BQ / 8>(p, sK, warp * 16, cQ, lane);
#pragma unroll
    for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] = exp2f(fmaf(p[nb][e], c, -cL[nb * 8 + 2 * t4 + (e & 1)]));
    if (q0 < (kt + 1) * kT) {  // a tile crossing the diagonal: mask the queries before each key
      const int q_off = static_cast<int>(q0 - kt * kT);  // of the query tile in the key tile
#pragma unroll
      for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (q_off + nb * 8 + 2 * t4 + (e & 1) < warp * 16 + g + 8 * (e >> 1)) p[nb][e] = 0.0f;
    }
    mma_pb<HD, BQ / 8>(dva, p, cdO, lane);  // dV += bf16(P)^T dO
    float ds[BQ / 8][4] = {};               // dP^T = V dO^T, then dS^T
    mma_abt<HD, BQ / 8>(ds, sV, warp * 16, cdO, lane);
#pragma unroll
    for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = d.scale * p[nb][e] * (ds[nb][e] - cD[nb * 8 + 2 * t4 + (e & 1)]);
    mma_pb<HD, BQ / 8>(dka, ds, cQ, lane);  // dK += bf16(dS)^T Q
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t t = kt * kT + warp * 16 + g + 8 * r;
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb) {
      const int col = nb * 8 + 2 * t4;
      store_pair(dk, b, kvh, t, col, dka[nb][2 * r], dka[nb][2 * r + 1]);
      store_pair(dv, b, kvh, t, col, dva[nb][2 * r], dva[nb][2 * r + 1]);
    }
  }
}

// ---------------------------------------------------------------- backward: dq

// Block: 64 queries of one (batch, head), grid (Tp / 64, H, B), last tiles issued first as in
// forward. Loops over the key tiles at or below the diagonal; dq stays in registers. Shared memory:
// Q, dO, then two K and two V buffers.
template <int HD>
__global__ void __launch_bounds__(kThreads) flash_dq_kernel(FlashDims d, BF16Heads q, BF16Heads k, BF16Heads v,
                                                            BF16Heads dout, const float* __restrict__ lse,
                                                            const float* __restrict__ delta, HeadGrad dq) {
  constexpr int S = kStride<HD>, kTile = kT * S;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);
  bf16* sdO = sQ + kTile;
  bf16* sK = sdO + kTile;      // [2][kTile]
  bf16* sV = sK + 2 * kTile;   // [2][kTile]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t head = b * d.H + h, kvh = h / (d.H / d.KV);
  const bf16* kg = k.at(b, kvh, 0);
  const bf16* vg = v.at(b, kvh, 0);
  load_tile<kT, HD>(sQ, q.at(b, h, qt * kT), q.row);
  load_tile<kT, HD>(sdO, dout.at(b, h, qt * kT), dout.row);
  load_tile<kT, HD>(sK, kg, k.row);
  load_tile<kT, HD>(sV, vg, v.row);
  cp_async_commit();

  const float c = d.scale * kLog2e;
  const int64_t row0 = qt * kT + warp * 16 + g;  // this thread's rows: row0, row0 + 8
  const float L[2] = {lse[head * d.Tp + row0], lse[head * d.Tp + row0 + 8]};
  const float D[2] = {delta[head * d.Tp + row0], delta[head * d.Tp + row0 + 8]};
  float acc[HD / 8][4] = {};
  const int64_t n_kv = qt + 1;
  for (int64_t it = 0; it < n_kv; ++it) {
    const int buf = static_cast<int>(it & 1);
    if (it + 1 < n_kv) {
      load_tile<kT, HD>(sK + (buf ^ 1) * kTile, kg + (it + 1) * kT * k.row, k.row);
      load_tile<kT, HD>(sV + (buf ^ 1) * kTile, vg + (it + 1) * kT * v.row, v.row);
    }
    cp_async_commit();
    cp_async_wait_one();
    __syncthreads();
    const bf16* cK = sK + buf * kTile;

    float p[kT / 8][4] = {};
    mma_abt<HD, kT / 8>(p, sQ, warp * 16, cK, lane);
#pragma unroll
    for (int nb = 0; nb < kT / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nb][e] = exp2f(fmaf(p[nb][e], c, -L[e >> 1]));
    if (it == qt) {  // the diagonal tile: mask the keys after each query
#pragma unroll
      for (int nb = 0; nb < kT / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (nb * 8 + 2 * t4 + (e & 1) > warp * 16 + g + 8 * (e >> 1)) p[nb][e] = 0.0f;
    }
    float ds[kT / 8][4] = {};  // dP = dO V^T, then dS
    mma_abt<HD, kT / 8>(ds, sdO, warp * 16, sV + buf * kTile, lane);
#pragma unroll
    for (int nb = 0; nb < kT / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = d.scale * p[nb][e] * (ds[nb][e] - D[e >> 1]);
    mma_pb<HD, kT / 8>(acc, ds, cK, lane);  // dQ += bf16(dS) K
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int nb = 0; nb < HD / 8; ++nb)
      store_pair(dq, b, h, row0 + 8 * r, nb * 8 + 2 * t4, acc[nb][2 * r], acc[nb][2 * r + 1]);
}

// ---------------------------------------------------------------- launchers

// Query rows per dk/dv step: 32 at HD 128 keeps dk, dv (2 x 64 floats a thread) and the two
// score tiles within the register file.
template <int HD>
constexpr int kDkdvQueries = HD == 128 ? 32 : 64;

// Dynamic shared memory of each kernel (the layouts at the top of each kernel).
template <int HD>
constexpr size_t kForwardSmem = 5 * kT * kStride<HD> * sizeof(bf16);
template <int HD>
constexpr size_t kDkdvSmem = (2 * kT + 4 * kDkdvQueries<HD>) * kStride<HD> * sizeof(bf16) +
                             4 * kDkdvQueries<HD> * sizeof(float);
template <int HD>
constexpr size_t kDqSmem = 6 * kT * kStride<HD> * sizeof(bf16);

#ifndef NIBBLE_FLASH_HOST_EMULATION

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {  // above 48 KiB a kernel must opt in
  NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int HD>
void forward_impl(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, float* out, bf16* o, float* lse,
                  bf16* out16, cudaStream_t stream) {
  const size_t bytes = kForwardSmem<HD>;
  allow_smem(flash_forward_kernel<HD>, bytes);
  const dim3 grid(static_cast<unsigned>(d.Tp / kT), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  flash_forward_kernel<HD><<<grid, kThreads, bytes, stream>>>(d, q, k, v, out, o, lse, out16);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

template <int HD>
void backward_impl(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, const float* lse,
                   const float* delta, HeadGrad dq, HeadGrad dk, HeadGrad dv, cudaStream_t stream) {
  constexpr int BQ = kDkdvQueries<HD>;
  const size_t dkdv_bytes = kDkdvSmem<HD>;
  allow_smem(flash_dkdv_kernel<HD, BQ>, dkdv_bytes);
  const dim3 kv_grid(static_cast<unsigned>(d.Tp / kT), static_cast<unsigned>(d.KV), static_cast<unsigned>(d.B));
  flash_dkdv_kernel<HD, BQ><<<kv_grid, kThreads, dkdv_bytes, stream>>>(d, q, k, v, dout, lse, delta, dk, dv);
  NIBBLE_CUDA_CHECK_LAUNCH();
  const size_t dq_bytes = kDqSmem<HD>;
  allow_smem(flash_dq_kernel<HD>, dq_bytes);
  const dim3 q_grid(static_cast<unsigned>(d.Tp / kT), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  flash_dq_kernel<HD><<<q_grid, kThreads, dq_bytes, stream>>>(d, q, k, v, dout, lse, delta, dq);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

#endif  // NIBBLE_FLASH_HOST_EMULATION

}  // namespace

void check_flash_dims(const FlashDims& d) {
  const auto fail = [&](const std::string& what) {
    throw std::invalid_argument("fused attention (B " + std::to_string(d.B) + ", T " + std::to_string(d.T) + ", Tp " +
                                std::to_string(d.Tp) + ", H " + std::to_string(d.H) + ", KV " + std::to_string(d.KV) +
                                ", hd " + std::to_string(d.hd) + ", HD " + std::to_string(d.HD) + "): " + what);
  };
  if (d.HD != 64 && d.HD != 128) fail("the padded head dimension must be 64 or 128");
  if (d.hd <= 0 || d.hd > d.HD) fail("the head dimension must be in [1, HD]");
  if (d.T <= 0 || d.T > d.Tp || d.Tp % kFlashTile != 0) fail("need 0 < T <= Tp and Tp a multiple of 64");
  if (d.B <= 0 || d.H <= 0 || d.KV <= 0 || d.H % d.KV != 0) fail("need B, H, KV positive and H a multiple of KV");
  // The grids are (Tp / 64, H or KV, B): y and z are at most 65535, x at most 2^31 - 1.
  if (d.B > 65535 || d.H > 65535) fail("batch and heads must be at most 65535 (CUDA grid y/z limit)");
  if (d.Tp / kFlashTile > 0x7fffffffLL) fail("too many query tiles for the grid");
}

void check_flash_views(const FlashDims& d, std::initializer_list<BF16Heads> in, std::initializer_list<HeadGrad> out) {
  const auto fail = [&](const std::string& what) {
    throw std::invalid_argument("fused attention (T " + std::to_string(d.T) + ", Tp " + std::to_string(d.Tp) + ", hd " +
                                std::to_string(d.hd) + ", HD " + std::to_string(d.HD) + "): " + what);
  };
  // Elements of `bytes` size at p, p + stride, ...: p and the strides multiples of `align` bytes.
  const auto aligned = [](const void* p, std::initializer_list<int64_t> strides, int64_t bytes, int64_t align) {
    if (reinterpret_cast<uintptr_t>(p) % align != 0) return false;
    for (int64_t s : strides)
      if (s * bytes % align != 0) return false;
    return true;
  };
  // Anything but the packed layout holds exactly T rows of hd columns per head.
  const auto unpadded = [&](int64_t head, int64_t row) {
    return (row == d.HD && head == d.Tp * d.HD) || (d.T == d.Tp && d.hd == d.HD);
  };
  for (const BF16Heads& v : in) {
    if (v.base == nullptr || !aligned(v.base, {v.batch, v.head, v.row}, 2, 16))
      fail("an operand's rows are not 16-byte aligned");
    if (!unpadded(v.head, v.row)) fail("operands in place (not packed) need T = Tp and hd = HD");
  }
  for (const HeadGrad& g : out) {
    if ((g.f32.base == nullptr) == (g.b16.base == nullptr)) fail("a gradient needs one of f32 and b16");
    const bool ok = g.f32.base ? aligned(g.f32.base, {g.f32.batch, g.f32.head, g.f32.row}, 4, 8)
                               : aligned(g.b16.base, {g.b16.batch, g.b16.head, g.b16.row}, 2, 4);
    if (!ok) fail("a gradient's rows are not aligned for pairs of columns");
    if (!(g.f32.base ? unpadded(g.f32.head, g.f32.row) : unpadded(g.b16.head, g.b16.row)))
      fail("gradients in place (not packed) need T = Tp and hd = HD");
  }
}

size_t flash_shared_bytes(int64_t HD) {
  if (HD == 64) return std::max({kForwardSmem<64>, kDkdvSmem<64>, kDqSmem<64>});
  if (HD == 128) return std::max({kForwardSmem<128>, kDkdvSmem<128>, kDqSmem<128>});
  throw std::invalid_argument("fused attention: padded head dimension " + std::to_string(HD) + " is not 64 or 128");
}

#ifndef NIBBLE_FLASH_HOST_EMULATION

bool flash_fits_device(int64_t HD) {
  int device = 0, optin = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return flash_shared_bytes(HD) <= static_cast<size_t>(optin);
}

bool flash_forward(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, float* out, bf16* o, float* lse,
                   cudaStream_t stream, bf16* out16, const nibble::cuda::ProducerAmax& amax) {
  check_flash_dims(d);
  check_flash_views(d, {q, k, v});
  if (amax && out16 == nullptr) throw std::invalid_argument("fused attention: an amax of the output needs out16");
  if (flash_sm90_applies(d)) {
    const bool in_kernel = amax && d.T % 16 == 0;
    flash_forward_sm90(d, q, k, v, out, o, lse, out16, in_kernel ? amax : nibble::cuda::ProducerAmax{}, stream);
    return in_kernel;
  }
  if (d.HD == 64) forward_impl<64>(d, q, k, v, out, o, lse, out16, stream);
  else forward_impl<128>(d, q, k, v, out, o, lse, out16, stream);
  return false;
}

bool flash_delta_in_kernel(const FlashDims& d) { return flash_sm90_applies(d) && d.T == d.Tp && d.hd == d.HD; }

bool flash_backward(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, const float* lse,
                    float* delta, HeadGrad dq, HeadGrad dk, HeadGrad dv, cudaStream_t stream,
                    const nibble::cuda::ProducerAmax& amax, BF16Heads o) {
  check_flash_dims(d);
  check_flash_views(d, {q, k, v, dout}, {dq, dk, dv});
  if (o.base != nullptr) {
    if (!flash_delta_in_kernel(d))
      throw std::logic_error("flash_backward: delta is computed in the kernels only by the Hopper kernels, unpadded");
    check_flash_views(d, {o});
  }
  if (flash_sm90_applies(d)) {
    // In place in d_qkv's rows (heads_in_rows: T = Tp), whose 16-row blocks the warps' rows then are.
    const bool in_kernel = amax && dq.b16.base != nullptr && dk.b16.base != nullptr && dv.b16.base != nullptr &&
                           d.T % 16 == 0;
    flash_backward_sm90(d, q, k, v, dout, o, lse, delta, dq, dk, dv,
                        in_kernel ? amax : nibble::cuda::ProducerAmax{}, stream);
    return in_kernel;
  }
  if (d.HD == 64) backward_impl<64>(d, q, k, v, dout, lse, delta, dq, dk, dv, stream);
  else backward_impl<128>(d, q, k, v, dout, lse, delta, dq, dk, dv, stream);
  return false;
}

#endif  // NIBBLE_FLASH_HOST_EMULATION

}  // namespace nibble::nn::cuda::detail
