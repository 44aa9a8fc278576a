// Softmax cross-entropy kernels behind CrossEntropyCuda (layers_cuda.h); included by loss_cuda.cu
// only, and compiled as host C++ by tests/cuda_emulation/cross_entropy_emulation_test.cpp
// (NIBBLE_CE_HOST_EMULATION, which brings its own versions of the PTX wrappers below).
//
// The logits are FP32 (the whole batch in place, forward_backward) or BF16 (the chunked LM head's,
// gradient in place or to another buffer); the output has the logits' type. Two kernels compute the
// same bits:
// - strided: one block per row reads the row from global memory three times (max, sum of exp,
//   output with exp recomputed). Any vocab, any alignment: the fallback.
// - staged: persistent blocks copy a whole row into shared memory with bulk copies (cp.async.bulk,
//   one mbarrier per chunk of kStageChunk logits), then max, sum and output read shared memory. The
//   logits are read from global memory once, and the next row's chunks are copied in while the
//   output pass still works on the current one (each chunk as soon as every thread is done with it).
// The staged kernel keeps the strided one's float and double operation order where it matters:
// the sum is the same per-thread strided double sum (stride kLossThreads) and block tree; with FP32
// logits exp is stored in shared memory during the sum and reused for the output (softmax_exp is
// deterministic, so it is the value the strided kernel recomputes), a BF16 row has no room for it
// and recomputes it as the strided kernel does; the max is order-independent (fmaxf ignores NaNs,
// and a max of +0 or -0 gives the same differences' exps and loss), so it may be taken in any
// order, chunk by chunk as the copies land.
#pragma once

#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/exp2_ftz.cuh"
#include "nibble/nn/cuda/kernel_util.cuh"

namespace nibble::nn::cuda::detail {
namespace {

// A staged BF16 row of GPT-2's vocabulary (100.6 KB) leaves room for a second block on an SM: two
// blocks of 512 threads, one computing while the other's row lands (on an H200 a chunk of 5312 rows
// took 0.65 ms with one block of 1024 threads, 0.52 with these; docs/benchmarks.md session 22). The
// strided kernel takes the same block size, so both add in the same order; it is the fallback (no
// bulk copies before sm_90, unaligned rows) and the slower for it: 1.06 -> 1.59 ms for that chunk.
constexpr int kLossThreads = 512;
// Logits per bulk copy and mbarrier (32 KiB of FP32, 16 KiB of BF16): the granularity at which the
// next row's copy overlaps the output pass.
constexpr int64_t kStageChunk = 8192;
constexpr int kStageMaxChunks = 8;  // rows up to 65536 logits (the shared memory limit comes first)

// Whether the staged kernel takes rows of `vocab` logits of `bytes` bytes each (4: FP32, 2: BF16) at
// `logits` (row r at logits + r vocab), writing `out` (nullptr, or rows of the same type at
// out + r vocab), given `max_dynamic_shared` bytes of dynamic shared memory a block may opt in to.
// Bulk copies need 16-byte aligned sources and sizes (so rows of a multiple of 16 bytes and aligned
// logits); the output is written four elements at a time.
inline bool stage_fits(int64_t vocab, const void* logits, const void* out, size_t bytes, size_t max_dynamic_shared) {
  if (vocab <= 0 || (static_cast<size_t>(vocab) * bytes) % 16 != 0 || vocab > kStageMaxChunks * kStageChunk)
    return false;
  if (static_cast<size_t>(vocab) * bytes > max_dynamic_shared) return false;
  if (reinterpret_cast<uintptr_t>(logits) % 16 != 0) return false;
  return out == nullptr || reinterpret_cast<uintptr_t>(out) % (4 * bytes) == 0;
}
inline size_t stage_shared_bytes(int64_t vocab, size_t bytes) { return static_cast<size_t>(vocab) * bytes; }

// ---------------------------------------------------------------- PTX wrappers (sm_90+)

#ifndef NIBBLE_CE_HOST_EMULATION

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The block's dynamic shared memory: the staged row.
__device__ __forceinline__ void* stage_memory() {
  extern __shared__ float4 stage_shared[];
  return stage_shared;
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the bulk-copy unit (the async proxy).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival (the barrier's only one) that also announces `bytes` of copies to come.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
// Until the barrier's phase of parity `parity` has completed (its copies have landed).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (done == 0)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
}
// bytes (a multiple of 16, both addresses 16-byte aligned) global -> shared; completes on `bar`.
__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(smem)),
               "l"(gmem), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
// Orders this thread's earlier shared-memory accesses before later bulk copies into that memory.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#endif  // NIBBLE_CE_HOST_EMULATION

// ---------------------------------------------------------------- the softmax's exponential

// e^(x - max) as 2^(x log2(e) - max log2(e)): one FMA and the hardware's ex2.approx (exp2_ftz),
// where expf spends about ten instructions on its range reduction. Every exp is computed twice (a
// staged BF16 row has no room to keep them), and with BF16 logits the kernels were bound by that
// arithmetic rather than by memory (docs/benchmarks.md, sessions 21-22). Error: ex2.approx's couple
// of ulp, plus the argument's roundings, 2^-24 of |x log2(e)| and of |max log2(e)| (CUDA's __expf
// has the same kind: 2 + 1.173 |x| ulp); about 1e-6 relative at |x - max| ~ 20, where the term is
// 2e-9 of the largest, and far below the BF16 rounding of the logits and of their gradient. Every
// kernel here takes its exps from it, so they keep giving the same bits as each other.
// -max log2(e), rounded once per row: the shift every exp of the row takes.
__device__ __forceinline__ float softmax_shift(float max) { return -__fmul_rn(max, kLog2e); }
__device__ __forceinline__ float softmax_exp(float x, float shift) { return exp2_ftz(fmaf(x, kLog2e, shift)); }

// ---------------------------------------------------------------- loads and stores

// A logit as FP32: as stored, or a BF16 one widened (exact).
__device__ __forceinline__ float load_logit(const float* p) { return *p; }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) {
  return BF16::decode(*reinterpret_cast<const uint16_t*>(p));
}
// Four consecutive logits (p aligned to four elements).
__device__ __forceinline__ float4 load_logit4(const float* p) { return load4(p); }
__device__ __forceinline__ float4 load_logit4(const __nv_bfloat16* p) {
  return load4(reinterpret_cast<const bf16_t*>(p));
}

// How one gradient value is stored: FP32 as computed, or BF16 rounded to nearest even exactly as
// OperandCuda rounds a bf16 operand (BF16::encode; bf16x2_bits for four), so that the chunked head's
// BF16 dlogits are the bits the unchunked head fed its GEMMs.
__device__ __forceinline__ void store(float* out, float g) { *out = g; }
__device__ __forceinline__ void store(__nv_bfloat16* out, float g) {
  *reinterpret_cast<uint16_t*>(out) = BF16::encode(g, Rounding::kNearestEven);
}
// Four consecutive values (out aligned to four elements).
__device__ __forceinline__ void store4(float* out, const float (&g)[4]) {
  *reinterpret_cast<float4*>(out) = make_float4(g[0], g[1], g[2], g[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* out, const float (&g)[4]) {
  *reinterpret_cast<uint2*>(out) = bf16x4_bits(g[0], g[1], g[2], g[3]);
}

// ---------------------------------------------------------------- strided (fallback)

// One row, one block: max, sum of exp in double, then out (when not nullptr) = scale * exp(x - max)
// (scale = grad_scale / sum, or 1 / sum for the probabilities) and the target's entry loses
// grad_scale. `out` may be `row` itself (each thread rewrites only the entries it read). A bad
// target zeroes the output row, counts 0 and is flagged at its batch position. T: float or
// __nv_bfloat16, the logits' and the output's type.
//
// Every instantiation runs the same float operations in the same order (the per-thread strided
// sums and the block tree depend only on the block size); the multiply and the subtraction are
// written as _rn intrinsics so that no instantiation contracts them into an FMA, which would round
// once instead of twice. That is what makes the BF16 output the rounding of the FP32 one, bit for bit.
template <typename T>
__device__ void cross_entropy_row(const T* row, uint32_t target, int64_t vocab, float grad_scale, int64_t position,
                                  T* out, double* row_loss, unsigned long long* bad) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  if (target >= vocab) {
    if (threadIdx.x == 0) {
      flag_bad_id(bad, position, target);
      *row_loss = 0.0;
    }
    if (out != nullptr)
      for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) store(out + j, 0.0f);
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, load_logit(row + j));
  mx = block_max(mx, fscratch);
  const float target_logit = load_logit(row + target);
  const float shift = softmax_shift(mx);
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += softmax_exp(load_logit(row + j), shift);
  sum = block_sum(sum, dscratch);
  // Every thread has read row[target] before any thread writes (block_sum synchronises).
  if (out != nullptr) {
    const float scale = static_cast<float>((grad_scale != 0.0f ? grad_scale : 1.0f) / sum);
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      float g = __fmul_rn(softmax_exp(load_logit(row + j), shift), scale);
      if (grad_scale != 0.0f && j == target) g = __fsub_rn(g, grad_scale);
      store(out + j, g);
    }
  }
  if (threadIdx.x == 0) *row_loss = log(sum) - static_cast<double>(target_logit - mx);
}

// In place: the logits become the gradient (or the probabilities).
__global__ void __launch_bounds__(kLossThreads)
cross_entropy_kernel(float* __restrict__ logits, const uint32_t* __restrict__ targets, int64_t vocab,
                     float grad_scale, double* __restrict__ row_loss, unsigned long long* bad) {
  const int64_t r = blockIdx.x;
  float* row = logits + r * vocab;
  cross_entropy_row(row, targets[r], vocab, grad_scale, r, row, row_loss + r, bad);
}

// A chunk of rows [row0, row0 + gridDim.x) of a batch: logits and dlogits (nullptr, logits itself,
// or another buffer) hold the chunk's rows; targets and row_loss are the batch's.
__global__ void __launch_bounds__(kLossThreads)
cross_entropy_chunk_kernel(const __nv_bfloat16* logits, const uint32_t* __restrict__ targets, int64_t row0,
                           int64_t vocab, float grad_scale, __nv_bfloat16* dlogits, double* __restrict__ row_loss,
                           unsigned long long* bad) {
  const int64_t r = blockIdx.x, position = row0 + r;
  cross_entropy_row(logits + r * vocab, targets[position], vocab, grad_scale, position,
                    dlogits != nullptr ? dlogits + r * vocab : nullptr, row_loss + position, bad);
}

// ---------------------------------------------------------------- staged

// Rows [0, rows) of logits (row r at logits + r vocab; batch position row0 + r for targets,
// row_loss and the bad-target flag), block b taking rows b, b + gridDim.x, ...: the same results
// as cross_entropy_row. `out` (nullptr: losses only) may be `logits` itself (in place: a row is
// written only after its copy has landed). Needs stage_fits() and stage_shared_bytes(vocab,
// sizeof(T)) of dynamic shared memory.
template <typename T>
__global__ void __launch_bounds__(kLossThreads, 2)
cross_entropy_staged_kernel(const T* logits, const uint32_t* __restrict__ targets, int64_t row0, int64_t rows,
                            int64_t vocab, float grad_scale, T* out, double* __restrict__ row_loss,
                            unsigned long long* bad) {
  // FP32 rows keep each exp where its logit was (the output pass reuses it); BF16 ones recompute it.
  constexpr bool kKeepsExp = std::is_same_v<T, float>;
  __shared__ uint64_t landed[kStageMaxChunks];  // chunk c of the current row is in shared memory
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  T* const stage = static_cast<T*>(stage_memory());
  const int chunks = static_cast<int>((vocab + kStageChunk - 1) / kStageChunk);
  const auto chunk_end = [&](int c) { return c + 1 < chunks ? (c + 1) * kStageChunk : vocab; };
  const auto load_chunk = [&](int64_t r, int c) {  // one thread
    const int64_t j0 = c * kStageChunk;
    const auto bytes = static_cast<uint32_t>((chunk_end(c) - j0) * sizeof(T));
    mbar_arrive_expect_tx(&landed[c], bytes);
    bulk_load(stage + j0, logits + r * vocab + j0, bytes, &landed[c]);
  };
  if (threadIdx.x == 0) {
    for (int c = 0; c < chunks; ++c) mbar_init(&landed[c], 1);
    mbar_init_fence();
    if (blockIdx.x < rows)
      for (int c = 0; c < chunks; ++c) load_chunk(blockIdx.x, c);
  }
  __syncthreads();

  uint32_t parity = 0;  // of the barriers' current phase: flips with every row
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x, parity ^= 1) {
    const int64_t position = row0 + r, next = r + gridDim.x;
    const uint32_t target = targets[position];
    const bool ok = target < vocab;
    // Max over each chunk as it lands. Every chunk is waited for, also for a bad target: its copy
    // must land before the next one into the same memory is issued.
    float mx = -INFINITY;
    for (int c = 0; c < chunks; ++c) {
      mbar_wait(&landed[c], parity);
#pragma unroll 4
      for (int64_t q = c * kStageChunk / 4 + threadIdx.x; q < chunk_end(c) / 4; q += blockDim.x) {
        const float4 v = load_logit4(stage + 4 * q);
        mx = fmaxf(mx, fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)));
      }
    }
    const float target_logit = ok ? load_logit(stage + target) : 0.0f;  // before an FP32 sum pass overwrites it
    mx = block_max(mx, fscratch);  // synchronises: the max pass's reads are done
    // The strided kernel's order: j = threadIdx.x + k blockDim.x, k ascending. The loads of a batch
    // are written before its stores, as the compiler cannot tell that they never overlap.
    const float shift = softmax_shift(mx);
    double sum = 0.0;
    if (ok) {
      constexpr int kBatch = 8;
      int64_t j = threadIdx.x;
      for (; j + (kBatch - 1) * blockDim.x < vocab; j += kBatch * blockDim.x) {
        float e[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) e[u] = load_logit(stage + j + u * blockDim.x);
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          e[u] = softmax_exp(e[u], shift);
          if constexpr (kKeepsExp) stage[j + u * blockDim.x] = e[u];
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) sum += e[u];
      }
      for (; j < vocab; j += blockDim.x) {
        const float e = softmax_exp(load_logit(stage + j), shift);
        if constexpr (kKeepsExp) stage[j] = e;
        sum += e;
      }
    }
    sum = block_sum(sum, dscratch);  // synchronises: every exp is in place
    const float scale = static_cast<float>((grad_scale != 0.0f ? grad_scale : 1.0f) / sum);
    // Output chunk by chunk; once every thread is done with a chunk, the next row's copy refills it.
    for (int c = 0; c < chunks; ++c) {
      if (out != nullptr) {
        T* const out_row = out + r * vocab;
        // The quad holding the target (none: -1) loses grad_scale at element target % 4.
        const int64_t target_quad = ok && grad_scale != 0.0f ? static_cast<int64_t>(target / 4) : -1;
        const uint32_t target_lane = target % 4;
        const auto exps = [&](int64_t q) {  // of elements 4q .. 4q + 3
          const float4 v = load_logit4(stage + 4 * q);
          if constexpr (kKeepsExp)
            return v;
          else
            return make_float4(softmax_exp(v.x, shift), softmax_exp(v.y, shift), softmax_exp(v.z, shift),
                               softmax_exp(v.w, shift));
        };
        const auto emit = [&](int64_t q, float4 e) {  // elements 4q .. 4q + 3
          float g[4] = {e.x, e.y, e.z, e.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            g[i] = ok ? __fmul_rn(g[i], scale) : 0.0f;
            if (q == target_quad && target_lane == static_cast<uint32_t>(i)) g[i] = __fsub_rn(g[i], grad_scale);
          }
          store4(out_row + 4 * q, g);
        };
        const int64_t q_end = chunk_end(c) / 4;
        int64_t q = c * kStageChunk / 4 + threadIdx.x;
        for (; q + blockDim.x < q_end; q += 2 * blockDim.x) {  // two loads before the stores
          const float4 e0 = exps(q), e1 = exps(q + blockDim.x);
          emit(q, e0);
          emit(q + blockDim.x, e1);
        }
        if (q < q_end) emit(q, exps(q));
      }
      fence_proxy_async();
      __syncthreads();
      if (threadIdx.x == 0 && next < rows) load_chunk(next, c);
    }
    if (threadIdx.x == 0) {
      if (ok) {
        row_loss[position] = log(sum) - static_cast<double>(target_logit - mx);
      } else {
        flag_bad_id(bad, position, target);
        row_loss[position] = 0.0;
      }
    }
  }
}

}  // namespace
}  // namespace nibble::nn::cuda::detail
