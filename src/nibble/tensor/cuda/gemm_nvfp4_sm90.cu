// The NVFP4-reading Hopper GEMM (gemm_nvfp4_sm90.h): wgmma on BF16 tiles that the CTA decodes from
// the packed operands into shared memory, one warpgroup decoding B while two others multiply.
//
// Persistent CTAs (one per SM, 384 threads) walk work units (output tiles of 128 x 256, or a range
// of k of one when K is split); per unit, k-tiles of 64 pass through a ring of four shared-memory
// stages. Each decoded row lands in the layout wgmma reads: K-major, 128-byte rows (64 BF16),
// 16-byte chunk c of row r at chunk c ^ (r % 8) (the 128-byte swizzle), stages 1024-byte aligned.
// - warpgroup 0, the producer, loads B's packed codes and scales of each k-tile two k-tiles ahead into
//   registers, decodes them with decode8_bf16 (code x block scale, exact) and stores the BF16 values.
//   It then arrives on the stage's `full` barrier, after a proxy fence (the tensor cores read shared
//   memory through the async proxy).
// - warpgroups 1 and 2, the consumers, each decode their own 64 rows of the A tile into the stage
//   (meet at a named barrier), wait for `full`, multiply their rows by the whole B tile (wgmma
//   m64n256k16, 128 FP32 accumulators a thread), and arrive on the stage's `empty` barrier once the
//   wgmma that read it has completed (one group stays in flight). After the last k-tile they scale
//   the sums by alpha and store them, while the producer already decodes the next unit.
// Barriers follow the usual phase parity: k-tile t (counted across units) uses stage t % 4 in round
// t / 4; `full` completes a phase per round when the producer's 128 threads arrive, `empty` when the
// consumers' 256 arrive, and the producer waits for round n - 1's `empty` before writing round n.
// Speed (docs/benchmarks.md, session 8): the decoding bounds it, about 450 TFLOP/s at 8192^3 on an
// H200, below cuBLASLt's BF16 GEMM on decoded operands.
#include "nibble/tensor/cuda/gemm_nvfp4_sm90.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "nibble/quant/fp4_decode_bf16.h"
#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::cuda {
namespace {

constexpr int kTileM = 128, kTileN = 256, kTileK = 64, kStages = 4, kThreads = 384;
[[maybe_unused]] constexpr int kLoadsAhead = 2;  // k-tiles the producer loads ahead of its decoding
constexpr int kRowBytes = kTileK * 2;                         // one BF16 row of a k-tile: 128 bytes
[[maybe_unused]] constexpr int kATileBytes = kTileM * kRowBytes;  // 16 KB
constexpr int kStageBytes = (kTileM + kTileN) * kRowBytes;     // A then B: 48 KB
constexpr int kBarrierBytes = 2 * kStages * 8;                 // full[], empty[]
constexpr int kSmemBytes = kStages * kStageBytes + kBarrierBytes + 1024;  // + room to align to 1024

// The device helpers exist for sm_90a (and the host pass) only; other device passes (sm_100a) keep a
// kernel that traps, which the host never launches there.
#if !defined(__CUDA_ARCH__) || (__CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define NIBBLE_SM90A_HELPERS 1
#endif

#ifdef NIBBLE_SM90A_HELPERS
// wgmma's shared-memory matrix descriptor for a K-major tile with 128-byte swizzle: start address,
// leading byte offset 16 (unused by this layout), stride 1024 bytes between groups of 8 rows.
__device__ __forceinline__ uint64_t tile_descriptor(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// 32 elements of one row's k-tile: 16 bytes of codes and the two E4M3 scale codes of its blocks.
struct RowSlice {
  uint4 codes;
  uint32_t scales;
};

__device__ __forceinline__ RowSlice load_slice(const uint8_t* codes, const uint8_t* scales) {
  RowSlice s;
  s.codes = __ldg(reinterpret_cast<const uint4*>(codes));
  s.scales = __ldg(reinterpret_cast<const unsigned short*>(scales));
  return s;
}

// Decodes a slice into its row of a BF16 tile: chunks 4 half .. 4 half + 3 of row r, swizzled.
__device__ __forceinline__ void store_slice(uint32_t tile_addr, int r, int half, const RowSlice& s) {
  const uint32_t words[4] = {s.codes.x, s.codes.y, s.codes.z, s.codes.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t scale2 = e4m3_scale_bf16x2((s.scales >> (8 * (j / 2))) & 0xFFu);
    uint32_t v[4];
    decode8_bf16(words[j], scale2, v);
    const uint32_t chunk = static_cast<uint32_t>(4 * half + j) ^ static_cast<uint32_t>(r & 7);
    const uint32_t addr = tile_addr + static_cast<uint32_t>(r) * kRowBytes + chunk * 16u;
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v[0]), "r"(v[1]), "r"(v[2]),
                 "r"(v[3])
                 : "memory");
  }
}

__device__ __forceinline__ void barrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Returns once the barrier's phase of this parity has completed.
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}

__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma.
__device__ __forceinline__ void fence_accumulators(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The producer's share of one k-tile of B: half p % 2 of rows p / 2 + 64 i, i = 0..3.
struct ProducerLoads {
  RowSlice s[4];
};
#endif  // NIBBLE_SM90A_HELPERS

// C[i], C[i + 1] = (x, y) (+ their old values when accumulating), in FP32 or rounded to BF16: the
// last step of both the GEMM's epilogue and the split-K reduction.
template <bool kBf16Out>
__device__ __forceinline__ void store_pair(void* c, int64_t i, float x, float y, bool accumulate) {
  if constexpr (kBf16Out) {
    __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(c) + i);
    if (accumulate) {
      const float2 old = __bfloat1622float2(*out);
      x += old.x;
      y += old.y;
    }
    *out = __floats2bfloat162_rn(x, y);
  } else {
    float2* out = reinterpret_cast<float2*>(static_cast<float*>(c) + i);
    if (accumulate) {
      const float2 old = *out;
      x += old.x;
      y += old.y;
    }
    *out = make_float2(x, y);
  }
}

template <bool kBf16Out>
__global__ void __launch_bounds__(kThreads, 1)
    nvfp4_gemm_kernel(int64_t m, int64_t n, int64_t k, Nvfp4Operand a, Nvfp4Operand b, void* c, const float* alpha,
                      bool accumulate, int splits, float* partials) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t full_bar = smem + kStages * kStageBytes, empty_bar = full_bar + kStages * 8;
  const int tid = threadIdx.x, warpgroup = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      barrier_init(full_bar + 8 * s, 128);
      barrier_init(empty_bar + 8 * s, 256);
    }
  }
  __syncthreads();

  // Work units: output tiles, each split into `splits` ranges of k-tiles (unit u: tile u / splits,
  // k-tiles [u % splits * k_tiles, ...)); with splits > 1 each unit writes its unscaled FP32 sums to
  // its slice of `partials` and reduce_partials_kernel finishes C.
  const int64_t tiles_n = n / kTileN, units = (m / kTileM) * tiles_n * splits;
  const int k_tiles = static_cast<int>(k / kTileK) / splits;
  const int64_t row_bytes = k / 2, scale_cols = k / 16;

  // Where a unit's rows start: the codes and scales of `row` at the unit's first k-tile, in the
  // slice of half `half` (the one division by rows_per_scale per unit, not per k-tile).
  const auto unit_base = [&](const Nvfp4Operand& op, int64_t unit, int64_t row, int half, const uint8_t*& codes,
                             const uint8_t*& scales) {
    const int kt0 = static_cast<int>(unit % splits) * k_tiles;
    codes = op.codes + row * row_bytes + 16 * half + 32 * kt0;
    scales = op.scales + (row / op.rows_per_scale) * scale_cols + 2 * half + 4 * kt0;
  };

  if (warpgroup == 0) {  // producer: B's k-tiles: load, decode, store, arrive on full
    // Thread p decodes half p % 2 of B tile rows p / 2 + 64 i, i = 0..3.
    const int p = tid, half = p % 2;
    const int64_t codes_step = 64 * row_bytes, scales_step = (64 / b.rows_per_scale) * scale_cols;
    const auto load = [&](const uint8_t* codes, const uint8_t* scales, int kt) {
      ProducerLoads l;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        l.s[i] = load_slice(codes + i * codes_step + 32 * kt, scales + i * scales_step + 4 * kt);
      return l;
    };
    // Loads run kLoadsAhead k-tiles ahead of the decoding (a load cursor ahead of the decode cursor),
    // so that their latency (a few microseconds from DRAM under load) hides behind that many
    // k-tiles of decoding; the register ring is indexed by the unrolled position.
    const uint8_t *load_codes = nullptr, *load_scales = nullptr;
    int64_t load_unit = blockIdx.x;
    int load_kt = 0;
    const auto load_next = [&](ProducerLoads& into) {
      if (load_unit >= units) return;
      if (load_kt == 0)
        unit_base(b, load_unit, (load_unit / splits % tiles_n) * kTileN + p / 2, half, load_codes, load_scales);
      into = load(load_codes, load_scales, load_kt);
      if (++load_kt == k_tiles) {
        load_kt = 0;
        load_unit += gridDim.x;
      }
    };
    ProducerLoads ahead[kLoadsAhead];
#pragma unroll
    for (int d = 0; d < kLoadsAhead; ++d) load_next(ahead[d]);
    const uint32_t total = static_cast<uint32_t>((units - blockIdx.x + gridDim.x - 1) / gridDim.x) * k_tiles;
    for (uint32_t t = 0; t < total;) {
#pragma unroll
      for (int d = 0; d < kLoadsAhead; ++d, ++t) {
        if (t >= total) break;
        const ProducerLoads cur = ahead[d];
        load_next(ahead[d]);
        const uint32_t s = t % kStages, round = t / kStages;
        if (round > 0) barrier_wait(empty_bar + 8 * s, (round - 1) & 1);
        const uint32_t b_tile = smem + s * kStageBytes + kATileBytes;
#pragma unroll
        for (int i = 0; i < 4; ++i) store_slice(b_tile, p / 2 + 64 * i, half, cur.s[i]);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        barrier_arrive(full_bar + 8 * s);
      }
    }
    return;
  }

  // Consumers: warpgroup 1 takes rows 0..63 of each tile, warpgroup 2 rows 64..127, and decodes
  // them itself (half q % 2 of row q / 2 of its 64 a thread) into the stage before multiplying:
  // the stage's A rows were last read by this warpgroup's own wgmma four k-tiles before, long
  // complete, so only the warpgroup's 128 threads need to meet (named barrier 1 + consumer).
  const int consumer = warpgroup - 1, q = tid % 128;
  const int a_row = 64 * consumer + q / 2, a_half = q % 2;
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const float scale = alpha != nullptr ? *alpha : 1.0f;
  uint32_t t = 0;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    const uint8_t *a_codes, *a_scales;
    unit_base(a, unit, (unit / splits / tiles_n) * kTileM + a_row, a_half, a_codes, a_scales);
    RowSlice next_a = load_slice(a_codes, a_scales);
    uint32_t prev_stage = 0;
    for (int kt = 0; kt < k_tiles; ++kt, ++t) {
      const uint32_t s = t % kStages, round = t / kStages;
      const uint32_t stage = smem + s * kStageBytes;
      store_slice(stage, a_row, a_half, next_a);  // then the next k-tile's slice, in flight meanwhile
      if (kt + 1 < k_tiles) next_a = load_slice(a_codes + 32 * (kt + 1), a_scales + 4 * (kt + 1));
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("bar.sync %0, 128;" ::"r"(1 + consumer) : "memory");
      barrier_wait(full_bar + 8 * s, round & 1);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      const uint64_t desc_a = tile_descriptor(stage + static_cast<uint32_t>(consumer) * (kATileBytes / 2));
      const uint64_t desc_b = tile_descriptor(stage + kATileBytes);
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk)  // 16 elements = 32 bytes = 2 descriptor address units
        wgmma_m64n256k16(acc, desc_a + 2 * kk, desc_b + 2 * kk);
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
      if (kt > 0) barrier_arrive(empty_bar + 8 * prev_stage);  // the previous k-tile's wgmma is done
      prev_stage = s;
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_accumulators(acc);
    barrier_arrive(empty_bar + 8 * prev_stage);

    // Accumulator layout of wgmma m64nNk16: warp w of the warpgroup holds rows 16w..16w+15; lane l
    // holds rows l/4 and l/4 + 8, columns 8j + 2(l%4) and the next, for j = 0..N/8-1.
    const int64_t tile = unit / splits;
    const int64_t m0 = (tile / tiles_n) * kTileM, n0 = (tile % tiles_n) * kTileN;
    const int64_t row0 = m0 + 64 * consumer + 16 * warp + lane / 4;
    float* partial = splits > 1 ? partials + (unit % splits) * m * n : nullptr;
#pragma unroll
    for (int j = 0; j < kTileN / 8; ++j) {
      const int64_t col = n0 + 8 * j + 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t i = (row0 + 8 * h) * n + col;
        if (partial != nullptr) {
          *reinterpret_cast<float2*>(partial + i) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
          continue;
        }
        store_pair<kBf16Out>(c, i, scale * acc[4 * j + 2 * h], scale * acc[4 * j + 2 * h + 1], accumulate);
      }
    }
  }
#else
  __trap();  // wgmma exists on sm_90a only; the host side never launches this elsewhere
#endif
}

// C = alpha * (sum of the splits' partial sums, in split order) (+ C): deterministic, unlike
// atomic additions. Four elements a thread.
template <bool kBf16Out>
__global__ void reduce_partials_kernel(int64_t count4, int splits, const float4* __restrict__ partials, void* c,
                                       const float* alpha, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count4) return;
  float4 sum = partials[i];
  for (int s = 1; s < splits; ++s) {
    const float4 p = partials[s * count4 + i];
    sum.x += p.x;
    sum.y += p.y;
    sum.z += p.z;
    sum.w += p.w;
  }
  const float scale = alpha != nullptr ? *alpha : 1.0f;
  store_pair<kBf16Out>(c, 4 * i, scale * sum.x, scale * sum.y, accumulate);
  store_pair<kBf16Out>(c, 4 * i + 2, scale * sum.z, scale * sum.w, accumulate);
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Splits of K for a call with few output tiles: the smallest power of two that gives every SM a
// unit, keeping at least 8 k-tiles a split (and dividing the k-tiles evenly).
int split_count(int64_t tiles, int64_t k_tiles, int sms) {
  int splits = 1;
  while (tiles * splits < sms && k_tiles % (2 * splits) == 0 && k_tiles / (2 * splits) >= 8) splits *= 2;
  return splits;
}

template <bool kBf16Out>
void launch(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b, void* c,
            const float* alpha, bool accumulate, DeviceBuffer<float>* workspace, cudaStream_t stream) {
  static const int sms = [] {
    NIBBLE_CUDA_CHECK(
        cudaFuncSetAttribute(nvfp4_gemm_kernel<kBf16Out>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    return device_attribute(cudaDevAttrMultiProcessorCount);
  }();
  const int64_t tiles = (m / kTileM) * (n / kTileN);
  const int splits = workspace != nullptr ? split_count(tiles, k / kTileK, sms) : 1;
  float* partials = nullptr;
  if (splits > 1) {
    workspace->reserve(static_cast<size_t>(splits * m * n));
    partials = workspace->data();
  }
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles * splits, sms));
  nvfp4_gemm_kernel<kBf16Out><<<grid, kThreads, kSmemBytes, stream>>>(m, n, k, a, b, c, alpha, accumulate, splits,
                                                                      partials);
  NIBBLE_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    const int64_t count4 = m * n / 4;
    reduce_partials_kernel<kBf16Out><<<static_cast<unsigned>((count4 + 255) / 256), 256, 0, stream>>>(
        count4, splits, reinterpret_cast<const float4*>(partials), c, alpha, accumulate);
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

bool nvfp4_packed_gemm_available() {
  static const bool hopper = device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
                             device_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
  return hopper;
}

bool nvfp4_packed_gemm_shape_ok(int64_t m, int64_t n, int64_t k) {
  return m > 0 && n > 0 && k > 0 && m % kTileM == 0 && n % kTileN == 0 && k % kTileK == 0;
}

bool nvfp4_packed_gemm_applies(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b,
                              const GemmOutput& c) {
  const auto rps_ok = [](int rps) { return rps == 1 || rps == 16; };
  return nvfp4_packed_gemm_available() && nvfp4_packed_gemm_shape_ok(m, n, k) && rps_ok(a.rows_per_scale) &&
         rps_ok(b.rows_per_scale) && aligned(a.codes, 16) && aligned(b.codes, 16) && aligned(a.scales, 2) &&
         aligned(b.scales, 2) && (c.type == GemmType::kF32 || c.type == GemmType::kBF16) && aligned(c.data, 8) &&
         c.batch_stride == 0 && c.epilogue == GemmEpilogue::kNone;
}

void nvfp4_packed_gemm(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b,
                      const GemmOutput& c, const float* alpha, bool accumulate, cudaStream_t stream,
                      DeviceBuffer<float>* split_workspace) {
  if (!nvfp4_packed_gemm_applies(m, n, k, a, b, c))
    throw std::invalid_argument("nvfp4_packed_gemm: needs compute capability 9.0, m a multiple of 128, n of 256, k of "
                                "64, 16-byte aligned codes and an FP32 or BF16 output; got m " +
                                std::to_string(m) + ", n " + std::to_string(n) + ", k " + std::to_string(k));
  if (c.type == GemmType::kBF16)
    launch<true>(m, n, k, a, b, c.data, alpha, accumulate, split_workspace, stream);
  else
    launch<false>(m, n, k, a, b, c.data, alpha, accumulate, split_workspace, stream);
}

}  // namespace nibble::cuda
