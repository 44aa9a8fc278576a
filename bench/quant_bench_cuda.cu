// CUDA quantization benchmark: the fused NVFP4 rowwise + columnwise (+RHT) pass on a BF16 tensor,
// against the device's copy bandwidth measured in the same run.
//
//   nibble_quant_bench_cuda [rows cols [fused-only]]      (default 8192 8192)
//
// With a third argument, only the fused passes whose name contains it (to profile one with ncu).
//
// Bytes counted for the quantizer are the fewest it must move: the input read once and every output
// written once (packed data, scales, and the decoded BF16 values where asked for: 2 bytes per
// element per side). The amax pass, which current scaling needs before any element
// can be encoded, reads the input a second time; the table gives it separately and in the total.
// Then the NVFP4 16x16 weight kernel (one copy, and W with W^T) on BF16 and float input, and the
// generic one-thread-per-segment kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "cuda_timing.h"
#include "nibble/quant/cuda/quantize_cuda.h"

using nibble::bench::check;
using nibble::bench::median_ms;

int main(int argc, char** argv) {
  using namespace nibble;
  const int64_t rows = argc > 2 ? std::atoll(argv[1]) : 8192;
  const int64_t cols = argc > 2 ? std::atoll(argv[2]) : 8192;
  const int64_t n = rows * cols;
  const char* only = argc > 3 ? argv[3] : nullptr;

  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "device properties");
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);

  // Random BF16 input (activation-like, with outlier columns), never zeros.
  std::vector<bf16_t> host(static_cast<size_t>(n));
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i)
    host[i] = bf16_t{BF16::encode(normal(rng) * ((i % cols) % 61 == 7 ? 50.0f : 1.0f), Rounding::kNearestEven)};

  bf16_t *x = nullptr, *copy_dst = nullptr;
  uint8_t *row_data, *row_scales, *col_data, *col_scales;
  uint16_t *row_decoded, *col_decoded;
  float* decode;
  uint32_t* amax;
  check(cudaMalloc(&x, n * 2), "malloc");
  check(cudaMalloc(&copy_dst, n * 2), "malloc");
  check(cudaMalloc(&row_data, n), "malloc");  // n bytes: the generic FP8 line writes one code per element
  check(cudaMalloc(&col_data, n / 2), "malloc");
  check(cudaMalloc(&row_scales, n / 16), "malloc");
  check(cudaMalloc(&col_scales, n / 16), "malloc");
  check(cudaMalloc(&row_decoded, n * 2), "malloc");
  check(cudaMalloc(&col_decoded, n * 2), "malloc");
  check(cudaMalloc(&decode, 2 * sizeof(float)), "malloc");
  check(cudaMalloc(&amax, 2 * sizeof(uint32_t)), "malloc");
  check(cudaMemcpy(x, host.data(), n * 2, cudaMemcpyHostToDevice), "upload");
  const cuda::QuantBuffers row{row_data, row_scales, decode}, col{col_data, col_scales, decode + 1};

  const double in_bytes = 2.0 * n;
  const double copy_out_bytes = n / 2.0 + n / 16.0;  // one packed copy + its E4M3 scales

  const float copy_ms = median_ms([&] { cudaMemcpyAsync(copy_dst, x, n * 2, cudaMemcpyDeviceToDevice); });
  const double copy_gbs = 2.0 * in_bytes / copy_ms / 1e6;
  std::printf("device copy: %.3f ms for %.0f MiB read + written = %.0f GB/s\n", copy_ms, in_bytes / (1 << 20),
              copy_gbs);

  struct Variant {
    const char* name;
    cuda::RowColSpec spec;
    bool row_decoded = false, col_decoded = false;  // also write the decoded BF16 values
    bool row_packed = true, col_packed = true;      // false: that side's decoded values alone
  };
  cuda::RowColSpec act;  // activations for Fprop + Wgrad: RNE, RHT on the columnwise copy
  act.col_rht = true;
  cuda::RowColSpec grad = act;  // gradients for Dgrad + Wgrad: stochastic rounding on both copies
  grad.row_rounding = grad.col_rounding = Rounding::kStochastic;
  grad.seed = 42;
  cuda::RowColSpec plain;  // no RHT, RNE
  cuda::RowColSpec row_only = plain;  // one side alone, to see what each costs
  row_only.columnwise = false;
  cuda::RowColSpec col_only = act;
  col_only.rowwise = false;
  // The X and dY variants as the linear layer runs them on Hopper: X's rowwise (Fprop) copy and both
  // of dY's copies with their decoded BF16 values, which the GEMMs read instead of a decode pass;
  // and, as training runs them, those copies as decoded values alone (no packed codes: LinearCuda's
  // per-call operands), X's columnwise copy packed (saved for Wgrad). "row only, decoded only" is
  // the Fprop X of a layer that is not trained (evaluation; the GEMM benchmark's layer path).
  const Variant variants[] = {{"row+col, RNE, no RHT", plain},
                              {"row+col+RHT, RNE (X)", act},
                              {"row+col+RHT, SR (dY)", grad},
                              {"X + decoded row", act, true, false},
                              {"dY + decoded row+col", grad, true, true},
                              {"X, row decoded only", act, true, false, false, true},
                              {"dY, decoded only", grad, true, true, false, false},
                              {"row only, RNE", row_only},
                              {"row only, decoded only", row_only, true, false, false, true},
                              {"col only +RHT, RNE", col_only}};

  std::printf("\n%-24s %9s %9s %9s %11s %11s %11s\n", "fused nvfp4 pass", "amax ms", "quant ms", "total ms",
              "quant GB/s", "quant/copy", "total/copy");
  for (const Variant& v : variants) {
    if (only != nullptr && std::strstr(v.name, only) == nullptr) continue;
    cuda::QuantBuffers row_out = row, col_out = col;
    if (v.row_decoded) row_out.decoded = row_decoded;
    if (v.col_decoded) col_out.decoded = col_decoded;
    if (!v.row_packed) row_out.data = row_out.scales = nullptr;
    if (!v.col_packed) col_out.data = col_out.scales = nullptr;
    const float amax_ms = median_ms([&] { cuda::nvfp4_amax(x, rows, cols, v.spec, amax, nullptr); });
    cuda::nvfp4_amax(x, rows, cols, v.spec, amax, nullptr);
    const float quant_ms =
        median_ms([&] { cuda::nvfp4_quantize_rowcol(x, rows, cols, v.spec, amax, row_out, col_out, nullptr); });
    const float total_ms = median_ms([&] {
      cuda::nvfp4_amax(x, rows, cols, v.spec, amax, nullptr);
      cuda::nvfp4_quantize_rowcol(x, rows, cols, v.spec, amax, row_out, col_out, nullptr);
    });
    const double out_bytes = ((v.spec.rowwise && v.row_packed) + (v.spec.columnwise && v.col_packed)) * copy_out_bytes +
                             (v.row_decoded + v.col_decoded) * 2.0 * n;
    const double quant_gbs = (in_bytes + out_bytes) / quant_ms / 1e6;
    const double total_gbs = (in_bytes + out_bytes) / total_ms / 1e6;
    std::printf("%-24s %9.3f %9.3f %9.3f %11.0f %10.1f%% %10.1f%%\n", v.name, amax_ms, quant_ms, total_ms, quant_gbs,
                100.0 * quant_gbs / copy_gbs, 100.0 * total_gbs / copy_gbs);
  }

  if (only != nullptr) return 0;

  // NVFP4 16x16 weights, round-to-nearest-even: the dedicated kernel (nvfp4_quantize_tile16), W alone
  // or W and W^T from one pass, on BF16 and on float input (the layers' master weights are float).
  // Counted: the input read once, each copy's codes (n/2 bytes) and tile scales (n/256) written once.
  float* xf = nullptr;
  check(cudaMalloc(&xf, n * 4), "malloc");
  {
    std::vector<float> host_f(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) host_f[i] = BF16::decode(host[i].bits);
    check(cudaMemcpy(xf, host_f.data(), n * 4, cudaMemcpyHostToDevice), "upload");
  }
  const QuantSpec w16 = make_spec(Format::kNvfp4, Block::k16x16);
  const cuda::QuantBuffers w_out{row_data, row_scales, decode}, t_out{col_data, col_scales, decode + 1};
  std::printf("\n%-36s %9s %9s %9s %11s %11s %11s\n", "nvfp4 16x16 (weights) fast", "amax ms", "quant ms",
              "total ms", "quant GB/s", "quant/copy", "total/copy");
  const auto tile16_line = [&](const auto* input, const char* name, bool both) {
    const double bytes = static_cast<double>(n) * sizeof(*input) + (both ? 2 : 1) * (n / 2.0 + n / 256.0);
    const cuda::QuantBuffers wt = both ? t_out : cuda::QuantBuffers{};
    const float amax_ms = median_ms([&] { cuda::quantize_amax(input, rows, cols, w16, amax, nullptr); });
    const float quant_ms =
        median_ms([&] { cuda::nvfp4_quantize_tile16(input, rows, cols, amax, w_out, wt, nullptr); });
    const float total_ms = median_ms([&] {
      cuda::quantize_amax(input, rows, cols, w16, amax, nullptr);
      cuda::nvfp4_quantize_tile16(input, rows, cols, amax, w_out, wt, nullptr);
    });
    const double quant_gbs = bytes / quant_ms / 1e6, total_gbs = bytes / total_ms / 1e6;
    std::printf("%-36s %9.3f %9.3f %9.3f %11.0f %10.1f%% %10.1f%%\n", name, amax_ms, quant_ms, total_ms, quant_gbs,
                100.0 * quant_gbs / copy_gbs, 100.0 * total_gbs / copy_gbs);
  };
  tile16_line(x, "nvfp4 16x16 (weights) fast, bf16", false);
  tile16_line(x, "nvfp4 16x16 fast W and W^T, bf16", true);
  tile16_line(xf, "nvfp4 16x16 (weights) fast, fp32", false);
  tile16_line(xf, "nvfp4 16x16 fast W and W^T, fp32", true);

  // The generic one-thread-per-segment kernels (quantize_*_generic; quantize_amax +
  // quantize_segments take the 16x16 kernel above for 16x16 RNE), one output each, for reference.
  std::printf("\n%-24s %9s %11s %11s\n", "generic path", "total ms", "GB/s", "of copy");
  struct GenericVariant {
    const char* name;
    QuantSpec spec;
    double out_bytes;
  };
  QuantSpec mx;
  mx.format = Format::kMxfp4;
  mx.block = Block::k1x32;
  QuantSpec f8;
  f8.format = Format::kFp8E4M3;
  f8.block = Block::kTensor;
  const GenericVariant generic[] = {{"nvfp4 16x16 (weights)", w16, n / 2.0 + n / 256.0},
                                    {"mxfp4 1x32", mx, n / 2.0 + n / 32.0},
                                    {"fp8 e4m3 per-tensor", f8, static_cast<double>(n)}};
  for (const GenericVariant& g : generic) {
    const float ms = median_ms([&] {
      cuda::quantize_amax_generic(x, rows, cols, g.spec, amax, nullptr);
      cuda::quantize_segments_generic(x, rows, cols, g.spec, amax, cuda::QuantBuffers{row_data, row_scales, decode},
                                      nullptr);
    });
    const double gbs = (in_bytes + g.out_bytes) / ms / 1e6;
    std::printf("%-24s %9.3f %11.0f %10.1f%%\n", g.name, ms, gbs, 100.0 * gbs / copy_gbs);
  }
  return 0;
}
