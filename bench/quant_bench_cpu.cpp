// CPU quantization throughput of the reference quantizers, against memcpy of the same input on the
// same machine (one run, side by side). Bytes/s count the input bytes.
//
//   build/<preset>/bench/nibble_quant_bench_cpu --benchmark_min_time=0.5
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "nibble/quant/quantize.h"

namespace {

constexpr int64_t kRows = 1024, kCols = 1024;

const std::vector<float>& input() {
  static const std::vector<float> x = [] {
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> v(kRows * kCols);
    for (float& f : v) f = normal(rng);
    return v;
  }();
  return x;
}

void BM_Memcpy(benchmark::State& state) {
  const std::vector<float>& x = input();
  std::vector<float> y(x.size());
  for (auto _ : state) {
    std::memcpy(y.data(), x.data(), x.size() * sizeof(float));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(x.size() * sizeof(float)));
}
BENCHMARK(BM_Memcpy);

void BM_Quantize(benchmark::State& state, nibble::QuantSpec spec) {
  const std::vector<float>& x = input();
  for (auto _ : state) {
    nibble::QuantizedTensor q = nibble::quantize(std::span<const float>(x), kRows, kCols, spec);
    benchmark::DoNotOptimize(q.data.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(x.size() * sizeof(float)));
}

using nibble::Block;
using nibble::Format;
using nibble::Rounding;
using nibble::make_spec;
BENCHMARK_CAPTURE(BM_Quantize, nvfp4_1x16_rne, make_spec(Format::kNvfp4, Block::k1x16));
BENCHMARK_CAPTURE(BM_Quantize, nvfp4_1x16_sr, make_spec(Format::kNvfp4, Block::k1x16, Rounding::kStochastic));
BENCHMARK_CAPTURE(BM_Quantize, nvfp4_1x16_col_rht, make_spec(Format::kNvfp4, Block::k1x16, Rounding::kNearestEven, true, true));
BENCHMARK_CAPTURE(BM_Quantize, nvfp4_16x16, make_spec(Format::kNvfp4, Block::k16x16));
BENCHMARK_CAPTURE(BM_Quantize, mxfp4_1x32, make_spec(Format::kMxfp4, Block::k1x32));
BENCHMARK_CAPTURE(BM_Quantize, fp8_e4m3, make_spec(Format::kFp8E4M3, Block::kTensor));

}  // namespace

BENCHMARK_MAIN();
