// Runs the fused attention kernels (src/nibble/nn/cuda/attention_flash.cu, and the Hopper kernels of
// attention_flash_sm90.cu) on the CPU, without a GPU: the files are compiled as host C++ with every
// CUDA thread of a block a std::thread, and the warp-level instructions (ldmatrix, mma.sync
// m16n8k16, shuffles) emulated from their documented per-lane layouts; wgmma from its accumulator
// layout and the shared-memory descriptor's 128-byte-swizzled tiles, as the kernels use them (the
// model the H200 runs agree with: the same wgmma kernels pass tests/cuda/layers_cuda_test.cpp there).
// Every case runs twice, with the cp.async copies landing at the two ends of the window the
// hardware may use:
// - late, at the wait that covers them, with shared memory filled with NaNs at the start: reading
//   a tile before its wait (or past the kernel's shared memory size, which is checked) shows up as
//   a wrong result;
// - early, as they are issued: refilling a buffer that other warps may still be reading (a missing
//   __syncthreads before the next prefetch) overwrites it under them, which shows up as a wrong
//   result when the threads interleave so, and always as a data race when this file is built with
//   -fsanitize=thread (as a one-off check; the CI build is plain).
// The wgmma products run at the same two ends of their window: in the late runs at the
// wgmma.wait_group that covers them (reading their shared-memory tiles and register operands then,
// and adding to the accumulator as it is then), in the early runs at issue. A kernel that reads an
// accumulator before its wait, or rewrites an operand or a tile under a product in flight, gets a
// wrong result in the late runs.
// The results are compared with a
// double-precision attention on the same BF16 operands: the kernels' indexing, masking,
// pipelining and GQA/padding handling are tested here; the numerics again on the device
// (tests/cuda/layers_cuda_test.cpp).
//
// Tolerances: the kernels round P and dS to BF16 (2^-9 relative) and accumulate in FP32; errors
// are a few 1e-3 of the output's scale (as tests/model/attention_bf16_emulation_test.cpp finds
// for the same roundings), an indexing error gives errors of order 1: max normwise error 3e-2.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "nibble/nn/cuda/attention_flash.cuh"
#include "cuda_emulation/amax_reference.h"
#include "cuda_emulation/emulated_atomics.h"
#include "cuda_emulation/emulated_grid.h"
#include "test_seed.h"

// ---------------------------------------------------------------- the emulated device

namespace nibble::nn::cuda::detail {
namespace {
// The kernels' `extern __shared__ unsigned char smem[]` is this array.
alignas(1024) unsigned char smem[256 * 1024];
}  // namespace
}  // namespace nibble::nn::cuda::detail

namespace emu {

unsigned char (&shared)[sizeof(nibble::nn::cuda::detail::smem)] = nibble::nn::cuda::detail::smem;

constexpr int kThreads = 128;     // the mma.sync kernels' block size
constexpr int kMaxThreads = 256;  // the wgmma kernels' (attention_flash_sm90.cu)
struct Block {
  explicit Block(int threads) : sync(threads) {}
  std::barrier<> sync;
  std::barrier<> warp_sync[kMaxThreads / 32] = {std::barrier<>{32}, std::barrier<>{32}, std::barrier<>{32},
                                                std::barrier<>{32}, std::barrier<>{32}, std::barrier<>{32},
                                                std::barrier<>{32}, std::barrier<>{32}};
  uint32_t words[kMaxThreads][6];  // each lane's operands of the current warp instruction
};
Block* block = nullptr;
uint3 block_dim{kThreads, 1, 1};  // the launch's threads
size_t shared_limit = 0;  // the launch's dynamic shared memory
enum class Landing { kLate, kEarly };  // when cp.async copies land (see the top of the file)
Landing landing = Landing::kLate;
std::atomic<bool> shared_overrun{false};     // set by any thread; reset by each test case
std::atomic<bool> misaligned_global{false};  // a cp.async source not 16-byte aligned
std::atomic<bool> wgmma_unfinished{false};   // a wgmma product never committed, or never waited for

int lane() { return static_cast<int>(thread_idx.x & 31); }
int warp() { return static_cast<int>(thread_idx.x >> 5); }
void warp_sync() { block->warp_sync[warp()].arrive_and_wait(); }
void check_shared(uint32_t offset, uint32_t bytes) {
  if (offset + bytes > shared_limit) shared_overrun = true;
}

// cp.async: this thread's pending copies, in groups; a wait performs the covered groups.
struct Copy {
  void* dst;
  const void* src;
};
thread_local std::vector<std::vector<Copy>> groups;
thread_local std::vector<Copy> open_group;
// wgmma: this thread's share of the products issued and not yet waited for, in groups.
thread_local std::vector<std::vector<std::function<void()>>> mma_groups;
thread_local std::vector<std::function<void()>> mma_open;

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__
#undef __align__
#define __align__(n)
#define __syncthreads() (emu::block->sync.arrive_and_wait())

#define __syncwarp() (emu::warp_sync())

namespace emu {
// Each lane of the warp publishes a word; read(the warp's 32 words) gives this lane's result. For
// the warp-wide instructions below.
template <typename Read>
auto exchange_in_warp(uint32_t mine, Read read) {
  block->words[thread_idx.x][0] = mine;
  warp_sync();
  const auto r = read(&block->words[thread_idx.x & ~31u]);
  warp_sync();
  return r;
}
}  // namespace emu

inline int __any_sync(unsigned, int predicate) {
  return emu::exchange_in_warp(predicate != 0, [](const uint32_t(*warp)[6]) {
    int any = 0;
    for (int l = 0; l < 32; ++l) any |= static_cast<int>(warp[l][0]);
    return any;
  });
}
inline int __shfl_sync(unsigned, int v, int src_lane) {
  return emu::exchange_in_warp(static_cast<uint32_t>(v),
                               [&](const uint32_t(*warp)[6]) { return static_cast<int>(warp[src_lane & 31][0]); });
}
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return emu::exchange_in_warp(bits, [&](const uint32_t(*warp)[6]) {
    float r;
    std::memcpy(&r, &warp[emu::lane() ^ mask][0], 4);
    return r;
  });
}

// amax_device.cuh's block maximum (compiled with the attention's WarpAmax, not used by it).
inline uint32_t __reduce_max_sync(unsigned, uint32_t v) {
  return emu::exchange_in_warp(v, [](const uint32_t(*warp)[6]) {
    uint32_t m = 0;
    for (int l = 0; l < 32; ++l) m = std::max(m, warp[l][0]);
    return m;
  });
}

namespace nibble::nn::cuda::detail {
namespace {

uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::shared);
}
void cp_async16(void* dst, const void* src) {
  emu::check_shared(smem_u32(dst), 16);
  if (smem_u32(dst) % 16 != 0) emu::shared_overrun = true;
  // cp.async's 16-byte copies need a 16-byte aligned global source as well (the test's vectors are
  // 16-byte aligned, as cudaMalloc's are, so a misaligned source is the kernel's offset).
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::misaligned_global = true;
  if (emu::landing == emu::Landing::kLate) {
    emu::open_group.push_back({dst, src});
  } else if (smem_u32(dst) + 16 <= emu::shared_limit) {
    std::memcpy(dst, src, 16);
  }
}
void cp_async_commit() {
  emu::groups.push_back(std::move(emu::open_group));
  emu::open_group.clear();
}
void cp_async_wait_one() {
  while (emu::groups.size() > 1) {
    for (const auto& c : emu::groups.front())
      if (smem_u32(c.dst) + 16 <= emu::shared_limit) std::memcpy(c.dst, c.src, 16);
    emu::groups.erase(emu::groups.begin());
  }
}

uint16_t shared_u16(uint32_t offset) {
  emu::check_shared(offset, 2);
  uint16_t v;
  std::memcpy(&v, emu::shared + (offset < sizeof(emu::shared) - 2 ? offset : 0), 2);
  return v;
}
// ldmatrix .x4: matrix i's row addresses come from lanes 8i..8i+7; without .trans lane l gets
// row l/4, elements 2(l%4), 2(l%4)+1 of matrix i; with .trans, rows 2(l%4) and 2(l%4)+1 of column l/4.
void ldsm(uint32_t (&r)[4], uint32_t addr, bool trans) {
  const int lane = emu::lane();
  emu::block->words[emu::thread_idx.x][0] = addr;
  emu::warp_sync();
  const uint32_t* base = &emu::block->words[emu::thread_idx.x & ~31u][0];
  const auto row_addr = [&](int i) {
    const uint32_t a = base[6 * i];
    if (a % 16 != 0) emu::shared_overrun = true;
    return a;
  };
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t a = row_addr(8 * i + lane / 4) + 4 * (lane % 4);
      lo = shared_u16(a), hi = shared_u16(a + 2);
    } else {
      lo = shared_u16(row_addr(8 * i + 2 * (lane % 4)) + 2 * (lane / 4));
      hi = shared_u16(row_addr(8 * i + 2 * (lane % 4) + 1) + 2 * (lane / 4));
    }
    r[i] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  emu::warp_sync();
}
void ldsm_x4(uint32_t (&r)[4], uint32_t addr) { ldsm(r, addr, false); }
void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldsm(r, addr, true); }

float bf16_bits(uint32_t half) {
  const uint32_t bits = half << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// mma.sync m16n8k16 (lane l = 4g + t): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..),
// a3 (g+8, 2t+8..); b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); c0,c1 (g, 2t..), c2,c3 (g+8, 2t..).
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t* mine = emu::block->words[emu::thread_idx.x];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0, mine[5] = b1;
  emu::warp_sync();
  const uint32_t(*w)[6] = &emu::block->words[emu::thread_idx.x & ~31u];
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = bf16_bits(w[l][i] & 0xffff);
      A[rows[i]][cols[i] + 1] = bf16_bits(w[l][i] >> 16);
    }
    B[2 * t][g] = bf16_bits(w[l][4] & 0xffff), B[2 * t + 1][g] = bf16_bits(w[l][4] >> 16);
    B[2 * t + 8][g] = bf16_bits(w[l][5] & 0xffff), B[2 * t + 9][g] = bf16_bits(w[l][5] >> 16);
  }
  emu::warp_sync();
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] = sum;
  }
}

// ---- the wgmma kernels' instructions (attention_flash_sm90.cu). Shared-memory addresses are offsets
// into `smem` (1024-byte aligned, as the kernels align their tiles). A product runs at issue (early
// landing) or at the wait that covers it (late landing; see the top of the file).
uint32_t emu_cvta_shared(const void* p) { return smem_u32(p); }
void cp_async16(uint32_t dst, const void* src) { cp_async16(emu::shared + dst, src); }
void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_one();  // all but the (empty) group just committed
  emu::groups.clear();
}
void fence_proxy_async() {}
void wgmma_fence() {}
void wgmma_issue(std::function<void()> product) {
  if (emu::landing == emu::Landing::kLate) {
    emu::mma_open.push_back(std::move(product));
  } else {
    product();
  }
}
void wgmma_commit() {
  emu::mma_groups.push_back(std::move(emu::mma_open));
  emu::mma_open.clear();
}
template <int N>
void wgmma_wait() {
  if (!emu::mma_open.empty()) emu::wgmma_unfinished = true;  // a product issued but not committed
  while (emu::mma_groups.size() > N) {
    for (const auto& product : emu::mma_groups.front()) product();
    emu::mma_groups.erase(emu::mma_groups.begin());
  }
}
void wgmma_wait_all() { wgmma_wait<0>(); }
template <int N>
void fence_registers(float (&)[N]) {}

// One element of a tile that a descriptor describes: 128-byte swizzle (the 16-byte chunk bits 4..6
// of an address XOR its bits 7..9), rows of 128 bytes in groups of 8, groups `stride byte offset`
// apart. K-major: element (row, k) of the M or N rows; MN-major: element (k, n), the rows along the
// reduction, n < 64 (one 128-byte row; wider tiles would use the leading byte offset).
float described_bf16(uint64_t desc, int row, int col) {
  if (desc >> 62 != 1 || col >= 64) emu::shared_overrun = true;  // not a layout these kernels use
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const uint32_t addr = start + static_cast<uint32_t>(row / 8) * stride + static_cast<uint32_t>(row % 8) * 128 + 2 * col;
  return bf16_bits(shared_u16(addr ^ (((addr >> 7) & 7) << 4)));
}
// wgmma m64n64k16 for the warpgroup: this thread's accumulator (warp w of the warpgroup: rows
// 16w + g and 16w + g + 8, columns 8j + 2t and 8j + 2t + 1 in d[4j..4j+3]).
template <typename A, typename B>
void wgmma_m64n64k16(float (&d)[32], bool accumulate, A a, B b) {
  const int w = static_cast<int>((emu::thread_idx.x >> 5) & 3), g = emu::lane() / 4, t = emu::lane() % 4;
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
      float sum = accumulate ? d[4 * j + e] : 0.0f;
      for (int k = 0; k < 16; ++k) sum += a(row, k) * b(k, col);
      d[4 * j + e] = sum;
    }
}
void wgmma_ss_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  wgmma_issue([&d, desc_a, desc_b, accumulate] {
    wgmma_m64n64k16(d, accumulate != 0, [&](int row, int k) { return described_bf16(desc_a, row, k); },
                    [&](int k, int col) { return described_bf16(desc_b, col, k); });
  });
}
// A from registers: the rows of this thread's quad, in the mma.sync A layout (see mma above). The
// registers are read when the product runs (the hardware may read them until the wait).
void wgmma_rs_m64n64k16_bt(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  wgmma_issue([&d, &a, desc_b] {
    uint32_t* mine = emu::block->words[emu::thread_idx.x];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    emu::warp_sync();
    const int w = static_cast<int>((emu::thread_idx.x >> 5) & 3), g = emu::lane() / 4;
    float rows[2][16];  // rows g and g + 8 of the warp's 16
    for (int t = 0; t < 4; ++t) {
      const uint32_t* q = emu::block->words[(emu::thread_idx.x & ~31u) + 4 * g + t];
      const int r[4] = {0, 1, 0, 1}, c[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int i = 0; i < 4; ++i) {
        rows[r[i]][c[i]] = bf16_bits(q[i] & 0xffff);
        rows[r[i]][c[i] + 1] = bf16_bits(q[i] >> 16);
      }
    }
    emu::warp_sync();
    wgmma_m64n64k16(d, true, [&](int row, int k) { return rows[(row - 16 * w - g) / 8][k]; },
                    [&](int k, int col) { return described_bf16(desc_b, k, col); });
  });
}


}  // namespace
}  // namespace nibble::nn::cuda::detail

#define NIBBLE_FLASH_HOST_EMULATION
#include "../../src/nibble/nn/cuda/attention_flash.cu"
#define __cvta_generic_to_shared(p) emu_cvta_shared(p)
#define smem_raw smem
#include "../../src/nibble/nn/cuda/attention_flash_sm90.cu"

namespace emu {

// Runs kernel() as every thread of every block of `grid`, one block after another.
template <typename Kernel>
void launch(dim3 grid, size_t shared_bytes, Kernel kernel, int threads = kThreads) {
  if (shared_bytes > sizeof(shared)) throw std::runtime_error("emulated shared memory too small");
  shared_limit = shared_bytes;
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  run_grid(grid, static_cast<unsigned>(threads), [threads] {
    std::memset(shared, 0xff, sizeof(shared));  // NaNs in BF16 and FP32
    auto b = std::make_unique<Block>(threads);
    block = b.get();
    return b;
  }, [&kernel] {
    groups.clear();
    open_group.clear();
    mma_groups.clear();
    mma_open.clear();
    kernel();
    if (!mma_groups.empty() || !mma_open.empty()) wgmma_unfinished = true;
  });
}

}  // namespace emu

namespace nibble::nn::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;

struct Case {
  int64_t B, T, H, KV, hd;
};

// The packed views of the test's head-major vectors (q, o, dq: H heads; k, v, dk, dv: KV heads).
BF16Heads heads(const FlashDims& d, const std::vector<bf16>& x, int64_t n) { return packed_heads(x.data(), d, n); }
HeadGrad grad(const FlashDims& d, std::vector<float>& x, int64_t n) { return {packed_heads(x.data(), d, n), {}}; }

// The kernels under test: mma.sync (attention_flash.cu), or wgmma (attention_flash_sm90.cu: HD 64, Tp
// a multiple of its 128-row blocks), which flash_forward and flash_backward take on Hopper.
enum class Kernels { kMmaSync, kWgmma };

// The forward kernel on views of the operands, as flash_forward launches it; out16 and amax (the
// amax of the NVFP4 pass over out16) with the wgmma kernel only.
template <int HD>
void run_forward(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, float* out, bf16* o, float* lse,
                 Kernels kernels, bf16* out16 = nullptr, const nibble::cuda::ProducerAmax& amax = {}) {
  if (kernels == Kernels::kWgmma) {
    emu::launch(dim3(static_cast<unsigned>(d.Tp / kRows), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B)),
                kSmemBytes, [&] { flash_forward_sm90_kernel(d, q, k, v, out, o, lse, out16, amax); }, kBlockThreads);
    return;
  }
  emu::launch(dim3(static_cast<unsigned>(d.Tp / kFlashTile), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B)),
              kForwardSmem<HD>, [&] { flash_forward_kernel<HD>(d, q, k, v, out, o, lse); });
}

// Both backward kernels on views of the operands, as flash_backward launches them; amax and `o`
// (delta computed by the dq kernel, written to `delta`) with the wgmma kernels only.
template <int HD>
void run_backward(const FlashDims& d, BF16Heads q, BF16Heads k, BF16Heads v, BF16Heads dout, const float* lse,
                  float* delta, HeadGrad dq, HeadGrad dk, HeadGrad dv, Kernels kernels = Kernels::kMmaSync,
                  const nibble::cuda::ProducerAmax& amax = {}, BF16Heads o = {}) {
  if (kernels == Kernels::kWgmma) {  // attention_flash_sm90.cu: dq 128 queries, 256 threads; dk/dv 64 keys a block, 128
    const auto blocks = static_cast<unsigned>(d.Tp / kRows), batch = static_cast<unsigned>(d.B);
    emu::launch(dim3(blocks, static_cast<unsigned>(d.H), batch), kDqSmemBytes,
                [&] { flash_dq_sm90_kernel(d, q, k, v, dout, o, lse, delta, dq, amax); }, kBlockThreads);
    emu::launch(dim3(static_cast<unsigned>(d.Tp / kKeys), static_cast<unsigned>(d.KV), batch), kDkdvSmemBytes,
                [&] { flash_dkdv_sm90_kernel(d, q, k, v, dout, lse, delta, dk, dv, amax); }, kDkdvThreads);
    return;
  }
  ASSERT_EQ(o.base, nullptr) << "the mma.sync kernels read delta";
  const auto tiles = static_cast<unsigned>(d.Tp / kFlashTile), batch = static_cast<unsigned>(d.B);
  emu::launch(dim3(tiles, static_cast<unsigned>(d.KV), batch), kDkdvSmem<HD>,
              [&] { flash_dkdv_kernel<HD, kDkdvQueries<HD>>(d, q, k, v, dout, lse, delta, dk, dv); });
  emu::launch(dim3(tiles, static_cast<unsigned>(d.H), batch), kDqSmem<HD>,
              [&] { flash_dq_kernel<HD>(d, q, k, v, dout, lse, delta, dq); });
}

// Normwise max relative error max |got - want| / max |want| (NaN when got holds a NaN); prints it.
double compare(const std::vector<float>& got, const std::vector<double>& want, const char* what) {
  double err = 0, scale = 0;
  bool nan = false;
  for (size_t i = 0; i < want.size(); ++i) {
    nan = nan || std::isnan(got[i]);
    err = std::max(err, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  const double rel = nan ? NAN : err / scale;
  std::printf("[ compare  ] %-28s max rel err %.3e\n", what, rel);
  return rel;
}

template <int HD>
void run_landing(const Case& c, std::mt19937_64& rng, Kernels kernels) {
  const int64_t rows = kernels == Kernels::kWgmma ? kRows : kFlashTile;  // Tp's multiple
  const int64_t Tp = (c.T + rows - 1) / rows * rows, group = c.H / c.KV;
  const FlashDims d{c.B, c.T, Tp, c.H, c.KV, c.hd, HD, 1.0f / std::sqrt(static_cast<float>(c.hd))};
  std::normal_distribution<float> dist(0.0f, 1.5f), unit(0.0f, 1.0f);
  // Packed operands as attention_cuda.cu writes them: zeros beyond T and hd.
  const auto packed = [&](int64_t heads, std::normal_distribution<float>& nd) {
    std::vector<bf16> x(static_cast<size_t>(c.B * heads * Tp * HD), __float2bfloat16_rn(0.0f));
    for (int64_t r = 0; r < c.B * heads * Tp; ++r)
      for (int64_t j = 0; j < c.hd; ++j)
        if (r % Tp < c.T) x[r * HD + j] = __float2bfloat16_rn(nd(rng));
    return x;
  };
  const auto q = packed(c.H, dist), k = packed(c.KV, dist), v = packed(c.KV, dist), dout = packed(c.H, unit);
  for (const auto* x : {&q, &k, &v, &dout})  // as cudaMalloc's are: the source check below relies on it
    ASSERT_EQ(reinterpret_cast<uintptr_t>(x->data()) % 16, 0u) << "the host allocator's alignment";
  emu::shared_overrun = false;
  emu::misaligned_global = false;
  emu::wgmma_unfinished = false;
  const auto f = [](const std::vector<bf16>& x, int64_t i) { return static_cast<double>(__bfloat162float(x[i])); };

  // NaN-filled outputs: forward must write lse and o for every row up to Tp (backward reads the
  // padding rows too: their dO is zero, so a NaN there would still reach dk and dv).
  std::vector<float> out(static_cast<size_t>(c.B * c.T * c.H * c.hd), NAN), lse(static_cast<size_t>(c.B * c.H * Tp), NAN);
  std::vector<bf16> o(q.size(), __float2bfloat16_rn(NAN));
  run_forward<HD>(d, heads(d, q, c.H), heads(d, k, c.KV), heads(d, v, c.KV), out.data(), o.data(), lse.data(),
                  kernels);
  std::vector<float> delta(lse.size(), 0.0f);  // as pack_dout_kernel computes it
  ASSERT_EQ(reinterpret_cast<uintptr_t>(lse.data()) % 16, 0u) << "the host allocator's alignment";
  ASSERT_EQ(reinterpret_cast<uintptr_t>(delta.data()) % 16, 0u) << "the host allocator's alignment";
  for (size_t r = 0; r < delta.size(); ++r)
    for (int64_t j = 0; j < HD; ++j) delta[r] += __bfloat162float(dout[r * HD + j]) * __bfloat162float(o[r * HD + j]);
  std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
  run_backward<HD>(d, heads(d, q, c.H), heads(d, k, c.KV), heads(d, v, c.KV), heads(d, dout, c.H), lse.data(),
                   delta.data(), grad(d, dq, c.H), grad(d, dk, c.KV), grad(d, dv, c.KV), kernels);
  EXPECT_FALSE(emu::shared_overrun) << "a shared-memory access beyond the launch's size or misaligned";
  EXPECT_FALSE(emu::misaligned_global) << "a cp.async from a global address not 16-byte aligned";
  EXPECT_FALSE(emu::wgmma_unfinished) << "a wgmma product not committed or not waited for";

  // Reference in double on the same BF16 operands (rows < T; dk, dv summed over the group).
  const double scale = d.scale;
  std::vector<double> out_ref(out.size()), dq_ref, dk_ref(static_cast<size_t>(c.B * c.KV * c.T * c.hd), 0.0),
      dv_ref(dk_ref.size(), 0.0);
  std::vector<float> dq_got, dk_got, dv_got, lse_got;
  std::vector<double> lse_ref;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t qh = (b * c.H + h) * Tp, kh = (b * c.KV + h / group) * Tp;
      std::vector<double> p(static_cast<size_t>(c.T * c.T), 0.0), ds(p.size(), 0.0);
      for (int64_t i = 0; i < c.T; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t x = 0; x < c.hd; ++x) s += f(q, (qh + i) * HD + x) * f(k, (kh + j) * HD + x);
          p[i * c.T + j] = s * scale;
          mx = std::max(mx, s * scale);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(p[i * c.T + j] - mx);
        for (int64_t j = 0; j <= i; ++j) p[i * c.T + j] = std::exp(p[i * c.T + j] - mx) / sum;
        lse_ref.push_back((mx + std::log(sum)) / std::log(2.0));
        lse_got.push_back(lse[qh + i]);
        double dsum = 0;
        std::vector<double> dp(static_cast<size_t>(i + 1));
        for (int64_t x = 0; x < c.hd; ++x) {
          double ov = 0;
          for (int64_t j = 0; j <= i; ++j) ov += p[i * c.T + j] * f(v, (kh + j) * HD + x);
          out_ref[(b * c.T + i) * c.H * c.hd + h * c.hd + x] = ov;
          dsum += ov * f(dout, (qh + i) * HD + x);
        }
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t x = 0; x < c.hd; ++x) s += f(dout, (qh + i) * HD + x) * f(v, (kh + j) * HD + x);
          ds[i * c.T + j] = scale * p[i * c.T + j] * (s - dsum);
        }
      }
      for (int64_t t = 0; t < c.T; ++t)
        for (int64_t x = 0; x < c.hd; ++x) {
          double a = 0, bk = 0, bv = 0;
          for (int64_t j = 0; j <= t; ++j) a += ds[t * c.T + j] * f(k, (kh + j) * HD + x);
          for (int64_t i = t; i < c.T; ++i)
            bk += ds[i * c.T + t] * f(q, (qh + i) * HD + x), bv += p[i * c.T + t] * f(dout, (qh + i) * HD + x);
          dq_ref.push_back(a);
          dq_got.push_back(dq[(qh + t) * HD + x]);
          const size_t kv = static_cast<size_t>(((b * c.KV + h / group) * c.T + t) * c.hd + x);
          dk_ref[kv] += bk;
          dv_ref[kv] += bv;
        }
    }
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t g = 0; g < c.KV; ++g)
      for (int64_t t = 0; t < c.T; ++t)
        for (int64_t x = 0; x < c.hd; ++x) {
          dk_got.push_back(dk[((b * c.KV + g) * Tp + t) * HD + x]);
          dv_got.push_back(dv[((b * c.KV + g) * Tp + t) * HD + x]);
        }
  EXPECT_LE(compare(out, out_ref, "flash forward out"), 3e-2);
  EXPECT_LE(compare(lse_got, lse_ref, "flash forward lse (base 2)"), 1e-5);
  if (c.T > 1) {
    EXPECT_LE(compare(dq_got, dq_ref, "flash dq"), 3e-2);
    EXPECT_LE(compare(dk_got, dk_ref, "flash dk"), 3e-2);
  } else {  // each row attends only to itself: dS = P (dP - D) = 0 up to FP32 rounding
    double dv_scale = 0, worst = 0;
    for (double x : dv_ref) dv_scale = std::max(dv_scale, std::fabs(x));
    for (float x : dq_got) worst = std::max(worst, std::fabs(static_cast<double>(x)));
    for (float x : dk_got) worst = std::max(worst, std::fabs(static_cast<double>(x)));
    std::printf("[ compare  ] seq 1: max |dq|, |dk| = %.3e of max |dv| (want <= 1e-5)\n", worst / dv_scale);
    EXPECT_LE(worst, 1e-5 * dv_scale);
  }
  EXPECT_LE(compare(dv_got, dv_ref, "flash dv"), 3e-2);
  // The padding of o: zeros beyond hd (v's zero columns), finite everywhere (backward reads it).
  for (size_t i = 0; i < o.size(); ++i) {
    const float x = __bfloat162float(o[i]);
    ASSERT_TRUE(std::isfinite(x) && (static_cast<int64_t>(i % HD) < c.hd || x == 0.0f)) << "o[" << i << "] = " << x;
  }
}

// Both landings of the cp.async copies (see the top of the file), on fresh inputs each; the
// ThreadSanitizer build (tests/CMakeLists.txt) only the early one, which is where races show.
template <int HD>
void run_case(const Case& c, std::mt19937_64& rng, Kernels kernels = Kernels::kMmaSync) {
#ifdef NIBBLE_FLASH_EMULATION_TSAN
  for (const emu::Landing l : {emu::Landing::kEarly}) {
#else
  for (const emu::Landing l : {emu::Landing::kLate, emu::Landing::kEarly}) {
#endif
    const std::string name = l == emu::Landing::kLate ? "late (at the wait)" : "early (at issue)";
    SCOPED_TRACE("cp.async copies land " + name);
    std::printf("[ landing  ] cp.async copies land %s\n", name.c_str());
    emu::landing = l;
    run_landing<HD>(c, rng, kernels);
  }
  emu::landing = emu::Landing::kLate;
}

TEST(FlashAttentionEmulation, Hd64GqaSeqAcrossTiles) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({1, 130, 2, 1, 64}, rng);  // three tiles, the last of two rows; two heads on one KV head
}
// The Hopper kernels (wgmma), forward and backward.
TEST(FlashAttentionEmulation, WgmmaGqaPaddedRows) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({1, 200, 2, 1, 64}, rng, Kernels::kWgmma);  // two query blocks, the last padded from 200
}
TEST(FlashAttentionEmulation, WgmmaPaddedHeadBatch2) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({2, 128, 4, 2, 48}, rng, Kernels::kWgmma);  // hd 48 in 64 columns, groups of 2
}
TEST(FlashAttentionEmulation, WgmmaGroupsPaddedRows) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({1, 200, 4, 2, 64}, rng, Kernels::kWgmma);  // groups of 2, the last key block padded from 200
}
TEST(FlashAttentionEmulation, WgmmaSeqOne) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({1, 1, 2, 2, 64}, rng, Kernels::kWgmma);
}
TEST(FlashAttentionEmulation, Hd128Padded) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<128>({1, 70, 2, 1, 100}, rng);  // hd 100 padded to 128, dk/dv steps of 32 queries
}
TEST(FlashAttentionEmulation, SmallHeadSeqOneBatch2) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({2, 1, 3, 3, 20}, rng);
}
// The cases above have one KV head (every head maps to 0) or one head per KV head (h / group ==
// h % KV == h): a wrong head -> KV head mapping, or a wrong head in dk/dv's loop over the group,
// passes them. Here 4 heads share 2 KV heads (0, 0, 1, 1), in 2 batches of 2 tiles.
TEST(FlashAttentionEmulation, GqaTwoKvHeadsBatch2) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<64>({2, 100, 4, 2, 48}, rng);
}
TEST(FlashAttentionEmulation, Hd128GqaTwoKvHeads) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case<128>({1, 90, 4, 2, 128}, rng);  // dk/dv in steps of 32 queries over 2 heads each
}

// The forward kernel's BF16 output (out16: a linear layer's BF16 input, written instead of out) is
// the nearest-even rounding of the FP32 output, bit for bit, with nothing written outside the
// B*T x H*hd elements: at an aligned pointer (an even hd stores pairs of columns in 4-byte words)
// and one element past it, as a pointer into a larger buffer may be (2-byte stores; the device test
// Bf16Outputs.AttentionTakesPointersIntoLargerBuffers shows the paired stores are not taken there);
// o the same bits either way.
template <int HD>
void check_out16(const Case& c, std::mt19937_64& rng, Kernels kernels = Kernels::kMmaSync) {
  const int64_t tile = kernels == Kernels::kWgmma ? kRows : kFlashTile;  // Tp's multiple
  const int64_t Tp = (c.T + tile - 1) / tile * tile;
  const FlashDims d{c.B, c.T, Tp, c.H, c.KV, c.hd, HD, 1.0f / std::sqrt(static_cast<float>(c.hd))};
  std::normal_distribution<float> dist(0.0f, 1.5f);
  const auto packed = [&](int64_t heads) {
    std::vector<bf16> x(static_cast<size_t>(c.B * heads * Tp * HD), __float2bfloat16_rn(0.0f));
    for (int64_t r = 0; r < c.B * heads * Tp; ++r)
      for (int64_t j = 0; j < c.hd; ++j)
        if (r % Tp < c.T) x[r * HD + j] = __float2bfloat16_rn(dist(rng));
    return x;
  };
  const auto q = packed(c.H), k = packed(c.KV), v = packed(c.KV);
  const size_t n = static_cast<size_t>(c.B * c.T * c.H * c.hd);
  std::vector<float> out(n, NAN), lse(static_cast<size_t>(c.B * c.H * Tp), NAN);
  std::vector<bf16> o(q.size()), o_first;
  const dim3 grid(static_cast<unsigned>(Tp / tile), static_cast<unsigned>(c.H), static_cast<unsigned>(c.B));
  const auto forward = [&](float* out_ptr, bf16* out16) {
    if (kernels == Kernels::kWgmma) {
      emu::launch(grid, kSmemBytes, [&] {
        flash_forward_sm90_kernel(d, heads(d, q, c.H), heads(d, k, c.KV), heads(d, v, c.KV), out_ptr, o.data(),
                                  lse.data(), out16, {});
      }, kBlockThreads);
    } else {
      emu::launch(grid, kForwardSmem<HD>, [&] {
        flash_forward_kernel<HD>(d, heads(d, q, c.H), heads(d, k, c.KV), heads(d, v, c.KV), out_ptr, o.data(),
                                 lse.data(), out16);
      });
    }
  };
  forward(out.data(), nullptr);
  o_first = o;
  const auto bits = [](bf16 x) { return static_cast<__nv_bfloat16_raw>(x).x; };
  constexpr uint16_t kUnwritten = 0x7FC1;  // a NaN the kernel never writes
  __nv_bfloat16_raw unwritten;
  unwritten.x = kUnwritten;
  for (const size_t offset : {size_t{0}, size_t{1}}) {
    SCOPED_TRACE("out16 at element offset " + std::to_string(offset));
    std::vector<bf16> buffer(n + 2, bf16(unwritten));
    bf16* out16 = buffer.data() + offset;
    ASSERT_EQ(reinterpret_cast<uintptr_t>(buffer.data()) % 16, 0u) << "the host allocator's alignment";
    forward(nullptr, out16);
    EXPECT_EQ(std::memcmp(o.data(), o_first.data(), o.size() * sizeof(bf16)), 0) << "o differs with out16";
    size_t wrong = 0, first = n;
    for (size_t i = 0; i < n; ++i)
      if (bits(out16[i]) != bits(__float2bfloat16_rn(out[i])) && wrong++ == 0) first = i;
    EXPECT_EQ(wrong, 0u) << "first at element " << first;
    for (size_t i = 0; i < buffer.size(); ++i) {
      if (i < offset || i >= offset + n) {
        EXPECT_EQ(bits(buffer[i]), kUnwritten) << "buffer element " << i;
      }
    }
  }
}

TEST(FlashAttentionEmulation, Bf16OutputIsTheRoundedFp32Output) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  check_out16<64>({2, 70, 2, 1, 48}, rng);    // even hd: pairs of columns
  check_out16<64>({1, 70, 3, 3, 15}, rng);    // odd hd: single columns
  check_out16<128>({1, 65, 2, 1, 100}, rng);  // padded to 128
  // The Hopper forward: whole 128-byte rows through shared memory where hd is 64 and out16 16-byte
  // aligned (offset 0 here), pairs or single columns otherwise.
  check_out16<64>({2, 200, 2, 1, 64}, rng, Kernels::kWgmma);
  check_out16<64>({2, 70, 2, 1, 48}, rng, Kernels::kWgmma);
  check_out16<64>({1, 70, 3, 3, 15}, rng, Kernels::kWgmma);
}

// The kernels reading q, k, v and dO in place from the rows of qkv [B*T x (H + 2 KV) hd] and dO
// [B*T x H hd], and writing dq, dk, dv in BF16 in place into d_qkv (as AttentionCoreCuda does where
// nothing is padded), against the packed route on the same values: the same lse, o and output bits,
// and d_qkv the nearest-even rounding of the packed FP32 gradients.
template <int HD>
void check_in_place(const Case& c, std::mt19937_64& rng, Kernels kernels = Kernels::kMmaSync) {
  ASSERT_EQ(c.hd, HD);
  ASSERT_EQ(c.T % (kernels == Kernels::kWgmma ? kRows : kFlashTile), 0);
  const FlashDims d{c.B, c.T, c.T, c.H, c.KV, c.hd, HD, 1.0f / std::sqrt(static_cast<float>(c.hd))};
  const int64_t width = (c.H + 2 * c.KV) * c.hd, rows = c.B * c.T;
  std::normal_distribution<float> dist(0.0f, 1.5f);
  std::vector<bf16> qkv(static_cast<size_t>(rows * width)), dout_rows(static_cast<size_t>(rows * c.H * c.hd));
  for (auto& x : qkv) x = __float2bfloat16_rn(dist(rng));
  for (auto& x : dout_rows) x = __float2bfloat16_rn(dist(rng));
  // The packed copies of the same values.
  const auto pack = [&](const std::vector<bf16>& m, int64_t m_width, int64_t col0, int64_t n) {
    std::vector<bf16> x(static_cast<size_t>(c.B * n * c.T * HD));
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < n; ++h)
        for (int64_t t = 0; t < c.T; ++t)
          for (int64_t j = 0; j < HD; ++j)
            x[((b * n + h) * c.T + t) * HD + j] = m[(b * c.T + t) * m_width + col0 + h * HD + j];
    return x;
  };
  const auto q = pack(qkv, width, 0, c.H), k = pack(qkv, width, c.H * HD, c.KV), v = pack(qkv, width, (c.H + c.KV) * HD, c.KV);
  const auto dout = pack(dout_rows, c.H * HD, 0, c.H);
  const BF16Heads q_in = heads_in_rows<const bf16>(qkv.data(), d, width, 0);
  const BF16Heads k_in = heads_in_rows<const bf16>(qkv.data(), d, width, c.H * HD);
  const BF16Heads v_in = heads_in_rows<const bf16>(qkv.data(), d, width, (c.H + c.KV) * HD);
  const BF16Heads dout_in = heads_in_rows<const bf16>(dout_rows.data(), d, c.H * HD, 0);
  EXPECT_NO_THROW(check_flash_views(d, {q_in, k_in, v_in, dout_in}));
  const auto bits = [](bf16 x) { return static_cast<__nv_bfloat16_raw>(x).x; };
  emu::misaligned_global = false;

  const size_t n_out = static_cast<size_t>(rows * c.H * c.hd), n_lse = static_cast<size_t>(c.B * c.H * c.T);
  std::vector<float> out_p(n_out), out_i(n_out), lse_p(n_lse), lse_i(n_lse);
  std::vector<bf16> o_p(q.size()), o_i(q.size());
  run_forward<HD>(d, heads(d, q, c.H), heads(d, k, c.KV), heads(d, v, c.KV), out_p.data(), o_p.data(), lse_p.data(),
                  kernels);
  run_forward<HD>(d, q_in, k_in, v_in, out_i.data(), o_i.data(), lse_i.data(), kernels);
  EXPECT_EQ(std::memcmp(out_p.data(), out_i.data(), n_out * 4), 0) << "out";
  EXPECT_EQ(std::memcmp(lse_p.data(), lse_i.data(), n_lse * 4), 0) << "lse";
  EXPECT_EQ(std::memcmp(o_p.data(), o_i.data(), o_p.size() * 2), 0) << "o";

  std::vector<float> delta(n_lse, 0.0f);
  for (size_t r = 0; r < delta.size(); ++r)
    for (int64_t j = 0; j < HD; ++j) delta[r] += __bfloat162float(dout[r * HD + j]) * __bfloat162float(o_p[r * HD + j]);
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<bf16> dqkv(qkv.size(), __float2bfloat16_rn(NAN));
  HeadGrad dq_in, dk_in, dv_in;
  dq_in.b16 = heads_in_rows(dqkv.data(), d, width, 0);
  dk_in.b16 = heads_in_rows(dqkv.data(), d, width, c.H * HD);
  dv_in.b16 = heads_in_rows(dqkv.data(), d, width, (c.H + c.KV) * HD);
  EXPECT_NO_THROW(check_flash_views(d, {}, {dq_in, dk_in, dv_in}));
  run_backward<HD>(d, heads(d, q, c.H), heads(d, k, c.KV), heads(d, v, c.KV), heads(d, dout, c.H), lse_p.data(),
                   delta.data(), grad(d, dq, c.H), grad(d, dk, c.KV), grad(d, dv, c.KV), kernels);
  run_backward<HD>(d, q_in, k_in, v_in, dout_in, lse_i.data(), delta.data(), dq_in, dk_in, dv_in, kernels);
  EXPECT_FALSE(emu::misaligned_global) << "a cp.async from a global address not 16-byte aligned";
  size_t wrong = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t hh = 0; hh < c.H + 2 * c.KV; ++hh)
        for (int64_t j = 0; j < HD; ++j) {
          const std::vector<float>& g = hh < c.H ? dq : hh < c.H + c.KV ? dk : dv;
          const int64_t h = hh < c.H ? hh : hh < c.H + c.KV ? hh - c.H : hh - c.H - c.KV;
          const int64_t n = hh < c.H ? c.H : c.KV;
          const float want = g[((b * n + h) * c.T + t) * HD + j];
          const bf16 got = dqkv[(b * c.T + t) * width + hh * HD + j];
          if (bits(got) != bits(__float2bfloat16_rn(want)) && wrong++ < 3)
            ADD_FAILURE() << "d_qkv row " << b * c.T + t << " column " << hh * HD + j << ": " << __bfloat162float(got)
                          << ", expected " << want;
        }
  EXPECT_EQ(wrong, 0u);
  if (kernels != Kernels::kWgmma) return;

  // The Hopper dq kernel computing delta itself from dO in place and the packed o (as AttentionCoreCuda
  // has it do where nothing is padded): delta the bits of pack_dout_kernel's order (each 8 columns'
  // products in an FMA chain, then the 8 sums pairwise), and d_qkv the bits of the run given that delta.
  std::vector<float> delta_ref(n_lse);
  for (size_t r = 0; r < n_lse; ++r) {
    float part[8];
    for (int l = 0; l < 8; ++l) {
      part[l] = 0.0f;
      for (int64_t j = 8 * l; j < 8 * l + 8; ++j)
        part[l] = std::fma(__bfloat162float(dout[r * HD + j]), __bfloat162float(o_p[r * HD + j]), part[l]);
    }
    delta_ref[r] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  }
  std::vector<bf16> dqkv_given(qkv.size(), __float2bfloat16_rn(NAN)), dqkv_computed(qkv.size(), __float2bfloat16_rn(NAN));
  std::vector<float> delta_computed(n_lse, NAN);
  const auto grads = [&](std::vector<bf16>& m) {
    std::array<HeadGrad, 3> g;
    g[0].b16 = heads_in_rows(m.data(), d, width, 0);
    g[1].b16 = heads_in_rows(m.data(), d, width, c.H * HD);
    g[2].b16 = heads_in_rows(m.data(), d, width, (c.H + c.KV) * HD);
    return g;
  };
  const auto given = grads(dqkv_given), computed = grads(dqkv_computed);
  run_backward<HD>(d, q_in, k_in, v_in, dout_in, lse_i.data(), delta_ref.data(), given[0], given[1], given[2], kernels);
  run_backward<HD>(d, q_in, k_in, v_in, dout_in, lse_i.data(), delta_computed.data(), computed[0], computed[1],
                   computed[2], kernels, {}, heads(d, o_p, c.H));
  EXPECT_EQ(std::memcmp(delta_computed.data(), delta_ref.data(), n_lse * sizeof(float)), 0) << "delta";
  EXPECT_EQ(std::memcmp(dqkv_computed.data(), dqkv_given.data(), dqkv_given.size() * sizeof(bf16)), 0) << "d_qkv";
}

TEST(FlashAttentionEmulation, InPlaceHeadsGiveThePackedBits) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  check_in_place<64>({2, 128, 4, 2, 64}, rng);  // GQA: dk, dv summed over two heads each
  check_in_place<128>({1, 64, 2, 2, 128}, rng);
  check_in_place<64>({2, 256, 4, 2, 64}, rng, Kernels::kWgmma);
}

// The Hopper kernels computing the amax of the fused NVFP4 pass over what they write in BF16
// (ProducerAmax; attention_flash_util.cuh's WarpAmax): the forward's out16 [B*T x H hd] and the
// backward's d_qkv [B*T x (H + 2 KV) hd] in place, against the CPU reference's two words over the
// values written (with and without the RHT, random signs), the next slot zeroed. The forward also
// at T = 208 in 256 padded rows: the warps beyond T add nothing.
TEST(FlashAttentionEmulation, WgmmaComputesTheNvfp4PassAmax) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  constexpr int64_t B = 2, H = 2, KV = 1, hd = 64, width = (H + 2 * KV) * hd;
  std::normal_distribution<float> dist(0.0f, 1.5f);
  const auto bits = [](bf16 x) { return static_cast<__nv_bfloat16_raw>(x).x; };
  const auto random_bf16 = [&](int64_t n) {
    std::vector<bf16> x(static_cast<size_t>(n));
    for (auto& e : x) e = __float2bfloat16_rn(dist(rng));
    return x;
  };
  for (const bool rht : {false, true}) {
    SCOPED_TRACE(rht ? "RHT" : "no RHT");
    std::vector<uint32_t> slots(4);
    nibble::cuda::ProducerAmax amax;
    amax.col_rht = rht;
    amax.rht_signs = RhtSigns{static_cast<uint16_t>(rng())};
    // The words the kernels left against the reference over m [rows x cols].
    const auto check_words = [&](const std::vector<bf16>& m, int64_t rows, int64_t cols, const char* what) {
      const auto at = [&](int64_t r, int64_t c) { return __bfloat162float(m[static_cast<size_t>(r * cols + c)]); };
      const auto [row_word, col_word] = nibble::test::amax_words(rows, cols, at, rht, amax.rht_signs);
      EXPECT_EQ(slots[0], row_word) << what << ": rowwise amax";
      EXPECT_EQ(slots[1], col_word) << what << ": columnwise amax";
      EXPECT_EQ(slots[2], 0u) << what << ": the next slot zeroed";
      EXPECT_EQ(slots[3], 0u) << what << ": the next slot zeroed";
    };
    const auto fresh_slots = [&] {
      slots = {0, 0, 0xDEADBEEFu, 0xDEADBEEFu};
      amax.slots = {slots.data(), slots.data() + 2};
    };
    // Forward from packed heads, T = 208 of Tp = 256.
    {
      const FlashDims d{B, 208, 256, H, KV, hd, 64, 0.125f};
      std::vector<bf16> q(static_cast<size_t>(B * H * d.Tp * 64)), k(static_cast<size_t>(B * KV * d.Tp * 64));
      for (auto* x : {&q, &k}) {
        *x = random_bf16(static_cast<int64_t>(x->size()));
        for (size_t i = 0; i < x->size(); ++i)
          if (static_cast<int64_t>(i / 64) % d.Tp >= d.T) (*x)[i] = __float2bfloat16_rn(0.0f);
      }
      // Values of 200 in the padding keys, which only the padding queries see: the warps beyond T
      // would find the largest outputs there.
      std::vector<bf16> v = k;
      for (size_t i = 0; i < v.size(); ++i)
        if (static_cast<int64_t>(i / 64) % d.Tp >= d.T) v[i] = __float2bfloat16_rn(200.0f);
      std::vector<bf16> o(q.size()), out16(static_cast<size_t>(B * d.T * H * hd));
      std::vector<float> lse(static_cast<size_t>(B * H * d.Tp));
      fresh_slots();
      run_forward<64>(d, heads(d, q, H), heads(d, k, KV), heads(d, v, KV), nullptr, o.data(), lse.data(),
                      Kernels::kWgmma, out16.data(), amax);
      check_words(out16, B * d.T, H * hd, "forward, T 208");
    }
    // Forward and backward in place in qkv's and d_qkv's rows, T = Tp = 128.
    const FlashDims d{B, 128, 128, H, KV, hd, 64, 0.125f};
    const std::vector<bf16> qkv = random_bf16(B * d.T * width), dout = random_bf16(B * d.T * H * hd);
    const BF16Heads q = heads_in_rows<const bf16>(qkv.data(), d, width, 0);
    const BF16Heads k = heads_in_rows<const bf16>(qkv.data(), d, width, H * hd);
    const BF16Heads v = heads_in_rows<const bf16>(qkv.data(), d, width, (H + KV) * hd);
    std::vector<bf16> o(static_cast<size_t>(B * H * d.Tp * 64)), out16(dout.size());
    std::vector<float> lse(static_cast<size_t>(B * H * d.Tp)), delta(lse.size(), 0.0f);
    fresh_slots();
    run_forward<64>(d, q, k, v, nullptr, o.data(), lse.data(), Kernels::kWgmma, out16.data(), amax);
    check_words(out16, B * d.T, H * hd, "forward in place");
    for (int64_t b = 0; b < B; ++b)  // delta = rowsum(dO o), dO in out16's layout, o packed
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < d.T; ++t)
          for (int64_t j = 0; j < hd; ++j)
            delta[(b * H + h) * d.Tp + t] += __bfloat162float(dout[(b * d.T + t) * H * hd + h * hd + j]) *
                                             __bfloat162float(o[((b * H + h) * d.Tp + t) * 64 + j]);
    std::vector<bf16> dqkv(qkv.size(), __float2bfloat16_rn(NAN)), dqkv_plain = dqkv;
    const auto grads = [&](std::vector<bf16>& m) {
      HeadGrad g[3];
      for (int i = 0; i < 3; ++i) g[i].b16 = heads_in_rows(m.data(), d, width, (i == 0 ? 0 : i == 1 ? H : H + KV) * hd);
      return std::vector<HeadGrad>{g[0], g[1], g[2]};
    };
    const BF16Heads dout_in = heads_in_rows<const bf16>(dout.data(), d, H * hd, 0);
    const auto g = grads(dqkv), gp = grads(dqkv_plain);
    fresh_slots();
    run_backward<64>(d, q, k, v, dout_in, lse.data(), delta.data(), g[0], g[1], g[2], Kernels::kWgmma, amax);
    run_backward<64>(d, q, k, v, dout_in, lse.data(), delta.data(), gp[0], gp[1], gp[2], Kernels::kWgmma);
    size_t differ = 0;
    for (size_t i = 0; i < dqkv.size(); ++i) differ += bits(dqkv[i]) != bits(dqkv_plain[i]);
    EXPECT_EQ(differ, 0u) << "d_qkv differs with the amax";
    check_words(dqkv, B * d.T, width, "backward in place");
  }
}

// The host-side checks of flash_forward / flash_backward (no kernel runs).
TEST(FlashAttentionDims, RejectsWhatTheKernelsDoNotHandle) {
  const FlashDims ok{2, 100, 128, 4, 2, 48, 64, 0.125f};
  EXPECT_NO_THROW(check_flash_dims(ok));
  const auto rejects = [](FlashDims d, const char* what) {
    try {
      check_flash_dims(d);
      ADD_FAILURE() << what << ": not rejected";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("fused attention"), std::string::npos) << e.what();
    }
  };
  const auto with = [&](auto field, int64_t value) {
    FlashDims d = ok;
    d.*field = value;
    return d;
  };
  rejects(with(&FlashDims::HD, 96), "HD 96");
  rejects(with(&FlashDims::hd, 65), "hd above HD");
  rejects(with(&FlashDims::Tp, 100), "Tp not a multiple of 64");
  rejects(with(&FlashDims::T, 129), "T above Tp");
  rejects(with(&FlashDims::KV, 3), "H not a multiple of KV");
  rejects(with(&FlashDims::B, 65536), "batch beyond gridDim.z");
  rejects(with(&FlashDims::H, 2 * 65536), "heads beyond gridDim.y");
  EXPECT_NO_THROW(check_flash_dims(with(&FlashDims::B, 65535)));
  // What the dims check cannot see: shared memory, within Hopper's 227 KiB opt-in limit at both sizes.
  EXPECT_EQ(flash_shared_bytes(64), kDkdvSmem<64>);
  EXPECT_EQ(flash_shared_bytes(128), kDqSmem<128>);
  EXPECT_LE(flash_shared_bytes(128), size_t{227} * 1024);
  EXPECT_THROW(flash_shared_bytes(96), std::invalid_argument);

  // Views: packed ones with padding are fine; in place ones need T = Tp, hd = HD and aligned rows.
  alignas(16) static bf16 buffer[64];
  alignas(16) static float fbuffer[64];
  const auto views_reject = [](const FlashDims& d, std::initializer_list<BF16Heads> in,
                               std::initializer_list<HeadGrad> out, const char* what) {
    try {
      check_flash_views(d, in, out);
      ADD_FAILURE() << what << ": not rejected";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("fused attention"), std::string::npos) << e.what();
    }
  };
  const BF16Heads packed = packed_heads<const bf16>(buffer, ok, ok.H);
  EXPECT_NO_THROW(check_flash_views(ok, {packed}, {HeadGrad{packed_heads(fbuffer, ok, ok.H), {}}}));
  views_reject(ok, {heads_in_rows<const bf16>(buffer, ok, 384, 0)}, {}, "in place with T < Tp and hd < HD");
  FlashDims full = ok;
  full.T = full.Tp;
  full.hd = full.HD;
  EXPECT_NO_THROW(check_flash_views(full, {heads_in_rows<const bf16>(buffer, full, 512, 64)}));
  views_reject(full, {heads_in_rows<const bf16>(buffer, full, 512, 4)}, {}, "rows not 16-byte aligned");
  views_reject(full, {heads_in_rows<const bf16>(buffer, full, 516, 0)}, {}, "row stride not 16-byte aligned");
  HeadGrad odd;
  odd.b16 = heads_in_rows(buffer + 1, full, 512, 0);
  views_reject(full, {}, {odd}, "BF16 gradient at an odd element");
  views_reject(full, {}, {HeadGrad{}}, "a gradient with no destination");
}

}  // namespace
}  // namespace nibble::nn::cuda::detail
