// Fused causal attention on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a), for the
// padded head dimension 64 (GPT-2's): the kernels behind flash_forward and flash_backward where
// flash_sm90_applies (attention_flash.cuh); the backward kernels are at the end of the file. Same inputs, outputs and math as the mma.sync forward of
// attention_flash.cu, with 128-query blocks (the online softmax meets the key tiles in other
// groupings, so the results agree to rounding, not bit for bit).
//
// A block is two warpgroups (256 threads) and owns 128 queries of one (batch, head); warpgroup w
// multiplies queries 64w..64w+63. Per key tile of 64:
//   S = Q K^T      wgmma m64n64k16, Q and K from shared memory (K-major tiles)
//   online softmax on S in registers (FP32), P rounded to BF16 pairs in registers
//   O += P V       wgmma m64n64k16 with P from registers and V from shared memory (MN-major)
// The forward overlaps a tile's softmax with the previous tile's O += P V on the tensor cores (as
// FlashAttention-3 does within a warpgroup), the backward issues its two score products together.
// The tiles are in shared memory as wgmma reads them: rows of 64 BF16 = 128 bytes, the 16-byte chunk
// c of row r at chunk c ^ (r % 8) (the 128-byte swizzle), tiles 1024-byte aligned. All threads load
// the next key and value tiles by cp.async while the current ones are multiplied.
#include <cuda_bf16.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/attention_flash_util.cuh"
#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::nn::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kBlockThreads = 256;  // two warpgroups
constexpr int kRows = 128;          // queries per block
constexpr int kHd = 64;             // head dimension: one 128-byte row
constexpr int kKeys = 64;           // keys per tile
// The forward's K and V tile buffers: tile i + 2 loads while tile i is multiplied and the P V
// product of tile i - 1 still reads its V.
constexpr int kStages = 4;
// The forward's shared memory: the Q tile, then kStages buffers each of K and V tiles; + room to align.
constexpr size_t kSmemBytes = (kRows + 2 * kStages * kKeys) * 128 + 1024;
// The kernels exist for sm_90a only; the other device passes (sm_100a) keep a body that traps, which
// the host never launches there (flash_sm90_applies). NIBBLE_FLASH_HOST_EMULATION:
// tests/cuda_emulation/flash_emulation_test.cpp compiles the kernels as host C++ with its own (CPU)
// versions of the PTX wrappers (NIBBLE_FLASH_SM90's), and its own launchers.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NIBBLE_FLASH_SM90 1
#endif
#if defined(NIBBLE_FLASH_SM90) || defined(NIBBLE_FLASH_HOST_EMULATION)
#define NIBBLE_FLASH_SM90_KERNELS 1
#endif
#ifdef NIBBLE_FLASH_SM90_KERNELS
constexpr uint32_t kTileBytes = kKeys * 128;  // a tile of 64 rows (keys, or the dk/dv kernel's queries)
#endif

#ifdef NIBBLE_FLASH_SM90
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
// cp.async's writes (generic proxy) -> wgmma's reads (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
#endif  // NIBBLE_FLASH_SM90

#ifdef NIBBLE_FLASH_SM90_KERNELS
// A thread's share (of THREADS) of loading a tile of rows of 64 BF16 (`stride` elements apart in
// global memory) into its swizzled layout: chunk c = tid % 8 of rows tid / 8 + (THREADS / 8) j. The
// swizzled chunk is the same for all j (THREADS / 8 is a multiple of 8), so each j steps both
// addresses by a constant.
template <int THREADS = kBlockThreads>
struct TileLoader {
  static constexpr int kRowStep = THREADS / 8;
  uint32_t smem_offset;  // of the thread's first chunk in a tile
  int64_t row_offset;    // elements from a tile's first row to the thread's first chunk
  int64_t step;          // kRowStep rows, in elements
  __device__ explicit TileLoader(int64_t stride) {
    const int r = threadIdx.x >> 3, c = threadIdx.x & 7;
    smem_offset = static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
    row_offset = r * stride + c * 8;
    step = kRowStep * stride;
  }
  // ROWS rows from gmem (a tile's first row) -> the tile at smem, asynchronously.
  template <int ROWS>
  __device__ __forceinline__ void load(uint32_t smem, const bf16* gmem) const {
    const bf16* src = gmem + row_offset;
#pragma unroll
    for (int j = 0; j < ROWS / kRowStep; ++j, src += step) cp_async16(smem + smem_offset + j * kRowStep * 128, src);
  }
};

// Shared-memory matrix descriptor, 128-byte swizzle, groups of 8 rows 1024 bytes apart. K-major
// tiles (rows along M or N, 64 elements of the reduction each) use the stride byte offset; MN-major
// ones (rows along the reduction) the leading one as well, for which both say 1024.
__device__ __forceinline__ uint64_t descriptor(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (uint64_t{1024 >> 4} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
#endif  // NIBBLE_FLASH_SM90_KERNELS

#ifdef NIBBLE_FLASH_SM90
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N of this warpgroup's committed wgmma groups are pending (the oldest finish first).
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { wgmma_wait<0>(); }
// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A B with A and B K-major tiles in shared memory (d overwritten when accumulate is 0), or
// (rs) d += A B with A in registers (BF16 pairs, the mma.sync A-fragment layout per warp) and B an
// MN-major tile: wgmma m64nNk16 for one warpgroup.
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_rs_m64n64k16_bt(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
#endif  // NIBBLE_FLASH_SM90

#ifdef NIBBLE_FLASH_SM90_KERNELS
// Where a thread of a forward or dq block stands: its warpgroup, warp, and quad row g and lane t4
// (see the accumulator layout below); the block's query tile qt (blockIdx.x reversed: the query
// tiles with the most key tiles first), head h, sequence b, their row block `head` and KV head.
struct QueryBlock {
  int wg, warp, g, t4;
  int64_t qt, h, b, head, kvh;
};
__device__ __forceinline__ QueryBlock query_block(const FlashDims& d) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  return {static_cast<int>(threadIdx.x >> 7), static_cast<int>((threadIdx.x >> 5) & 3), lane >> 2, lane & 3,
          static_cast<int64_t>(gridDim.x - 1 - blockIdx.x), h, b, b * d.H + h, h / (d.H / d.KV)};
}
#endif

// Grid (Tp / 128, H, B), blockIdx.x reversed (the query tiles with the most key tiles first). Two
// blocks an SM (at most 128 registers a thread). Key tiles of 128 were slower (session 11): 64 x 128
// scores a warpgroup take 156 registers, one block an SM.
// Accumulator layout (wgmma m64nNk16): warp w of a warpgroup holds its rows 16w..16w+15; lane 4g + t
// holds rows 16w + g and 16w + g + 8, columns 8j + 2t and 8j + 2t + 1 in registers 4j..4j+3 (row g:
// 4j, 4j+1; row g + 8: 4j+2, 4j+3).
// Per key tile i a warpgroup issues S_i = Q K_i^T and O += P_{i-1} V_{i-1} together, waits for S_i
// only, runs the softmax on it while the tensor cores multiply P_{i-1} V_{i-1}, then waits for that
// and rescales O: the same operations on the same values as one tile after the other, so the same bits.
__global__ void __launch_bounds__(kBlockThreads, 2)
    flash_forward_sm90_kernel(FlashDims d, BF16Heads q, BF16Heads k, BF16Heads v, float* __restrict__ out,
                              bf16* __restrict__ o, float* __restrict__ lse, bf16* __restrict__ out16,
                              nibble::cuda::ProducerAmax amax) {
#ifdef NIBBLE_FLASH_SM90_KERNELS
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t sQ = (smem_base + 1023u) & ~1023u;
  constexpr uint32_t kQBytes = kRows * 128;
  const uint32_t sK = sQ + kQBytes, sV = sK + kStages * kTileBytes;  // kStages buffers each
  const auto [wg, warp, g, t4, qt, h, b, head, kvh] = query_block(d);
  const bf16* kg = k.at(b, kvh, 0);
  const bf16* vg = v.at(b, kvh, 0);
  const TileLoader<> q_loader(q.row), k_loader(k.row), v_loader(v.row);
  const auto load_tile = [&](int64_t tile) {  // key and value tile `tile` into its buffers; one group
    const uint32_t buf = static_cast<uint32_t>(tile % kStages) * kTileBytes;
    k_loader.load<kKeys>(sK + buf, kg + tile * kKeys * k.row);
    v_loader.load<kKeys>(sV + buf, vg + tile * kKeys * v.row);
    cp_async_commit();
  };
  // Key tiles up to the query tile's last key (those beyond are all masked): the block loads them
  // all, warpgroup 0 multiplies all but the last (past its queries' last key). The warpgroup index
  // from lane 0: the compiler then knows the branches on n_mine are uniform in the warp (otherwise
  // it serializes the wgmma products behind them).
  const int64_t n_kv = (qt + 1) * (kRows / kKeys), n_mine = n_kv - 1 + __shfl_sync(0xffffffffu, wg, 0);
  q_loader.load<kRows>(sQ, q.at(b, h, qt * kRows));
  load_tile(0);  // with Q
  load_tile(1);  // n_kv >= 2

  const float c = d.scale * kLog2e;  // scores in base-2 units: exp(s scale) = 2^(s c)
  const int row_in_tile = 64 * wg + 16 * warp + g;  // this thread's rows: it and it + 8
  const uint64_t desc_q = descriptor(sQ + wg * (kQBytes / 2));
  constexpr int NJ = kKeys / 8;  // column groups of the score tile
  float acc[32] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // running max (base 2), partial sums
  uint32_t pa[kKeys / 16][4];  // P of the tile before, BF16 pairs: wgmma's A for O += P V
  // S = Q K^T of tile `tile`, issued and committed as one group.
  const auto multiply_qk = [&](float (&s)[4 * NJ], int64_t tile) {
    const uint64_t desc_k = descriptor(sK + static_cast<uint32_t>(tile % kStages) * kTileBytes);
#pragma unroll
    for (int kk = 0; kk < kHd / 16; ++kk)  // 16 elements = 32 bytes = 2 descriptor units
      wgmma_ss_m64n64k16(s, desc_q + 2 * kk, desc_k + 2 * kk, kk);
    wgmma_commit();
  };
  // O += bf16(P) V of tile `tile`: k-step kk covers keys 16kk..16kk+15, the accumulator's column
  // groups 2kk and 2kk + 1. Issued and committed as one group.
  const auto multiply_pv = [&](int64_t tile) {
    const uint64_t desc_v = descriptor(sV + static_cast<uint32_t>(tile % kStages) * kTileBytes);
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
      wgmma_rs_m64n64k16_bt(acc, pa[kk], desc_v + kk * (16 * 128 >> 4));  // 16 rows of 128 bytes a k-step
    wgmma_commit();
  };
  // The online softmax of tile `tile`'s scores s: the running max and sums, s overwritten with P;
  // alpha[r] rescales what O holds of row r to the new max.
  const auto softmax = [&](float (&s)[4 * NJ], int64_t tile, float (&alpha)[2]) {
    if (tile == n_mine - 1) {  // the tile on this warpgroup's diagonal: mask the keys after each query
      const int key0 = static_cast<int>(tile * kKeys - qt * kRows);  // from the query tile's first row
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + 8 * j + 2 * t4 + (e & 1) > row_in_tile + 8 * (e >> 1)) s[4 * j + e] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NJ; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      // Finite: key tile 0 comes first and every row attends to key 0. (A tile past a row's last
      // key, in padding rows, gives mx = -inf, and the row's m, l and acc stay as they were.)
      const float m_new = fmaxf(m[r], quad_max(mx) * c);
      alpha[r] = exp2_ftz(m[r] - m_new);  // 0 on the first tile
      m[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2_ftz(fmaf(s[4 * j + 2 * r + e], c, -m_new));  // 0 where masked
          s[4 * j + 2 * r + e] = p;
          sum += p;
        }
      l[r] = l[r] * alpha[r] + sum;
    }
  };
  const auto pack_p = [&](const float (&s)[4 * NJ]) {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = pack_bf16(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
  };
  // Waits for tile `tile` (tile + 1 may still be in flight) and starts loading tile + 2 into the
  // buffers of tile - 2: the barrier also means both warpgroups are done with those (the P V product
  // of tile - 2 was waited for in the iteration before).
  const auto next_tile = [&](int64_t tile) {
    cp_async_wait_one();
    fence_proxy_async();
    __syncthreads();
    if (tile + 2 < n_kv) {
      load_tile(tile + 2);
    } else {
      cp_async_commit();  // an empty group: one a tile, for the wait above
    }
  };

  {  // tile 0: no P V before it, O still 0
    next_tile(0);
    float s[4 * NJ], alpha[2];
    wgmma_fence();
    multiply_qk(s, 0);
    wgmma_wait<0>();
    fence_registers(s);
    softmax(s, 0, alpha);
    pack_p(s);
  }
  for (int64_t it = 1; it < n_kv; ++it) {
    next_tile(it);
    wgmma_fence();  // acc and pa were written last iteration
    if (it == n_mine) {  // warpgroup 0's last iteration: P V of the tile before only
      multiply_pv(it - 1);
      break;
    }
    float s[4 * NJ], alpha[2];
    multiply_qk(s, it);
    multiply_pv(it - 1);
    wgmma_wait<1>();  // S; P V still running
    fence_registers(s);
    softmax(s, it, alpha);
    wgmma_wait<0>();  // P V of the tile before: acc and pa are free
    fence_registers(acc);
    // O at the new maximum; skipped where no row of the warp's changed (x 1 leaves the bits).
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[4 * j + e] *= alpha[e >> 1];
    }
    pack_p(s);
  }
  if (n_mine == n_kv) {  // warpgroup 1: P V of its last tile
    wgmma_fence();
    multiply_pv(n_kv - 1);
  }
  wgmma_wait<0>();
  fence_registers(acc);

  // The output, normalised. o (the packed heads, which backward reads) and, where its rows are 128
  // aligned bytes, out16 leave through this warp's 16 rows of the Q tile (no longer read: every S
  // product of the warpgroup has finished) so that each store is a whole 16-byte chunk of a row.
  const int64_t out_width = d.H * d.hd;
  const bool rows16 = d.hd == kHd && out_width % 8 == 0 && reinterpret_cast<uintptr_t>(out16) % 16 == 0;
  const bool pairs = d.hd % 2 == 0 && reinterpret_cast<uintptr_t>(out16) % 4 == 0;
  uint8_t* const staged = smem_raw + (sQ - smem_base) + (64 * wg + 16 * warp) * 128;
  float inv[2];
  uint32_t stored[2][8];  // the rows' BF16 values
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = qt * kRows + row_in_tile + 8 * r;
    const float total = quad_sum(l[r]);  // >= 1: the maximum's own term
    inv[r] = 1.0f / total;
    if (t4 == 0) lse[head * d.Tp + row] = m[r] + log2f(total);
    const int rr = g + 8 * r;  // the row among the warp's 16; rr % 8 = g
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      stored[r][j] = pack_bf16(acc[4 * j + 2 * r] * inv[r], acc[4 * j + 2 * r + 1] * inv[r]);
      *reinterpret_cast<uint32_t*>(staged + rr * 128 + ((j ^ g) << 4) + 4 * t4) = stored[r][j];
    }
  }
  __syncwarp();
  const int64_t warp_row = qt * kRows + 64 * wg + 16 * warp;  // of the warp's first row, in the head
  if (amax.slots.current != nullptr) {  // out16's rows; T % 16 == 0, so the warp's are all within T or all beyond
    WarpAmax wa{amax};
    wa.add_rows(stored, g, warp_row < d.T);
    wa.finish(blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x < 32);
  }
  const int lane = static_cast<int>(threadIdx.x & 31);
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // 16 rows of 8 chunks: lane + 32i is chunk cc of row rr
    const int rr = (lane >> 3) + 4 * i, cc = lane & 7;
    const uint4 chunk = *reinterpret_cast<const uint4*>(staged + rr * 128 + ((cc ^ (rr & 7)) << 4));
    const int64_t row = warp_row + rr;
    *reinterpret_cast<uint4*>(o + (head * d.Tp + row) * kHd + 8 * cc) = chunk;
    if (out16 != nullptr && rows16 && row < d.T)
      *reinterpret_cast<uint4*>(out16 + (b * d.T + row) * out_width + h * d.hd + 8 * cc) = chunk;
  }
  if (out == nullptr && (out16 == nullptr || rows16)) return;
  // out in FP32, or out16 at other widths or alignments: the very values of o, in the unpadded layout.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = qt * kRows + row_in_tile + 8 * r;
    if (row >= d.T) continue;
    const int64_t dst_offset = (b * d.T + row) * out_width + h * d.hd;
    float* dst = out16 == nullptr ? out + dst_offset : nullptr;
    uint16_t* dst16 = out16 != nullptr ? reinterpret_cast<uint16_t*>(out16 + dst_offset) : nullptr;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = 8 * j + 2 * t4;
      const float o0 = acc[4 * j + 2 * r] * inv[r], o1 = acc[4 * j + 2 * r + 1] * inv[r];
      const uint32_t pair = pack_bf16(o0, o1);
      if (dst != nullptr) {
        if (col < d.hd) dst[col] = o0;
        if (col + 1 < d.hd) dst[col + 1] = o1;
      }
      if (dst16 != nullptr) {
        if (pairs && col + 1 < d.hd) {
          *reinterpret_cast<uint32_t*>(dst16 + col) = pair;
        } else {
          if (col < d.hd) dst16[col] = static_cast<uint16_t>(pair);
          if (col + 1 < d.hd) dst16[col + 1] = static_cast<uint16_t>(pair >> 16);
        }
      }
    }
  }
#else
  __trap();
#endif
}


// ---------------------------------------------------------------- backward: dq

#ifdef NIBBLE_FLASH_SM90_KERNELS
// A warp's 16 rows of accumulator `acc` (wgmma layout, 64 columns) into wa, as store_pair stores them
// in BF16, where `in_tensor` (the warp's rows lie within T).
__device__ __forceinline__ void add_amax(WarpAmax& wa, const float (&acc)[32], int g, bool in_tensor) {
  uint32_t rows[2][8];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) rows[r][j] = pack_bf16(acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
  wa.add_rows(rows, g, in_tensor);
}
#endif

#ifdef NIBBLE_FLASH_SM90_KERNELS
// The backward's two score products of one tile, both 64 x 64 over the head dimension, from shared
// memory: s = A1 B1^T and dp = A2 B2^T (dq: S = Q K^T, dP = dO V^T; dk/dv: their transposes), issued
// together and waited for once.
__device__ __forceinline__ void score_products(float (&s)[32], float (&dp)[32], uint64_t a1, uint64_t b1,
                                               uint64_t a2, uint64_t b2) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHd / 16; ++kk) wgmma_ss_m64n64k16(s, a1 + 2 * kk, b1 + 2 * kk, kk);
#pragma unroll
  for (int kk = 0; kk < kHd / 16; ++kk) wgmma_ss_m64n64k16(dp, a2 + 2 * kk, b2 + 2 * kk, kk);
  wgmma_commit();
  wgmma_wait_all();
  fence_registers(s);
  fence_registers(dp);
}
#endif

// Grid (Tp / 128, H, B), reversed as in forward. 128 queries a block (64 a warpgroup), key tiles of
// 64 up to the diagonal:
//   S = Q K^T, dP = dO V^T   wgmma m64n64k16 from shared memory (K-major tiles)
//   dS = scale P (dP - delta), P = 2^(S c - lse), in registers
//   dQ += dS K               wgmma with dS from registers and K as an MN-major tile
// Shared memory: Q and dO (128 rows each), then two buffers each of K and V.
// With `o` (the forward's packed output; dO in place, T = Tp, hd = 64), the kernel computes its rows'
// delta = rowsum(dO o) itself, in pack_dout_kernel's order (the same bits: 8 chunk sums of 8
// products, bf16x8_dot, then pairwise), and writes it for the dk/dv kernel, which runs after it:
// a pass over dO and o (50 MB a GPT-2 layer at 16k tokens) and a launch fewer a layer.
constexpr size_t kDqSmemBytes = (2 * kRows + 4 * kKeys) * 128 + 1024;

__global__ void __launch_bounds__(kBlockThreads, 2)
    flash_dq_sm90_kernel(FlashDims d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, BF16Heads o,
                         const float* __restrict__ lse, float* __restrict__ delta, HeadGrad dq,
                         nibble::cuda::ProducerAmax amax) {
#ifdef NIBBLE_FLASH_SM90_KERNELS
  extern __shared__ uint8_t smem_raw[];
  constexpr uint32_t kQBytes = kRows * 128;
  const uint32_t sQ = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t sdO = sQ + kQBytes, sK = sdO + kQBytes, sV = sK + 2 * kTileBytes;  // K, V: two buffers each
  const auto [wg, warp, g, t4, qt, h, b, head, kvh] = query_block(d);
  const bf16* kg = k.at(b, kvh, 0);
  const bf16* vg = v.at(b, kvh, 0);
  const TileLoader<> q_loader(q.row), o_loader(dout.row), k_loader(k.row), v_loader(v.row);
  q_loader.load<kRows>(sQ, q.at(b, h, qt * kRows));
  o_loader.load<kRows>(sdO, dout.at(b, h, qt * kRows));
  k_loader.load<kKeys>(sK, kg);
  v_loader.load<kKeys>(sV, vg);
  cp_async_commit();

  const float c = d.scale * kLog2e;
  const int row_in_tile = 64 * wg + 16 * warp + g;  // this thread's rows: it and it + 8
  const int64_t row0 = qt * kRows + row_in_tile;
  const float L[2] = {lse[head * d.Tp + row0], lse[head * d.Tp + row0 + 8]};
  float D[2];
  if (o.base != nullptr) {  // the quad's lane t4 takes columns 16 t4 .. 16 t4 + 15: chunks 2 t4, 2 t4 + 1
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const auto* dr = reinterpret_cast<const uint4*>(dout.at(b, h, row0 + 8 * r)) + 2 * t4;
      const auto* or_ = reinterpret_cast<const uint4*>(o.at(b, h, row0 + 8 * r)) + 2 * t4;
      float sum = bf16x8_dot(dr[0], or_[0], 0.0f) + bf16x8_dot(dr[1], or_[1], 0.0f);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      D[r] = sum;
      if (t4 == 0) delta[head * d.Tp + row0 + 8 * r] = sum;
    }
  } else {
    D[0] = delta[head * d.Tp + row0];
    D[1] = delta[head * d.Tp + row0 + 8];
  }
  const uint64_t desc_q = descriptor(sQ + wg * (kQBytes / 2)), desc_do = descriptor(sdO + wg * (kQBytes / 2));
  float acc[32] = {};
  const int64_t n_kv = (qt + 1) * (kRows / kKeys);
  for (int64_t it = 0; it < n_kv; ++it) {
    const uint32_t buf = static_cast<uint32_t>(it & 1) * kTileBytes;
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    if (it + 1 < n_kv) {
      k_loader.load<kKeys>(sK + (kTileBytes - buf), kg + (it + 1) * kKeys * k.row);
      v_loader.load<kKeys>(sV + (kTileBytes - buf), vg + (it + 1) * kKeys * v.row);
    }
    cp_async_commit();

    float s[32], dp[32];
    const uint64_t desc_k = descriptor(sK + buf);
    score_products(s, dp, desc_q, desc_k, desc_do, descriptor(sV + buf));

    const int key0 = static_cast<int>(it * kKeys - qt * kRows);
    const bool diagonal = key0 + kKeys > 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = exp2f(fmaf(s[4 * j + e], c, -L[e >> 1]));
        if (diagonal && key0 + 8 * j + 2 * t4 + (e & 1) > row_in_tile + 8 * (e >> 1)) p = 0.0f;
        s[4 * j + e] = d.scale * p * (dp[4 * j + e] - D[e >> 1]);  // dS
      }
    uint32_t pa[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = pack_bf16(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) wgmma_rs_m64n64k16_bt(acc, pa[kk], desc_k + kk * (16 * 128 >> 4));
    wgmma_commit();
    wgmma_wait_all();
    fence_registers(acc);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < 8; ++j)
      store_pair(dq, b, h, row0 + 8 * r, 8 * j + 2 * t4, acc[4 * j + 2 * r], acc[4 * j + 2 * r + 1]);
  if (amax.slots.current != nullptr) {
    WarpAmax wa{amax};
    add_amax(wa, acc, g, row0 - g < d.T);
    wa.finish(false);  // the dk/dv kernel's first warp zeroes the next slot
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------- backward: dk, dv

// Grid (Tp / 64, KV, B), one warpgroup a block (128 threads), 64 keys a block; loops over the heads of
// the group and, for each, over the query tiles of 64 from the block's first key on, in a fixed order
// (dk and dv summed over the group's heads in that order, in registers):
//   S^T = K Q^T, dP^T = V dO^T   wgmma from shared memory (K-major tiles)
//   P^T, dS^T in registers
//   dV += P^T dO, dK += dS^T Q   wgmma with P^T, dS^T from registers and dO, Q as MN-major tiles
// Shared memory: K and V (64 rows each), then two buffers each of Q, dO (64 rows), lse and delta
// (64 floats). 156 registers, three blocks an SM, which overlap each other's softmax and wgmma: on an
// H200 the backward of a GPT-2 layer took 0.376 ms this way, 0.417 ms with two warpgroups and 128 keys
// a block (191 registers, one block an SM).
constexpr int kDkdvThreads = 128;
constexpr size_t kDkdvSmemBytes = (2 * kKeys + 4 * kKeys) * 128 + 4 * kKeys * sizeof(float) + 1024;

__global__ void __launch_bounds__(kDkdvThreads, 3)
    flash_dkdv_sm90_kernel(FlashDims d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout,
                           const float* __restrict__ lse, const float* __restrict__ delta, HeadGrad dk,
                           HeadGrad dv, nibble::cuda::ProducerAmax amax) {
#ifdef NIBBLE_FLASH_SM90_KERNELS
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t sK = (raw + 1023u) & ~1023u;
  const uint32_t sV = sK + kTileBytes, sQ = sV + kTileBytes, sdO = sQ + 2 * kTileBytes;  // Q, dO: two buffers each
  float* sL = reinterpret_cast<float*>(smem_raw + (sdO + 2 * kTileBytes - raw));  // [2][64]
  float* sD = sL + 2 * kKeys;                                                  // [2][64]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t kt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, group = d.H / d.KV;
  const TileLoader<kDkdvThreads> k_loader(k.row), v_loader(v.row), q_loader(q.row), o_loader(dout.row);
  k_loader.load<kKeys>(sK, k.at(b, kvh, kt * kKeys));
  v_loader.load<kKeys>(sV, v.at(b, kvh, kt * kKeys));
  // Steps: (head of the group, query tile), query tiles from the one holding the block's first key.
  const int64_t n_q = d.Tp / kKeys - kt, steps = group * n_q;
  const auto load_step = [&](int64_t step, int buf) {
    const int64_t h = kvh * group + step / n_q, qi = kt + step % n_q;
    q_loader.load<kKeys>(sQ + buf * kTileBytes, q.at(b, h, qi * kKeys));
    o_loader.load<kKeys>(sdO + buf * kTileBytes, dout.at(b, h, qi * kKeys));
    if (threadIdx.x < 32) {  // 16 chunks of lse, then 16 of delta
      const int64_t row = (b * d.H + h) * d.Tp + qi * kKeys;
      const int i = threadIdx.x & 15;
      const float* src = (threadIdx.x < 16 ? lse : delta) + row + 4 * i;
      float* dst = (threadIdx.x < 16 ? sL : sD) + buf * kKeys + 4 * i;
      cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(dst)), src);
    }
  };
  load_step(0, 0);
  cp_async_commit();

  const float c = d.scale * kLog2e;
  const int key_in_tile = 16 * warp + g;  // this thread's keys: it and it + 8
  const uint64_t desc_k = descriptor(sK), desc_v = descriptor(sV);
  float dka[32] = {}, dva[32] = {};
  for (int64_t step = 0; step < steps; ++step) {
    const int buf = static_cast<int>(step & 1);
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();
    if (step + 1 < steps) load_step(step + 1, buf ^ 1);
    cp_async_commit();
    const int q_off = static_cast<int>((step % n_q) * kKeys);  // of the query tile, from the block's first key
    const uint64_t desc_qt = descriptor(sQ + buf * kTileBytes), desc_ot = descriptor(sdO + buf * kTileBytes);
    const float* cL = sL + buf * kKeys;
    const float* cD = sD + buf * kKeys;

    float s[32], dp[32];  // S^T and dP^T: rows keys, columns queries
    score_products(s, dp, desc_k, desc_qt, desc_v, desc_ot);

    const bool diagonal = q_off == 0;  // the query tile of the block's keys: mask the queries before each key
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t4 + (e & 1);
        float p = exp2f(fmaf(s[4 * j + e], c, -cL[col]));
        if (diagonal && q_off + col < key_in_tile + 8 * (e >> 1)) p = 0.0f;
        s[4 * j + e] = p;
        dp[4 * j + e] = d.scale * p * (dp[4 * j + e] - cD[col]);  // dS^T
      }
    uint32_t pp[kKeys / 16][4], pds[kKeys / 16][4];
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pp[kk][i] = pack_bf16(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
        pds[kk][i] = pack_bf16(dp[8 * kk + 2 * i], dp[8 * kk + 2 * i + 1]);
      }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) wgmma_rs_m64n64k16_bt(dva, pp[kk], desc_ot + kk * (16 * 128 >> 4));
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) wgmma_rs_m64n64k16_bt(dka, pds[kk], desc_qt + kk * (16 * 128 >> 4));
    wgmma_commit();
    wgmma_wait_all();
    fence_registers(dka);
    fence_registers(dva);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t t = kt * kKeys + key_in_tile + 8 * r;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      store_pair(dk, b, kvh, t, 8 * j + 2 * t4, dka[4 * j + 2 * r], dka[4 * j + 2 * r + 1]);
      store_pair(dv, b, kvh, t, 8 * j + 2 * t4, dva[4 * j + 2 * r], dva[4 * j + 2 * r + 1]);
    }
  }
  if (amax.slots.current != nullptr) {
    WarpAmax wa{amax};
    const bool in_t = kt * kKeys + 16 * warp < d.T;
    add_amax(wa, dka, g, in_t);
    add_amax(wa, dva, g, in_t);
    wa.finish(blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x < 32);
  }
#else
  __trap();
#endif
}

}  // namespace

#ifndef NIBBLE_FLASH_HOST_EMULATION
namespace {
bool wgmma_enabled = true;
}

void set_flash_wgmma(bool enabled) { wgmma_enabled = enabled; }

bool flash_sm90_applies(const FlashDims& d) {
  if (!wgmma_enabled || d.HD != kHd || d.Tp % kRows != 0) return false;
  // Whether each device is an sm_90 one, asked once per device (the attention runs 24 times a step).
  constexpr int kDevices = 64;
  static std::atomic<signed char> is_sm90[kDevices];  // 0 not asked yet, 1 yes, -1 no
  int device = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kDevices) return false;
  signed char known = is_sm90[device].load(std::memory_order_relaxed);
  if (known == 0) {
    const bool sm90 = nibble::cuda::device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
                      nibble::cuda::device_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
    known = sm90 ? 1 : -1;
    is_sm90[device].store(known, std::memory_order_relaxed);
  }
  return known == 1;
}

void flash_forward_sm90(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, float* out, bf16* o, float* lse,
                        bf16* out16, const nibble::cuda::ProducerAmax& amax, cudaStream_t stream) {
  NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(flash_forward_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(d.Tp / kRows), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  flash_forward_sm90_kernel<<<grid, kBlockThreads, kSmemBytes, stream>>>(d, q, k, v, out, o, lse, out16, amax);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void flash_backward_sm90(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, BF16Heads o,
                         const float* lse, float* delta, HeadGrad dq, HeadGrad dk, HeadGrad dv,
                         const nibble::cuda::ProducerAmax& amax, cudaStream_t stream) {
  // dq first: with `o` it writes the delta the dk/dv kernel reads. (Of the amax words, the dk/dv
  // kernel's first warp zeroes the next slot; either order does.)
  NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(flash_dq_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kDqSmemBytes)));
  const dim3 q_grid(static_cast<unsigned>(d.Tp / kRows), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  flash_dq_sm90_kernel<<<q_grid, kBlockThreads, kDqSmemBytes, stream>>>(d, q, k, v, dout, o, lse, delta, dq, amax);
  NIBBLE_CUDA_CHECK_LAUNCH();
  NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(flash_dkdv_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kDkdvSmemBytes)));
  const dim3 kv_grid(static_cast<unsigned>(d.Tp / kKeys), static_cast<unsigned>(d.KV), static_cast<unsigned>(d.B));
  flash_dkdv_sm90_kernel<<<kv_grid, kDkdvThreads, kDkdvSmemBytes, stream>>>(d, q, k, v, dout, lse, delta, dk, dv,
                                                                              amax);
  NIBBLE_CUDA_CHECK_LAUNCH();
}
#endif  // NIBBLE_FLASH_HOST_EMULATION

}  // namespace nibble::nn::cuda::detail
