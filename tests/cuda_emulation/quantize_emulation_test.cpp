// Runs the fused NVFP4 pass (src/nibble/quant/cuda/nvfp4_rowcol.cuh: the amax kernel, then the
// rowwise + columnwise (+RHT) quantization with round-to-nearest or stochastic rounding, and the
// decoded BF16 outputs) and the 16x16 weight kernel (nvfp4_tile16.cuh: W and W^T) on the CPU,
// without a GPU, and holds every output to the CPU reference (quant/quantize.h) bit for bit: packed
// codes, block scales, decode scales, amaxes. The headers are compiled as host C++ with every CUDA
// thread of a block a std::thread (blocks one after another, a grid smaller than the work, so that
// each block loops as the persistent grids do), __shared__ arrays as statics shared by the block's
// threads, warp shuffles and reductions through a warp barrier, and the kernels' intrinsics
// emulated from their definitions: __fmaf_ru and __fadd_ru as the CPU's FMA and addition rounded
// upward (fesetround; the target is built with -frounding-math), cvt.rn.satfinite.e4m3x2 as the
// reference E4M3 encoder. This puts the kernels' logic (tiling, staging, index arithmetic, the
// encoders of e2m1_pack.cuh, the RHT sign trick, the nibble transposes) under CI, which has no GPU;
// tests/cuda/quantize_cuda_test.cpp checks the same on the device. The ThreadSanitizer build
// (tests/CMakeLists.txt) also sees a missing barrier around the fused pass's shared tile.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cuda/fused_pass_spec.h"
#include "nibble/formats/minifloat.h"
#include "quant/test_inputs.h"
#include "cuda_emulation/emulated_atomics.h"
#include "cuda_emulation/emulated_grid.h"
#include "test_seed.h"

// ---------------------------------------------------------------- the emulated device

namespace emu {

constexpr int kThreads = 128;  // the block size of both kernels (kRowColThreads, kTile16Threads)
struct Block {
  std::barrier<> sync{kThreads};
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  uint32_t words[kThreads];  // each thread's shuffle or warp-reduction operand
  Block() {
    for (int w = 0; w < kThreads / 32; ++w) warp_sync.push_back(std::make_unique<std::barrier<>>(32));
  }
};
Block* block = nullptr;
uint3 block_dim{kThreads, 1, 1};

int lane() { return static_cast<int>(thread_idx.x & 31); }
int warp() { return static_cast<int>(thread_idx.x >> 5); }
void warp_sync() { block->warp_sync[warp()]->arrive_and_wait(); }

// The CPU's float operations under a rounding mode (this thread's floating-point environment).
template <typename F>
float rounded(int mode, F f) {
  std::fesetround(mode);
  const volatile float r = f();
  std::fesetround(FE_TONEAREST);
  return r;
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#undef __align__
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() (emu::block->sync.arrive_and_wait())

template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline uint32_t max(uint32_t a, uint32_t b) { return a > b ? a : b; }
inline uint32_t __reduce_max_sync(unsigned, uint32_t v) {
  emu::block->words[emu::thread_idx.x] = v;
  emu::warp_sync();
  uint32_t m = 0;
  for (int l = 0; l < 32; ++l) m = max(m, emu::block->words[(emu::thread_idx.x & ~31u) + l]);
  emu::warp_sync();
  return m;
}
// __shfl_xor_sync for 32-bit values (float, uint32_t).
template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask) {
  static_assert(sizeof(V) == 4);
  std::memcpy(&emu::block->words[emu::thread_idx.x], &v, 4);
  emu::warp_sync();
  V r;
  std::memcpy(&r, &emu::block->words[(emu::thread_idx.x & ~31u) + (emu::lane() ^ mask)], 4);
  emu::warp_sync();
  return r;
}
// Per 16-bit half, the unsigned maximum.
inline uint32_t __vmaxu2(uint32_t a, uint32_t b) {
  const uint32_t lo = std::max(a & 0xFFFFu, b & 0xFFFFu), hi = std::max(a >> 16, b >> 16);
  return hi << 16 | lo;
}
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmaf_ru(float a, float b, float c) {
  return emu::rounded(FE_UPWARD, [&] { return std::fma(a, b, c); });
}
inline float __fadd_ru(float a, float b) {
  return emu::rounded(FE_UPWARD, [&] { return a + b; });
}

namespace nibble::cuda {
namespace {
// cvt.rn.satfinite.e4m3x2.f32: nearest-even E4M3 codes of (hi, lo), saturating at 448 (the inputs
// are non-negative and not NaN), hi in the high byte.
uint32_t e4m3x2_rn_satfinite(float hi, float lo) {
  return static_cast<uint32_t>(E4M3::encode(hi, Rounding::kNearestEven)) << 8 | E4M3::encode(lo, Rounding::kNearestEven);
}
// max.NaN.f32 of m and |v|: the canonical NaN 0x7FFFFFFF if either is NaN.
float fmax_abs_nan(float m, float v) {
  if (std::isnan(m) || std::isnan(v)) return std::bit_cast<float>(0x7FFFFFFFu);
  return std::max(m, std::fabs(v));
}
}  // namespace
}  // namespace nibble::cuda

#define NIBBLE_ROWCOL_HOST_EMULATION
#include "../../src/nibble/quant/cuda/nvfp4_rowcol.cuh"
#include "../../src/nibble/quant/cuda/nvfp4_tile16.cuh"

namespace emu {

// Runs kernel() as every thread of every block of `grid`, one block after another.
void launch(dim3 grid, const std::function<void()>& kernel) {
  run_grid(dim3(grid), kThreads, [] {
    auto b = std::make_unique<Block>();
    block = b.get();
    return b;
  }, kernel);
}

}  // namespace emu

namespace nibble::cuda {
namespace {

// The outputs of the fused pass (amax kernel, then the quantizing kernel of `spec`, as
// nvfp4_amax and nvfp4_quantize_rowcol launch them).
struct Outputs {
  uint32_t amax[2] = {0, 0};
  std::vector<uint8_t> row_data, row_scales, col_data, col_scales;
  std::vector<uint16_t> row_decoded, col_decoded;
  float decode_scale[2] = {0, 0};
  // With the decoded values (the layer's GEMM operands), also each side's GEMM alpha against a
  // partner decode scale (QuantBuffers::alpha_partner).
  float partner[2] = {0.375f, 1.7e-3f};
  float alpha[2] = {-1.0f, -1.0f};
};

// The kernel as launch_rowcol picks it for the shape (full_tiles).
template <typename T, bool kAmaxOnly, Rounding kRow, Rounding kCol, bool kRht, bool kStageCol = false>
void run_kernel(unsigned grid, const std::vector<T>& x, int64_t rows, int64_t cols, const RowColSpec& spec,
                AmaxSlots amax_out, const uint32_t* amax_in, QuantBuffers row, QuantBuffers col) {
  emu::launch(grid, [&] {
    if (full_tiles<T>(spec, rows, cols))
      nvfp4_rowcol_kernel<T, kAmaxOnly, kRow, kCol, kRht, kStageCol, true>(x.data(), rows, cols, spec, amax_out,
                                                                           amax_in, row, col);
    else
      nvfp4_rowcol_kernel<T, kAmaxOnly, kRow, kCol, kRht, kStageCol, false>(x.data(), rows, cols, spec, amax_out,
                                                                            amax_in, row, col);
  });
}

// The variant launch_rowcol picks (stage_col_decode).
template <typename T, bool kRht>
void quantize_with(unsigned grid, const std::vector<T>& x, int64_t rows, int64_t cols, const RowColSpec& spec,
                   QuantBuffers row, QuantBuffers col, uint32_t* amax) {
  constexpr Rounding kRne = Rounding::kNearestEven, kSr = Rounding::kStochastic;
  const bool rs = spec.row_rounding == kSr, cs = spec.col_rounding == kSr;
  const auto pick = [&](auto stage_col) {
    constexpr bool kStage = decltype(stage_col)::value;
    if (rs && cs) run_kernel<T, false, kSr, kSr, kRht, kStage>(grid, x, rows, cols, spec, {}, amax, row, col);
    else if (rs) run_kernel<T, false, kSr, kRne, kRht, kStage>(grid, x, rows, cols, spec, {}, amax, row, col);
    else if (cs) run_kernel<T, false, kRne, kSr, kRht, kStage>(grid, x, rows, cols, spec, {}, amax, row, col);
    else run_kernel<T, false, kRne, kRne, kRht, kStage>(grid, x, rows, cols, spec, {}, amax, row, col);
  };
  if constexpr (sizeof(T) == 2) {
    if (stage_col_decode<T>(spec, col)) return pick(std::true_type{});
  }
  pick(std::false_type{});
}

// Which outputs the pass writes: the packed copies, with the decoded values, or those alone
// (QuantBuffers::data nullptr).
enum class Writes { kPacked, kPackedAndDecoded, kDecodedOnly };

template <typename T>
Outputs run_fused(unsigned grid, const std::vector<T>& x, int64_t rows, int64_t cols, const RowColSpec& spec,
                  Writes writes) {
  Outputs o;
  const size_t n = static_cast<size_t>(rows * cols);
  const bool decoded = writes != Writes::kPacked, packed = writes != Writes::kDecodedOnly;
  if (packed) {
    o.row_data.assign(n / 2, 0xAB), o.col_data.assign(n / 2, 0xAB);  // not what any output writes
    o.row_scales.assign(n / 16, 0xAB), o.col_scales.assign(n / 16, 0xAB);
  }
  if (decoded) o.row_decoded.assign(n, 0xABCD), o.col_decoded.assign(n, 0xABCD);
  const auto ptr = [](auto& v) { return v.empty() ? nullptr : v.data(); };
  const QuantBuffers row{ptr(o.row_data), ptr(o.row_scales), &o.decode_scale[0], ptr(o.row_decoded),
                         decoded ? &o.partner[0] : nullptr, decoded ? &o.alpha[0] : nullptr};
  const QuantBuffers col{ptr(o.col_data), ptr(o.col_scales), &o.decode_scale[1], ptr(o.col_decoded),
                         decoded ? &o.partner[1] : nullptr, decoded ? &o.alpha[1] : nullptr};
  constexpr Rounding kRne = Rounding::kNearestEven;
  // The amax pass takes its maxima into o.amax (zeros) and zeroes the next pass's slot
  // (AmaxSlots), here filled with what no pass writes.
  uint32_t next_slot[2] = {0xDEADBEEFu, 0xDEADBEEFu};
  if (spec.col_rht) {
    run_kernel<T, true, kRne, kRne, true>(grid, x, rows, cols, spec, AmaxSlots{o.amax, next_slot}, nullptr, {}, {});
    quantize_with<T, true>(grid, x, rows, cols, spec, row, col, o.amax);
  } else {
    run_kernel<T, true, kRne, kRne, false>(grid, x, rows, cols, spec, AmaxSlots{o.amax, next_slot}, nullptr, {}, {});
    quantize_with<T, false>(grid, x, rows, cols, spec, row, col, o.amax);
  }
  EXPECT_EQ(next_slot[0], 0u);
  EXPECT_EQ(next_slot[1], 0u);
  return o;
}

// Every output of one side against the reference (test::same_quantized on the packed copy, or
// amax and decode scale where the pass wrote the decoded values alone; then the decoded values when
// asked for); the first difference in the message.
::testing::AssertionResult side_matches(const QuantizedTensor& ref, uint32_t amax_bits, float decode_scale,
                                        const std::vector<uint8_t>& data, const std::vector<uint8_t>& scales,
                                        const std::vector<uint16_t>& decoded) {
  QuantizedTensor got = ref;
  got.amax = bits_float(amax_bits);
  got.decode_scale = decode_scale;
  if (!data.empty()) {
    got.data = data;
    got.scales = scales;
  }
  if (::testing::AssertionResult same = test::same_quantized(ref, got); !same) return same;
  if (!decoded.empty()) {
    const std::vector<uint16_t> want = test::nvfp4_decoded_bf16(ref);
    for (size_t i = 0; i < want.size(); ++i)
      if (want[i] != decoded[i])
        return ::testing::AssertionFailure() << "decoded " << i << ": " << want[i] << " vs " << decoded[i];
  }
  return ::testing::AssertionSuccess();
}

// kInfinitiesMeet: two +Inf in one column block, which the RHT's butterfly subtracts (NaN on the
// columnwise side only, where the rowwise amax is +Inf); kWithNaN: one NaN.
// kTinyTensor, kHugeTensor: scaled by 2^-128 (BF16 subnormals, subnormal sums in the RHT) and 2^110.
enum class Values { kOutliers, kWideBlocks, kTinyTensor, kHugeTensor, kWithInfinity, kZeros, kInfinitiesMeet, kWithNaN };

std::vector<float> draw(int64_t rows, int64_t cols, Values kind, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      float v = normal(rng);
      if (kind == Values::kOutliers && c % 37 == 5) v *= 80.0f;
      if (kind == Values::kWideBlocks) v = std::ldexp(v, -static_cast<int>((r / 16 * 7 + c / 16 * 13) % 41));
      if (kind == Values::kTinyTensor) v = std::ldexp(v, -128);
      if (kind == Values::kHugeTensor) v = std::ldexp(v, 110);
      if (kind == Values::kZeros) v = 0.0f;
      x[static_cast<size_t>(r * cols + c)] = v;
    }
  if (kind == Values::kWithInfinity) x[x.size() / 3] = -INFINITY;
  if (kind == Values::kInfinitiesMeet) x[static_cast<size_t>(16 * cols + 5)] = x[static_cast<size_t>(17 * cols + 5)] = INFINITY;
  if (kind == Values::kWithNaN) x[x.size() / 3] = std::numeric_limits<float>::quiet_NaN();
  return x;
}

struct Case {
  int64_t rows, cols;
  unsigned grid;
};

// One tensor through the fused pass, in BF16 and in float, against the CPU reference of each side.
void check(const Case& k, const std::vector<float>& xf, const RowColSpec& spec, Writes writes) {
  const bool decoded = writes != Writes::kPacked;
  const std::vector<bf16_t> xb = test::to_bf16(xf);
  const auto compare = [&](const auto& x, const char* type) {
    SCOPED_TRACE(type);
    using T = typename std::decay_t<decltype(x)>::value_type;
    const Outputs o = run_fused(k.grid, x, k.rows, k.cols, spec, writes);
    const std::span<const T> in(x);
    EXPECT_TRUE(side_matches(quantize(in, k.rows, k.cols, row_spec(spec)), o.amax[0], o.decode_scale[0], o.row_data,
                             o.row_scales, o.row_decoded));
    EXPECT_TRUE(side_matches(quantize(in, k.rows, k.cols, col_spec(spec)), o.amax[1], o.decode_scale[1], o.col_data,
                             o.col_scales, o.col_decoded));
    for (int side = 0; side < 2 && decoded; ++side) {  // the float product (NaN for a non-finite tensor)
      const float want = o.decode_scale[side] * o.partner[side];
      EXPECT_TRUE(float_bits(o.alpha[side]) == float_bits(want) || (std::isnan(want) && std::isnan(o.alpha[side])))
          << "alpha of side " << side << ": " << o.alpha[side] << ", expected " << want;
    }
  };
  compare(xb, "bf16");
  compare(xf, "float");
}

// The magnitude encoders of e2m1_pack.cuh (as emulated here: the CPU's FMA under the rounding mode
// asked for) against minifloat.h's on the floats where rounding decides: a sweep of [0, 16], every
// float near each grid point and midpoint of E2M1's three grids, tiny values down to the smallest
// subnormal; with the extreme bytes (0: round up from half a 1/256 step above the grid point; 0xFF)
// and random ones, at each byte position of a Philox group. The device test E2m1PackCuda.* sweeps every float in [0, 16] on the GPU.
TEST(QuantizeEmulation, MagnitudeEncodersEqualTheReference) {
  std::mt19937_64 rng(test::fresh_seed());
  std::vector<float> ys;
  for (uint32_t b = 0; b <= float_bits(16.0f); b += 331) ys.push_back(bits_float(b));
  for (float g = 0.0f; g <= 16.0f; g += 0.25f)
    for (int d = -64; d <= 64; ++d) ys.push_back(bits_float(static_cast<uint32_t>(static_cast<int64_t>(float_bits(g)) + d)));
  for (uint32_t b = 1; b < 64; ++b) ys.push_back(bits_float(b));
  for (int e = -149; e <= 4; ++e) ys.push_back(std::ldexp(1.0f, e));
  ys.push_back(INFINITY);
  int64_t compared = 0;
  for (float y : ys) {
    if (!(y >= 0.0f)) continue;  // the d < 0 neighbours of 0 are NaNs
    const uint32_t rne = float_bits(e2m1_rne_magic<true>(y)) - float_bits(kE2m1RneMagic);
    ASSERT_EQ(rne, e2m1_encode_rne_fast(y)) << "round to nearest, y = " << y;
    const uint32_t word = static_cast<uint32_t>(rng());
    for (uint32_t w : {0u, 0x01010101u, 0x80808080u, 0xFFFFFFFFu, word}) {
      const Philox4x32 group{{w, ~w, w, ~w}};
      for (int j : {0, 5, 10, 15}) {  // each byte position of a word, and each word
        const uint32_t sr = float_bits(e2m1_sr_magic(y, sr_threshold(group, j))) - float_bits(kE2m1SrMagic);
        ASSERT_EQ(sr, e2m1_encode_sr_fast(y, fp4_random_word(group, j)))
            << "stochastic rounding, y = " << y << ", element " << j << " of a group with word " << w;
        ++compared;
      }
    }
  }
  std::printf("E2M1 magnitude encoders: %lld stochastic and %zu nearest-even codes compared\n",
              static_cast<long long>(compared), ys.size());
}

// Shapes with partial 64 x 128 tiles at both edges, and grids of fewer blocks than tiles; two of
// whole tiles only (full_tiles: their BF16 input takes the kernels without partial-tile checks).
const Case kCases[] = {{16, 16, 1}, {48, 80, 1}, {64, 128, 1}, {112, 272, 2}, {208, 144, 3}, {128, 256, 3}};

TEST(QuantizeEmulation, RowColEqualsTheCpuReferenceBitForBit) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const Case& k : kCases) {
    for (Values kind : {Values::kOutliers, Values::kWideBlocks, Values::kTinyTensor, Values::kHugeTensor}) {
      const std::vector<float> x = draw(k.rows, k.cols, kind, rng);
      for (bool rht : {false, true})
        for (Rounding rr : {Rounding::kNearestEven, Rounding::kStochastic})
          for (Rounding cr : {Rounding::kNearestEven, Rounding::kStochastic}) {
            SCOPED_TRACE(std::to_string(k.rows) + "x" + std::to_string(k.cols) + " values " +
                         std::to_string(static_cast<int>(kind)) + " rht " + std::to_string(rht) + " row " +
                         std::string(rounding_name(rr)) + " col " + std::string(rounding_name(cr)));
            // The decoded values with the packed copies (nearest-even), alone (stochastic), or none.
            check(k, x, test::fused_pass_spec(rht, rr, cr, rng()),
                  rr != cr                           ? Writes::kPacked
                  : rr == Rounding::kNearestEven ? Writes::kPackedAndDecoded
                                                     : Writes::kDecodedOnly);
          }
    }
  }
}

TEST(QuantizeEmulation, RowColNonFiniteAndZeroTensors) {
  std::mt19937_64 rng(test::fresh_seed());
  const Case k{48, 144, 2};
  for (Values kind : {Values::kWithInfinity, Values::kZeros, Values::kInfinitiesMeet, Values::kWithNaN})
    for (bool rht : {false, true}) {
      SCOPED_TRACE("values " + std::to_string(static_cast<int>(kind)) + " rht " + std::to_string(rht));
      check(k, draw(k.rows, k.cols, kind, rng), test::fused_pass_spec(rht, Rounding::kStochastic, Rounding::kNearestEven, rng()),
            Writes::kPackedAndDecoded);
    }
}

// The ThreadSanitizer build runs this one (every kernel variant once, several tiles per block).
TEST(QuantizeEmulation, RowColSeveralTilesPerBlock) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const Case& k : {Case{144, 272, 2}, Case{192, 384, 4}}) {  // partial tiles; whole tiles
    const std::vector<float> x = draw(k.rows, k.cols, Values::kOutliers, rng);
    for (Writes writes : {Writes::kPackedAndDecoded, Writes::kDecodedOnly}) {
      check(k, x, test::fused_pass_spec(true, Rounding::kStochastic, Rounding::kStochastic, rng()), writes);
      check(k, x, test::fused_pass_spec(true, Rounding::kNearestEven, Rounding::kNearestEven, rng()), writes);
    }
  }
}

// The pass decoding its GEMM partner after its tiles (RowColSpec::tail_decode: the saved X^T that
// Wgrad reads beside dY^T) writes the CPU reference's decoded BF16 values of that operand (1x16
// blocks, and 16x16 tiles), with more rows than the grid has blocks and rows of several 128-thread
// strides, and leaves the pass's own outputs as they are without it. Fails when a block skips its
// later rows, a row its later 16-element blocks, or a tile row takes another's scale.
TEST(QuantizeEmulation, RowColTailDecodeWritesThePartnersDecodedValues) {
  std::mt19937_64 rng(test::fresh_seed());
  const Case k{144, 272, 2};
  const std::vector<bf16_t> x = test::to_bf16(draw(k.rows, k.cols, Values::kOutliers, rng));
  for (Block block : {Block::k1x16, Block::k16x16}) {
    SCOPED_TRACE(block == Block::k1x16 ? "1x16" : "16x16");
    const int64_t p_rows = 48, p_cols = 2304;  // 144 16-element blocks a row: two strides of 128 threads
    const std::vector<float> partner = draw(p_rows, p_cols, Values::kWideBlocks, rng);
    QuantSpec p_spec;
    p_spec.block = block;
    const QuantizedTensor q = quantize(std::span<const float>(partner), p_rows, p_cols, p_spec);
    std::vector<uint16_t> out(static_cast<size_t>(p_rows * p_cols), 0xABCD);
    RowColSpec spec = test::fused_pass_spec(true, Rounding::kStochastic, Rounding::kStochastic, rng());
    const Outputs plain = run_fused(k.grid, x, k.rows, k.cols, spec, Writes::kDecodedOnly);
    spec.tail_decode = TailDecode{q.data.data(), q.scales.data(), out.data(), p_rows, p_cols, block == Block::k16x16};
    const Outputs with_tail = run_fused(k.grid, x, k.rows, k.cols, spec, Writes::kDecodedOnly);
    EXPECT_EQ(out, test::nvfp4_decoded_bf16(q));
    EXPECT_EQ(with_tail.row_decoded, plain.row_decoded);
    EXPECT_EQ(with_tail.col_decoded, plain.col_decoded);
    EXPECT_EQ(float_bits(with_tail.decode_scale[1]), float_bits(plain.decode_scale[1]));
  }
}

// ---------------------------------------------------------------- 16x16 weight kernel

// W (with its decoded values; w_codes false: those alone) and/or W^T of x through the 16x16 kernel
// (after the amax kernel with the columnwise side off, as quantize_amax runs it for 16x16), against
// the CPU reference of each; `grid` blocks of 4 warps loop over the 32 x 64 warp tiles.
template <typename T>
void check_tile16(const std::vector<T>& x, int64_t rows, int64_t cols, unsigned grid, bool w_side, bool t_side,
                  bool w_codes = true) {
  const size_t n = x.size();
  uint32_t amax[2] = {0, 0};
  RowColSpec amax_spec;
  amax_spec.columnwise = false;
  run_kernel<T, true, Rounding::kNearestEven, Rounding::kNearestEven, false>(grid, x, rows, cols, amax_spec,
                                                                              AmaxSlots{amax, nullptr}, nullptr, {}, {});
  std::vector<uint8_t> w_data(n / 2, 0xAB), t_data(n / 2, 0xAB), w_scales(n / 256, 0xAB), t_scales(n / 256, 0xAB);
  float g[2] = {0, 0};
  // W's decoded BF16 values too (QuantBuffers::decoded), filled first with what no decode gives.
  std::vector<uint16_t> w_decoded(w_side ? n : 0, 0xABCD);
  const QuantBuffers w_out = !w_side ? QuantBuffers{}
                             : w_codes ? QuantBuffers{w_data.data(), w_scales.data(), &g[0], w_decoded.data()}
                                       : QuantBuffers{nullptr, nullptr, &g[0], w_decoded.data()};
  // Without W^T's codes, its g alone (what OperandCuda's W^T takes when it reads W's decoded values).
  const QuantBuffers t_out =
      t_side ? QuantBuffers{t_data.data(), t_scales.data(), &g[1]} : QuantBuffers{nullptr, nullptr, &g[1]};
  emu::launch(grid, [&] { nvfp4_tile16_kernel<T>(x.data(), rows, cols, amax, w_out, t_out); });
  const std::span<const T> in(x);
  QuantSpec w_spec;
  w_spec.block = Block::k16x16;
  QuantSpec t_spec = w_spec;
  t_spec.columnwise = true;
  if (w_side) {
    EXPECT_TRUE(side_matches(quantize(in, rows, cols, w_spec), amax[0], g[0], w_codes ? w_data : std::vector<uint8_t>{},
                             w_scales, w_decoded))
        << "W";
  }
  if (!t_side) {
    EXPECT_EQ(float_bits(g[1]), float_bits(g[0])) << "W^T's g (its codes off)";
  }
  if (t_side) {
    EXPECT_TRUE(side_matches(quantize(in, rows, cols, t_spec), amax[0], g[1], t_data, t_scales, {})) << "W^T";
  }
}

// Shapes with remainders of rows mod 32 and cols mod 64 (partial warp tiles); grids of fewer warps
// than warp tiles; tile scales over E4M3's whole range (kWideBlocks), a non-finite and a zero tensor.
TEST(QuantizeEmulation, Tile16EqualsTheCpuReferenceBitForBit) {
  std::mt19937_64 rng(test::fresh_seed());
  const Case cases[] = {{16, 16, 1}, {48, 80, 1}, {96, 176, 1}, {160, 48, 2}, {208, 336, 1}};
  for (const Case& k : cases)
    for (Values kind : {Values::kOutliers, Values::kWideBlocks, Values::kWithInfinity, Values::kZeros}) {
      SCOPED_TRACE(std::to_string(k.rows) + "x" + std::to_string(k.cols) + " values " +
                   std::to_string(static_cast<int>(kind)));
      const std::vector<float> x = draw(k.rows, k.cols, kind, rng);
      check_tile16(x, k.rows, k.cols, k.grid, true, true);
      check_tile16(test::to_bf16(x), k.rows, k.cols, k.grid, true, true);
    }
  const std::vector<float> x = draw(80, 208, Values::kOutliers, rng);  // one side alone
  check_tile16(x, 80, 208, 1, true, false);
  check_tile16(x, 80, 208, 1, false, true);
  check_tile16(x, 80, 208, 1, true, false, /*w_codes=*/false);  // W's decoded values alone
  check_tile16(test::to_bf16(x), 80, 208, 2, true, false, /*w_codes=*/false);
}

// One tensor's outputs of the 16x16 kernel, filled first with what no quantization writes.
struct Tile16Outputs {
  std::vector<uint8_t> w_data, w_scales, t_data, t_scales;
  std::vector<uint16_t> w_decoded;
  float g[2] = {-1.0f, -1.0f};
  Tile16Outputs(size_t n, bool codes)
      : w_data(codes ? n / 2 : 0, 0xAB), w_scales(codes ? n / 256 : 0, 0xAB), t_data(codes ? n / 2 : 0, 0xAB),
        t_scales(codes ? n / 256 : 0, 0xAB), w_decoded(n, 0xABCD) {}
  // With codes: W's and W^T's packed copies and W's decoded values; without: W's decoded values and
  // both g's alone (what the GPU model's weights take).
  QuantBuffers w() {
    return w_data.empty() ? QuantBuffers{nullptr, nullptr, &g[0], w_decoded.data()}
                          : QuantBuffers{w_data.data(), w_scales.data(), &g[0], w_decoded.data()};
  }
  QuantBuffers wt() {
    return t_data.empty() ? QuantBuffers{nullptr, nullptr, &g[1]} : QuantBuffers{t_data.data(), t_scales.data(), &g[1]};
  }
  bool operator==(const Tile16Outputs& o) const {
    return w_data == o.w_data && w_scales == o.w_scales && t_data == o.t_data && t_scales == o.t_scales &&
           w_decoded == o.w_decoded && float_bits(g[0]) == float_bits(o.g[0]) && float_bits(g[1]) == float_bits(o.g[1]);
  }
};

// Several weights in one launch (nvfp4_tile16_jobs_kernel, as nvfp4_quantize_tile16_jobs launches it:
// job y, blocks along x up to the largest job's) give each weight the bits of its own launch, which
// the test above holds to the CPU reference (and W's here too): shapes with partial warp tiles and of
// several blocks, one job with packed copies, a non-finite weight. Fails when a job's blocks miss
// tiles or take another job's, or g is written by a block of another job.
TEST(QuantizeEmulation, Tile16JobsGiveEachWeightItsOwnLaunchBits) {
  std::mt19937_64 rng(test::fresh_seed());
  struct Weight {
    int64_t rows, cols;
    Values kind;
    bool codes;
  };
  const Weight weights[] = {{48, 80, Values::kOutliers, false},
                            {208, 336, Values::kWideBlocks, false},
                            {96, 176, Values::kOutliers, true},
                            {160, 48, Values::kWithInfinity, false},
                            {64, 512, Values::kOutliers, false}};
  std::vector<std::vector<float>> xs;
  std::vector<std::array<uint32_t, 2>> amax;
  std::vector<Tile16Outputs> alone, batched;
  Tile16Jobs jobs{};
  int64_t blocks = 0;
  int count = 0;
  RowColSpec amax_spec;
  amax_spec.columnwise = false;
  for (const Weight& w : weights) {
    xs.push_back(draw(w.rows, w.cols, w.kind, rng));
    amax.push_back({0, 0});
    run_kernel<float, true, Rounding::kNearestEven, Rounding::kNearestEven, false>(
        1, xs.back(), w.rows, w.cols, amax_spec, AmaxSlots{amax.back().data(), nullptr}, nullptr, {}, {});
    alone.emplace_back(xs.back().size(), w.codes);
    batched.emplace_back(xs.back().size(), w.codes);
  }
  for (size_t i = 0; i < xs.size(); ++i) {
    const Weight& w = weights[i];
    Tile16Outputs& a = alone[i];
    emu::launch(2, [&] { nvfp4_tile16_kernel<float>(xs[i].data(), w.rows, w.cols, amax[i].data(), a.w(), a.wt()); });
    jobs.job[count++] = Tile16Job{xs[i].data(), w.rows, w.cols, amax[i].data(), batched[i].w(), batched[i].wt()};
    blocks = std::max(blocks, tile16_job_blocks(w.rows, w.cols));
  }
  ASSERT_GT(blocks, 1);  // the largest weight takes several blocks, the smallest fewer than the grid's
  emu::launch(dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(count)), [&] { nvfp4_tile16_jobs_kernel(jobs); });
  for (size_t i = 0; i < xs.size(); ++i) {
    SCOPED_TRACE("weight " + std::to_string(i));
    EXPECT_TRUE(batched[i] == alone[i]);
    EXPECT_NE(batched[i].w_decoded, std::vector<uint16_t>(xs[i].size(), 0xABCD));
  }
  QuantSpec w_spec;
  w_spec.block = Block::k16x16;
  EXPECT_TRUE(side_matches(quantize(std::span<const float>(xs[1]), weights[1].rows, weights[1].cols, w_spec),
                           amax[1][0], batched[1].g[0], {}, {}, batched[1].w_decoded));
}

}  // namespace
}  // namespace nibble::cuda
