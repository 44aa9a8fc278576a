// GEMM benchmark on the device: NVFP4 emulated on BF16 tensor cores (quantize both operands,
// decode to BF16, cuBLASLt BF16 GEMM with alpha = g_a g_b) against a plain cuBLASLt BF16 GEMM of
// the same shape, and FP8 (quantize + cuBLASLt FP8 GEMM), measured side by side in one run.
//
//   nibble_gemm_bench_cuda            8192^3, then the GEMMs of one GPT-2 124M layer at 16k tokens
//
// Inputs are BF16 matrices in the NT layout (A [m x k], B [n x k], k contiguous); every path starts
// from them, so the NVFP4 and FP8 times include their quantization (amax pass + quantize pass) and,
// for NVFP4, the decode to BF16. The weight operand (B) uses 16x16 blocks, the activation (A) 1x16,
// both round-to-nearest-even, as in the paper's Fprop. "w pre-quantized" leaves B's quantization out:
// in training the weight is quantized once per step and read by two GEMMs (Fprop and Dgrad).
// "layer path" is LinearCuda's Fprop with the weight's decoded values kept: A's quantizing pass
// writes A's decoded BF16 values and the alpha (no multiply_scalars launch), B's 16x16 pass B's
// decoded values, neither a packed copy (which only these GEMMs would read), so nothing is decoded
// in a pass of its own (as LinearCuda does in training, which keeps the weight's decoded values for
// the step). Every GemmRunner tunes its kernels at the first call of a shape (gemm_cuda.h; not the
// 8192^3 GEMMs, which keep cuBLASLt's first choice); NIBBLE_GEMM_TUNE=0 times the heuristic's first
// choices everywhere.
// On Blackwell (compute capability >= 10.0) a last column times the native NVFP4 GEMM (quantize
// both, rearrange the block scales, cuBLASLt block-scaled FP4 GEMM); elsewhere it says n/a. That
// column has never been measured (no Blackwell GPU here). On Hopper, "packed" times the GEMM that
// decodes the packed operands in its operand load (gemm_nvfp4_sm90.h): the GEMM alone on quantized
// operands, and the path with both quantizations (A's pass writing no decoded copy).
// The last lines time one training step of a linear layer (run_layer_step: Fprop, Dgrad and Wgrad
// with all their quantization passes) under the bf16 and the nvfp4 recipe, at 8192^3 and at
// GPT-2's fc layer.
#include <cuda_runtime.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda_timing.h"
#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/linear_cuda.h"
#include "nibble/nn/cuda/operand_cuda.h"
#include "nibble/nn/recipe.h"

namespace {

using namespace nibble;
using nibble::bench::median_ms;
using nibble::cuda::GemmMatrix;
using nibble::cuda::GemmOutput;
using nibble::cuda::GemmRunner;
using nibble::cuda::GemmType;
using nibble::nn::Operand;
using nibble::nn::OperandFormat;
using nibble::nn::OperandRecipe;
using nibble::nn::cuda::DeviceBuffer;
using nibble::nn::cuda::OperandCuda;

struct Shape {
  std::string name;
  int64_t m, n, k;
};

std::vector<bf16_t> random_bf16(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<bf16_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = bf16_t{BF16::encode(d(rng), Rounding::kNearestEven)};
  return v;
}

// Returns the plain BF16 GEMM's time.
float run_shape(const Shape& s, GemmRunner& gemm) {
  DeviceBuffer<bf16_t> a(random_bf16(s.m * s.k, 1)), b(random_bf16(s.n * s.k, 2));
  DeviceBuffer<float> c(static_cast<size_t>(s.m * s.n)), alpha(1);
  DeviceBuffer<uint8_t> scratch_a, scratch_b;
  const GemmOutput out{c.data(), GemmType::kF32};

  const float bf16_ms = median_ms([&] {
    gemm.run(s.m, s.n, s.k, GemmMatrix{a.data(), GemmType::kBF16, false}, GemmMatrix{b.data(), GemmType::kBF16, true},
             out, nullptr, false, nullptr);
  });

  // Fprop operands of the paper's recipe: A = activations (1x16, fprop.x), B = weight (16x16, fprop.w).
  const OperandRecipe act{OperandFormat::kNvfp4, Block::k1x16, Rounding::kNearestEven, false};
  const OperandRecipe wgt{OperandFormat::kNvfp4, Block::k16x16, Rounding::kNearestEven, false};
  OperandCuda qa, qb;
  const auto quantize_a = [&] { qa.make(a.data(), s.m, s.k, act, Operand::kFpropX, kDefaultRhtSigns, 0, nullptr); };
  const auto quantize_b = [&] { qb.make(b.data(), s.n, s.k, wgt, Operand::kFpropW, kDefaultRhtSigns, 0, nullptr); };
  const auto emulated_gemm = [&] {
    const GemmMatrix ma = qa.gemm_matrix(GemmType::kBF16, false, scratch_a, nullptr);
    const GemmMatrix mb = qb.gemm_matrix(GemmType::kBF16, true, scratch_b, nullptr);
    nibble::cuda::multiply_scalars(qa.decode_scale(), qb.decode_scale(), alpha.data(), nullptr);
    gemm.run(s.m, s.n, s.k, ma, mb, out, alpha.data(), false, nullptr);
  };
  quantize_a();
  quantize_b();
  const float qa_ms = median_ms(quantize_a), qb_ms = median_ms(quantize_b);
  const float decode_gemm_ms = median_ms(emulated_gemm);
  const float decode_ms = median_ms([&] {
    qa.gemm_matrix(GemmType::kBF16, false, scratch_a, nullptr);
    qb.gemm_matrix(GemmType::kBF16, true, scratch_b, nullptr);
  });
  const float nvfp4_ms = median_ms([&] {
    quantize_a();
    quantize_b();
    emulated_gemm();
  });
  const float nvfp4_wq_ms = median_ms([&] {
    quantize_a();
    emulated_gemm();
  });
  // The layer's Fprop path (LinearCuda): each quantizing pass writes its operand's decoded BF16 values
  // and no packed copy, and A's the GEMM's alpha (OperandForGemm), so nothing is decoded in a pass of
  // its own.
  OperandCuda qa_fused, qb_fused;
  const auto quantize_b_fused = [&] {
    qb_fused.make(b.data(), s.n, s.k, wgt, Operand::kFpropW, kDefaultRhtSigns, 0, nullptr,
                  nibble::nn::cuda::OperandForGemm{true, nullptr, /*packed=*/false});
  };
  const auto quantize_a_fused = [&] {
    qa_fused.make(a.data(), s.m, s.k, act, Operand::kFpropX, kDefaultRhtSigns, 0, nullptr,
                  nibble::nn::cuda::OperandForGemm{true, &qb_fused, /*packed=*/false});
  };
  quantize_b_fused();
  const auto fused_gemm = [&] {
    const GemmMatrix ma = qa_fused.gemm_matrix(GemmType::kBF16, false, scratch_a, nullptr);
    const GemmMatrix mb = qb_fused.gemm_matrix(GemmType::kBF16, true, scratch_b, nullptr);
    gemm.run(s.m, s.n, s.k, ma, mb, out, qa_fused.alpha_with(qb_fused), false, nullptr);
  };
  const float layer_ms = median_ms([&] {
    quantize_b_fused();
    quantize_a_fused();
    fused_gemm();
  });
  const float layer_wq_ms = median_ms([&] {
    quantize_a_fused();
    fused_gemm();
  });

  // FP8 (E4M3 per-tensor current scaling) for comparison: quantize both, FP8 tensor-core GEMM.
  const OperandRecipe fp8{OperandFormat::kFp8E4M3, Block::kTensor, Rounding::kNearestEven, false};
  OperandCuda fa, fb;
  const float fp8_ms = median_ms([&] {
    fa.make(a.data(), s.m, s.k, fp8, Operand::kFpropX, kDefaultRhtSigns, 0, nullptr);
    fb.make(b.data(), s.n, s.k, fp8, Operand::kFpropW, kDefaultRhtSigns, 0, nullptr);
    nibble::cuda::multiply_scalars(fa.decode_scale(), fb.decode_scale(), alpha.data(), nullptr);
    gemm.run(s.m, s.n, s.k, fa.gemm_matrix(GemmType::kE4M3, false, scratch_a, nullptr),
             fb.gemm_matrix(GemmType::kE4M3, true, scratch_b, nullptr), out, alpha.data(), false, nullptr);
  });

  // Hopper's packed-operand GEMM (gemm_nvfp4_sm90.h) on the same packed operands: the A pass writes no
  // decoded copy and nothing is decoded in a pass of its own.
  std::string packed = "packed n/a";
  DeviceBuffer<float> split_workspace;
  const GemmOutput packed_out{c.data(), GemmType::kF32};
  if (nibble::cuda::nvfp4_packed_gemm_applies(s.m, s.n, s.k, qa.nvfp4_operand(), qb.nvfp4_operand(), packed_out)) {
    const auto packed_gemm = [&] {
      nibble::cuda::multiply_scalars(qa.decode_scale(), qb.decode_scale(), alpha.data(), nullptr);
      nibble::cuda::nvfp4_packed_gemm(s.m, s.n, s.k, qa.nvfp4_operand(), qb.nvfp4_operand(), packed_out, alpha.data(),
                                     false, nullptr, &split_workspace);
    };
    const float gemm_ms = median_ms(packed_gemm);
    const float path_ms = median_ms([&] {
      quantize_b();
      quantize_a();
      packed_gemm();
    });
    const float path_wq_ms = median_ms([&] {
      quantize_a();
      packed_gemm();
    });
    char text[160];
    std::snprintf(text, sizeof(text), "packed gemm %8.3f ms %6.0f TF/s, path %8.3f ms x%.2f, w pre-quantized x%.2f",
                  gemm_ms, 2.0 * s.m * s.n * s.k / gemm_ms * 1e-9, path_ms, path_ms / bf16_ms, path_wq_ms / bf16_ms);
    packed = text;
  }

  // Native NVFP4 (Blackwell only): the same quantized operands, scales rearranged, FP4 tensor cores.
  std::string native = "native n/a (compute capability < 10)";
  if (nibble::cuda::native_fp4_available()) {
    const float native_ms = median_ms([&] {
      quantize_a();
      quantize_b();
      nibble::cuda::multiply_scalars(qa.decode_scale(), qb.decode_scale(), alpha.data(), nullptr);
      gemm.run(s.m, s.n, s.k, qa.nvfp4_matrix(false, scratch_a, nullptr), qb.nvfp4_matrix(true, scratch_b, nullptr),
               out, alpha.data(), false, nullptr);
    });
    char text[64];
    std::snprintf(text, sizeof(text), "native %8.3f ms x%.2f", native_ms, native_ms / bf16_ms);
    native = text;
  }

  const double flop = 2.0 * s.m * s.n * s.k;
  std::printf("%-22s %6lld %6lld %6lld | bf16 %8.3f ms %6.0f TF/s | nvfp4 %8.3f ms (qA %.3f qW %.3f dec %.3f dec+gemm %.3f) "
              "x%.2f, w pre-quantized x%.2f | layer path %8.3f ms x%.2f, w pre-quantized x%.2f | %s | fp8 %8.3f ms x%.2f | %s\n",
              s.name.c_str(), static_cast<long long>(s.m), static_cast<long long>(s.n), static_cast<long long>(s.k),
              bf16_ms, flop / bf16_ms * 1e-9, nvfp4_ms, qa_ms, qb_ms, decode_ms, decode_gemm_ms, nvfp4_ms / bf16_ms,
              nvfp4_wq_ms / bf16_ms, layer_ms, layer_ms / bf16_ms, layer_wq_ms / bf16_ms, packed.c_str(), fp8_ms, fp8_ms / bf16_ms,
              native.c_str());
  return bf16_ms;
}

// One training step of a linear layer (in -> out features, `tokens` rows) under the bf16 and the
// nvfp4 recipe, as the GPU model runs it: Fprop, Dgrad and Wgrad from BF16 X and dY
// (forward_bf16_input / backward_bf16_input), the weight quantized once for the step
// (weight_changed() first; in training the optimizer would hand its amax over, here its own amax
// pass runs) and every operand's amax computed by its own pass (no producer amaxes). The bf16 step
// is the three cuBLASLt BF16 GEMMs and the weight's BF16 copy; gemm_ms > 0: also against three times
// that plain BF16 GEMM time (run_shape's, for a square shape, whose three GEMMs are alike).
void run_layer_step(int64_t tokens, int64_t in, int64_t out, float gemm_ms = 0) {
  const char* const recipes[] = {"bf16", "nvfp4"};
  float ms[2] = {0, 0};
  for (int r = 0; r < 2; ++r) {
    nibble::nn::cuda::LinearContext ctx;
    ctx.producer_amax = false;
    nibble::nn::cuda::LinearCuda layer(in, out, nibble::nn::preset(recipes[r]), nibble::nn::LinearOptions{1, 7}, ctx);
    std::vector<float> w(static_cast<size_t>(in * out));
    std::mt19937_64 rng(3);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (float& v : w) v = normal(rng);
    layer.upload_weight(w);
    layer.weight_changed();
    const std::vector<bf16_t> x = random_bf16(tokens * in, 4), dy = random_bf16(tokens * out, 5);
    DeviceBuffer<bf16_t> y(static_cast<size_t>(tokens * out)), dx(static_cast<size_t>(tokens * in));
    nibble::bench::check(cudaMemcpy(layer.bf16_input(tokens), x.data(), x.size() * 2, cudaMemcpyHostToDevice), "x");
    layer.forward_bf16_input(tokens, y.data(), nullptr);
    // For nvfp4, X and dY share the context's BF16 buffer: from here on both read dY's values.
    nibble::bench::check(cudaMemcpy(layer.bf16_dy_input(), dy.data(), dy.size() * 2, cudaMemcpyHostToDevice), "dy");
    layer.backward_bf16_input(dx.data(), nullptr);
    ms[r] = median_ms([&] {
      layer.weight_changed();
      layer.forward_bf16_input(tokens, y.data(), nullptr);
      layer.backward_bf16_input(dx.data(), nullptr);
    });
  }
  std::printf("linear layer step %lld x %lld -> %lld (Fprop + Dgrad + Wgrad, weight quantized once) | bf16 %8.3f ms | "
              "nvfp4 %8.3f ms x%.2f",
              static_cast<long long>(tokens), static_cast<long long>(in), static_cast<long long>(out), ms[0], ms[1],
              ms[1] / ms[0]);
  if (gemm_ms > 0) std::printf(" | 3 x bf16 GEMM %8.3f ms, nvfp4 x%.2f of it", 3 * gemm_ms, ms[1] / (3 * gemm_ms));
  std::printf("\n");
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  nibble::bench::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s\n", prop.name);
  std::printf("times: median of 50 runs; ratios are against the bf16 GEMM of the same shape, same run\n");
  GemmRunner gemm;
  const int64_t t = 16384, d = 768;
  const Shape shapes[] = {
      {"square 8192^3", 8192, 8192, 8192},
      {"gpt2 qkv fprop", t, 3 * d, d},       {"gpt2 qkv dgrad", t, d, 3 * d},   {"gpt2 qkv wgrad", 3 * d, d, t},
      {"gpt2 attn.proj fprop", t, d, d},     {"gpt2 attn.proj wgrad", d, d, t},
      {"gpt2 fc fprop", t, 4 * d, d},        {"gpt2 fc dgrad", t, d, 4 * d},    {"gpt2 fc wgrad", 4 * d, d, t},
      {"gpt2 mlp.proj fprop", t, d, 4 * d},  {"gpt2 mlp.proj dgrad", t, 4 * d, d}, {"gpt2 mlp.proj wgrad", d, 4 * d, t},
  };
  float square_ms = 0;
  for (const Shape& s : shapes) {
    const float ms = run_shape(s, gemm);
    if (s.m == 8192) square_ms = ms;
  }
  run_layer_step(8192, 8192, 8192, square_ms);
  run_layer_step(t, d, 4 * d);  // GPT-2's fc layer
  return 0;
}
