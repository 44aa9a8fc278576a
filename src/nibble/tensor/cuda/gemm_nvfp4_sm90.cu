// The NVFP4-reading Hopper GEMM (gemm_nvfp4_sm90.h): wgmma on BF16 tiles that the CTA decodes from
// the packed operands into shared memory, k-tile by k-tile.
//
// CTA tile 128 x 128, k-tile 64, 256 threads = two warpgroups; warpgroup g computes rows 64g..64g+63
// of the tile with wgmma m64n128k16 (64 FP32 accumulators a thread). Every thread also decodes: per
// k-tile it loads 16 bytes of A's codes and 16 of B's (one half of a 64-element row slice, 32
// elements, two scales each) a whole k-tile ahead of their use, decodes them with decode8_bf16 and
// stores the BF16 values into the stage's tiles in the layout wgmma reads: K-major, 128-byte rows
// (64 BF16), 16-byte chunk c of row r at chunk c ^ (r % 8) (the 128-byte swizzle), 1024-byte aligned.
// Three stages: a stage is rewritten two k-tiles after the wgmma that read it was issued; every
// warpgroup waits for all but its latest group of wgmma before the next barrier, so by the time a
// stage is rewritten no warpgroup still reads it. With 96 KB of shared memory and at most 128
// registers a thread, two CTAs share an SM, so one CTA's decoding overlaps the other's MMAs.
#include "nibble/tensor/cuda/gemm_nvfp4_sm90.h"

#include <cuda_bf16.h>

#include <stdexcept>
#include <string>

#include "nibble/quant/fp4_decode_bf16.h"
#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::cuda {
namespace {

constexpr int kTileM = 128, kTileN = 128, kTileK = 64, kStages = 3, kThreads = 256;
constexpr int kTileBytes = kTileM * kTileK * 2;           // one operand's BF16 k-tile: 16 KB (kTileM == kTileN)
constexpr int kStageBytes = 2 * kTileBytes;               // A then B
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + room to align the stages to 1024 bytes

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
    const uint32_t addr = tile_addr + static_cast<uint32_t>(r) * 128u + chunk * 16u;
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v[0]), "r"(v[1]), "r"(v[2]),
                 "r"(v[3])
                 : "memory");
  }
}

__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}

// Keeps the compiler from moving accumulator reads or writes across the asynchronous wgmma.
__device__ __forceinline__ void fence_accumulators(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif  // NIBBLE_SM90A_HELPERS

template <bool kBf16Out>
__global__ void __launch_bounds__(kThreads, 2)
    nvfp4_gemm_kernel(int64_t n, int64_t k, Nvfp4Operand a, Nvfp4Operand b, void* c, const float* alpha,
                      bool accumulate) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM, n0 = static_cast<int64_t>(blockIdx.x) * kTileN;

  // This thread's slices: row `r` of the A and B tiles, elements 32 half .. 32 half + 31 of each k-tile.
  const int r = tid / 2, half = tid % 2;
  const int64_t scale_cols = k / 16;
  const uint8_t* a_codes = a.codes + (m0 + r) * (k / 2) + 16 * half;
  const uint8_t* b_codes = b.codes + (n0 + r) * (k / 2) + 16 * half;
  const uint8_t* a_scales = a.scales + ((m0 + r) / a.rows_per_scale) * scale_cols + 2 * half;
  const uint8_t* b_scales = b.scales + ((n0 + r) / b.rows_per_scale) * scale_cols + 2 * half;

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

  const int k_tiles = static_cast<int>(k / kTileK);
  RowSlice next_a = load_slice(a_codes, a_scales), next_b = load_slice(b_codes, b_scales);
  for (int t = 0; t < k_tiles; ++t) {
    const RowSlice cur_a = next_a, cur_b = next_b;
    if (t + 1 < k_tiles) {  // one k-tile ahead: 32 bytes of codes and 4 of scales per k-tile a row
      next_a = load_slice(a_codes + 32 * (t + 1), a_scales + 4 * (t + 1));
      next_b = load_slice(b_codes + 32 * (t + 1), b_scales + 4 * (t + 1));
    }
    const uint32_t stage = smem + static_cast<uint32_t>(t % kStages) * kStageBytes;
    store_slice(stage, r, half, cur_a);
    store_slice(stage + kTileBytes, r, half, cur_b);
    // The tensor cores read shared memory through the async proxy: order the stores before them.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();

    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    const uint64_t desc_a = tile_descriptor(stage + static_cast<uint32_t>(warpgroup) * (kTileBytes / 2));
    const uint64_t desc_b = tile_descriptor(stage + kTileBytes);
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk)  // 16 elements = 32 bytes = 2 descriptor address units
      wgmma_m64n128k16(acc, desc_a + 2 * kk, desc_b + 2 * kk);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_accumulators(acc);

  // Accumulator layout of wgmma m64nNk16: warp w of the warpgroup holds rows 16w..16w+15; lane l
  // holds rows l/4 and l/4 + 8, columns 8j + 2(l%4) and the next, for j = 0..N/8-1.
  const float scale = alpha != nullptr ? *alpha : 1.0f;
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const int64_t row0 = m0 + 64 * warpgroup + 16 * warp + lane / 4;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int64_t col = n0 + 8 * j + 2 * (lane % 4);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = (row0 + 8 * h) * n + col;
      float x = scale * acc[4 * j + 2 * h], y = scale * acc[4 * j + 2 * h + 1];
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
  }
#else
  __trap();  // wgmma exists on sm_90a only; the host side never launches this elsewhere
#endif
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int device_compute_capability() {
  int device = 0, major = 0, minor = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 10 * major + minor;
}

}  // namespace

bool nvfp4_fused_gemm_available() {
  static const bool hopper = device_compute_capability() == 90;
  return hopper;
}

bool nvfp4_fused_gemm_shape_ok(int64_t m, int64_t n, int64_t k) {
  return m > 0 && n > 0 && k > 0 && m % kTileM == 0 && n % kTileN == 0 && k % kTileK == 0 && m / kTileM <= 65535;
}

bool nvfp4_fused_gemm_applies(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b,
                              const GemmOutput& c) {
  const auto rps_ok = [](int rps) { return rps == 1 || rps == 16; };
  return nvfp4_fused_gemm_available() && nvfp4_fused_gemm_shape_ok(m, n, k) && rps_ok(a.rows_per_scale) &&
         rps_ok(b.rows_per_scale) && aligned(a.codes, 16) && aligned(b.codes, 16) && aligned(a.scales, 2) &&
         aligned(b.scales, 2) && (c.type == GemmType::kF32 || c.type == GemmType::kBF16) && aligned(c.data, 8) &&
         c.batch_stride == 0;
}

void nvfp4_fused_gemm(int64_t m, int64_t n, int64_t k, const Nvfp4Operand& a, const Nvfp4Operand& b,
                      const GemmOutput& c, const float* alpha, bool accumulate, cudaStream_t stream) {
  if (!nvfp4_fused_gemm_applies(m, n, k, a, b, c))
    throw std::invalid_argument("nvfp4_fused_gemm: needs compute capability 9.0, m and n multiples of 128, k of 64, "
                                "16-byte aligned codes and an FP32 or BF16 output; got m " +
                                std::to_string(m) + ", n " + std::to_string(n) + ", k " + std::to_string(k));
  const dim3 grid(static_cast<unsigned>(n / kTileN), static_cast<unsigned>(m / kTileM));
  if (c.type == GemmType::kBF16) {
    static const bool attr = [] {
      NIBBLE_CUDA_CHECK(
          cudaFuncSetAttribute(nvfp4_gemm_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
      return true;
    }();
    (void)attr;
    nvfp4_gemm_kernel<true><<<grid, kThreads, kSmemBytes, stream>>>(n, k, a, b, c.data, alpha, accumulate);
  } else {
    static const bool attr = [] {
      NIBBLE_CUDA_CHECK(
          cudaFuncSetAttribute(nvfp4_gemm_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
      return true;
    }();
    (void)attr;
    nvfp4_gemm_kernel<false><<<grid, kThreads, kSmemBytes, stream>>>(n, k, a, b, c.data, alpha, accumulate);
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda
