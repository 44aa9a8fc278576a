// The GPT on the GPU against the CPU model: loss and every parameter's gradient after one
// forward/backward on the same weights and tokens, under several model shapes and recipes (needs a
// GPU; ctest label "gpu").
//
// Tolerances, and why they are not tighter: the GPU runs attention's two batched matmuls and the LM
// head as BF16 tensor-core GEMMs (FP32 accumulation, BF16 logits); the CPU runs them in FP32. BF16
// rounding of q, k, v, P, dO, the hidden states, the logits and their gradient perturbs each value
// by up to 2^-8 relative, so gradients differ by a few 1e-3 in norm (measured, printed below). With
// a quantizing recipe (nvfp4) those perturbations also move values across E2M1 rounding boundaries,
// each such flip changing one element by a whole quantization step (up to 1/3 of its value, or a
// whole block when its amax moves), and the flips compound through the backward pass. So for
// quantizing recipes the test compares the GPU-vs-CPU difference with the recipe's own effect, the
// difference between the CPU's gradients under the recipe and under bf16: the GPU must be nearer to
// the CPU than that (measured: 0.5 to 0.8 of it). With stochastic rounding the test also runs a GPU
// model whose rounding draws come from another seed, which is what a fault in the recipe's plumbing
// (seeds, streams, element indices) would amount to: the GPU with the right seed must be nearer to
// the CPU than that one by 10% at least (measured: 0.66 to 0.75 of its distance). These model-level
// checks are coarse by nature; the sharp ones are in linear_cuda_test.cpp (operands bit for bit).
#include "nibble/model/cuda/gpt_cuda.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "nibble/model/gpt.h"
#include "nibble/tensor/cuda/gemm_cuda.h"
#include "nibble/train/cuda/adamw_cuda.h"
#include "cuda/cuda_test_util.h"
#include "test_seed.h"

namespace nibble::model {
namespace {

using nibble::test::download;

GptConfig tiny(PositionKind pos, NormKind norm, nn::MlpKind mlp, int64_t kv_heads, bool tied) {
  GptConfig c;
  c.name = "tiny-gpu-test";
  c.vocab_size = 512;
  c.seq_len = 64;
  c.d_model = 128;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = kv_heads;
  c.positions = pos;
  c.norm = norm;
  c.mlp = mlp;
  c.tied_embeddings = tied;
  return c;
}

// Random input and target ids for `rows` rows of c's vocabulary.
struct RandomBatch {
  RandomBatch(const GptConfig& c, std::mt19937_64& rng, int64_t rows) {
    std::uniform_int_distribution<uint32_t> id(0, static_cast<uint32_t>(c.vocab_size - 1));
    for (int64_t i = 0; i < rows; ++i) inputs.push_back(id(rng)), targets.push_back(id(rng));
  }
  std::vector<uint32_t> inputs, targets;
};

// |a - b| and |b| (Euclidean norms, in double): two models' gradients side by side.
struct Distance {
  double diff = 0, norm = 0;
};
Distance distance(const std::vector<float>& a, const std::vector<float>& b) {
  Distance d;
  for (size_t j = 0; j < a.size(); ++j) {
    d.diff += (static_cast<double>(a[j]) - b[j]) * (static_cast<double>(a[j]) - b[j]);
    d.norm += static_cast<double>(b[j]) * b[j];
  }
  d.diff = std::sqrt(d.diff);
  d.norm = std::sqrt(d.norm);
  return d;
}

// Two GPU models of one model (the same weights and rounding seeds) under `recipe`, for the tests
// that switch something off in `b` and compare it with `a`.
struct TwinModels {
  TwinModels(const GptConfig& config, const char* recipe, uint64_t seed)
      : c(config),
        host_a(c, nn::preset(recipe), seed, seed + 1),
        host_b(c, nn::preset(recipe), seed, seed + 1),
        a(host_a, seed + 1),
        b(host_b, seed + 1) {}
  GptConfig c;
  Gpt host_a, host_b;
  cuda::GptCuda a, b;
};

struct Case {
  std::string name;
  GptConfig config;
  std::string recipe;
  double loss_tol, grad_tol;  // relative: |loss| and per-parameter gradient norms
  int64_t head_chunk_rows = 0;  // LM head and loss in chunks of this many rows (0: the default, one chunk here)
};

class GptCudaTest : public ::testing::TestWithParam<Case> {};

TEST_P(GptCudaTest, MatchesCpuModel) {
  const Case& tc = GetParam();
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t batch = 3, seq = 64, rows = batch * seq;  // rows a multiple of 32 (MXFP4 Wgrad blocks)
  std::vector<uint32_t> inputs(rows), targets(rows);
  std::uniform_int_distribution<uint32_t> id(0, static_cast<uint32_t>(tc.config.vocab_size - 1));
  for (int64_t i = 0; i < rows; ++i) inputs[i] = id(rng), targets[i] = id(rng);

  nn::Recipe recipe = nn::make_recipe(tc.recipe);
  recipe.bf16_first_blocks = 1;  // selective high precision: block 0 in bf16, the rest as the recipe says
  const bool quantizing = recipe[nn::Operand::kFpropX].quantized();
  Gpt cpu(tc.config, recipe, seed, seed + 1);
  Gpt cpu_bf16(tc.config, nn::preset("bf16"), seed, seed + 1);  // the recipe's own effect, for quantizing recipes
  Gpt host_for_gpu(tc.config, recipe, seed, seed + 1), host_other_seed(tc.config, recipe, seed, seed + 1);
  cuda::GptCuda gpu(host_for_gpu, seed + 1);
  if (tc.head_chunk_rows > 0) gpu.set_lm_head_chunk_rows(tc.head_chunk_rows);
  const bool stochastic = recipe[nn::Operand::kWgradDy].rounding == Rounding::kStochastic;
  std::unique_ptr<cuda::GptCuda> gpu_other_seed;  // same weights, other rounding draws
  if (stochastic) gpu_other_seed = std::make_unique<cuda::GptCuda>(host_other_seed, seed + 2);
  for (uint64_t step : {3u, 4u}) {  // two steps: gradients accumulate, seeds change with the step
    cpu.set_step(step, 1);
    gpu.set_step(step, 1);
    if (quantizing) cpu_bf16.forward_backward(inputs, targets, batch, seq, 0.5f);
    if (gpu_other_seed) {
      gpu_other_seed->set_step(step, 1);
      gpu_other_seed->forward_backward(inputs, targets, batch, seq, 0.5f);
    }
    const double l_cpu = cpu.forward_backward(inputs, targets, batch, seq, 0.5f);
    const double l_gpu = gpu.forward_backward(inputs, targets, batch, seq, 0.5f);
    EXPECT_NEAR(l_gpu, l_cpu, tc.loss_tol * std::fabs(l_cpu)) << "step " << step;
    std::printf("[ gpt      ] %-28s step %llu loss cpu %.6f gpu %.6f\n", tc.name.c_str(),
                static_cast<unsigned long long>(step), l_cpu, l_gpu);
  }
  const double l_val_cpu = cpu.loss(inputs, targets, batch, seq), l_val_gpu = gpu.loss(inputs, targets, batch, seq);
  EXPECT_NEAR(l_val_gpu, l_val_cpu, tc.loss_tol * std::fabs(l_val_cpu)) << "loss()";

  const std::vector<Parameter> ps = cpu.parameters(), ps_bf16 = cpu_bf16.parameters();
  const std::vector<cuda::DeviceParameter>& ds = gpu.parameters();
  ASSERT_EQ(ps.size(), ds.size());
  double worst = 0, gpu_cpu_sq = 0, recipe_sq = 0, other_seed_sq = 0;
  std::string worst_name;
  for (size_t i = 0; i < ps.size(); ++i) {
    ASSERT_EQ(ps[i].name, ds[i].name);
    const std::vector<float> g = download(ds[i].grad, ds[i].count);
    const std::vector<float> g_other =
        gpu_other_seed ? download(gpu_other_seed->parameters()[i].grad, ds[i].count) : std::vector<float>{};
    double diff = 0, ref = 0;
    for (size_t j = 0; j < g.size(); ++j) {
      const double c = ps[i].grad[j];
      diff += (g[j] - c) * (g[j] - c);
      ref += c * c;
      if (quantizing) recipe_sq += (c - ps_bf16[i].grad[j]) * (c - ps_bf16[i].grad[j]);
      if (gpu_other_seed) other_seed_sq += (g_other[j] - c) * (g_other[j] - c);
    }
    gpu_cpu_sq += diff;
    const double rel = std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
    EXPECT_LE(rel, tc.grad_tol) << ps[i].name << " (|grad| " << std::sqrt(ref) << ")";
    if (rel > worst) worst = rel, worst_name = ps[i].name;
  }
  std::printf("[ gpt      ] %-28s worst gradient relative error %.2e (%s), tolerance %.0e\n", tc.name.c_str(), worst,
              worst_name.c_str(), tc.grad_tol);
  if (quantizing) {
    const double gpu_cpu = std::sqrt(gpu_cpu_sq), effect = std::sqrt(recipe_sq);
    std::printf("[ gpt      ] %-28s |g_gpu - g_cpu| %.3e vs the recipe's effect |g_cpu - g_cpu_bf16| %.3e (ratio %.3f)\n",
                tc.name.c_str(), gpu_cpu, effect, gpu_cpu / effect);
    EXPECT_LE(gpu_cpu, effect);
  }
  if (gpu_other_seed) {
    const double gpu_cpu = std::sqrt(gpu_cpu_sq), other = std::sqrt(other_seed_sq);
    std::printf("[ gpt      ] %-28s |g_gpu - g_cpu| %.3e vs a GPU with other rounding draws |g_gpu' - g_cpu| %.3e "
                "(ratio %.3f)\n", tc.name.c_str(), gpu_cpu, other, gpu_cpu / other);
    EXPECT_LE(gpu_cpu, 0.9 * other);
  }
}

using nn::MlpKind;
INSTANTIATE_TEST_SUITE_P(
    Models, GptCudaTest,
    ::testing::Values(
        Case{"gpt2_like_fp32", tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true), "fp32",
             2e-3, 2e-2},
        Case{"gpt2_like_bf16", tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true), "bf16",
             2e-3, 2e-2},
        Case{"llama_like_bf16", tiny(PositionKind::kRope, NormKind::kRmsNorm, MlpKind::kSwiglu, 2, false), "bf16",
             2e-3, 2e-2},
        // The LM head in chunks of 50 rows (192 = 3 x 50 + 42), tied (gradient into the embedding
        // table) and untied: the same tolerances as in one chunk, since chunking only reorders FP32 sums.
        Case{"gpt2_like_bf16_head_chunks", tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true),
             "bf16", 2e-3, 2e-2, 50},
        Case{"llama_like_bf16_head_chunks", tiny(PositionKind::kRope, NormKind::kRmsNorm, MlpKind::kSwiglu, 2, false),
             "bf16", 2e-3, 2e-2, 50},
        Case{"relu2_mqa_fp8", tiny(PositionKind::kLearned, NormKind::kRmsNorm, MlpKind::kRelu2, 1, false), "fp8",
             5e-3, 0.15},
        Case{"gpt2_like_nvfp4", tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true), "nvfp4",
             1e-2, 0.35},
        Case{"llama_like_nvfp4", tiny(PositionKind::kRope, NormKind::kRmsNorm, MlpKind::kSwiglu, 2, false), "nvfp4",
             1e-2, 0.35},
        Case{"gpt2_like_mxfp4", tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true), "mxfp4",
             1e-2, 0.35}),
    [](const auto& info) { return info.param.name; });

// Two GPU models of one nvfp4 model (3 blocks) and a batch of random ids: `produced` with the
// producer amaxes (the default), `own` without them; the GELU in the GEMMs' epilogues or not.
struct ProducerAmaxModels : TwinModels {
  explicit ProducerAmaxModels(uint64_t seed, bool gelu_in_gemm = true)
      : TwinModels(
            [] {  // head_dim 64 and seq 128: on Hopper the attention kernels compute both amaxes in place
              GptConfig t = tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true);
              t.d_model = 256;
              t.seq_len = 128;
              return t;
            }(),
            "nvfp4", seed) {
    own.set_producer_amax(false);
    for (cuda::GptCuda* g : {&produced, &own}) g->set_gelu_in_gemm(gelu_in_gemm);
    std::mt19937_64 rng(seed);
    RandomBatch ids(c, rng, batch * seq);
    inputs = ids.inputs, targets = ids.targets;
  }
  cuda::GptCuda &produced = a, &own = b;
  const int64_t batch = 2, seq = 128;
  std::vector<uint32_t> inputs, targets;
};

// The norms, the GELU and the attention core computing the amax of the NVFP4 passes over their
// outputs (qkv's and fc's X, proj's X, proj2's X, fc's dY, qkv's dY, and in the norms' backward the
// output projections' dY) give the bits of the passes computing their own: the loss and every
// gradient after two steps. With GELU' in proj2's Dgrad epilogue (the default) fc's dY has no
// producer amax; with the GELU kernel it has.
TEST(GptCuda, ProducerAmaxGivesTheSameBits) {
  for (const bool gelu_in_gemm : {true, false}) {
    SCOPED_TRACE(gelu_in_gemm ? "GELU in the GEMMs" : "GELU kernels");
    ProducerAmaxModels m(test::fresh_seed(), gelu_in_gemm);
    cuda::GptCuda &produced = m.produced, &own = m.own;
    const std::vector<uint32_t> &inputs = m.inputs, &targets = m.targets;
    const int64_t batch = m.batch, seq = m.seq;
    for (uint64_t step : {3u, 4u}) {
      produced.set_step(step, 1);
      own.set_step(step, 1);
      const double la = produced.forward_backward(inputs, targets, batch, seq, 0.5f);
      const double lb = own.forward_backward(inputs, targets, batch, seq, 0.5f);
      EXPECT_EQ(la, lb) << "step " << step;
    }
    // Two norms, the attention core and the GELU's forward (and backward, with the kernels) a block, the
    // attention core's backward and two norm backwards (the projections' dY: norm2's for proj, the
    // norm above's for proj2), in each of the 3 blocks and 2 steps. (On Blackwell the NVFP4 GEMMs run
    // natively, without the epilogues.)
    const bool dgrad_epilogue = gelu_in_gemm && !nibble::cuda::native_fp4_available();
    EXPECT_EQ(produced.producer_amaxes(), (dgrad_epilogue ? 7 : 8) * 3 * 2);
    EXPECT_EQ(own.producer_amaxes(), 0);
    for (size_t i = 0; i < produced.parameters().size(); ++i) {
      const cuda::DeviceParameter& p = produced.parameters()[i];
      const std::vector<float> ga = download(p.grad, p.count), gb = download(own.parameters()[i].grad, p.count);
      EXPECT_EQ(0, std::memcmp(ga.data(), gb.data(), ga.size() * sizeof(float))) << p.name;
    }
  }
}

// The GELU in the GEMMs' epilogues (the default) against the activation kernels, in one bf16 model:
// the epilogue applies GELU and GELU' to FP32 GEMM results where the kernels take them rounded to
// BF16, so the two differ by BF16 roundings only: the loss within 1e-3 and each gradient within 1e-2
// in norm (relative), far inside GptCudaTest's GPU-to-CPU tolerances, and not bit for bit (so the
// epilogue did run).
TEST(GptCuda, GeluInGemmDiffersFromTheKernelsByRoundingOnly) {
  const uint64_t seed = test::fresh_seed();
  TwinModels m(tiny(PositionKind::kLearned, NormKind::kLayerNorm, nn::MlpKind::kGelu, 4, true), "bf16", seed);
  const GptConfig& c = m.c;
  cuda::GptCuda &gemm = m.a, &kernels = m.b;
  kernels.set_gelu_in_gemm(false);
  std::mt19937_64 rng(seed);
  const int64_t batch = 3, seq = 64;
  const RandomBatch ids(c, rng, batch * seq);
  const std::vector<uint32_t> &inputs = ids.inputs, &targets = ids.targets;
  const double la = gemm.forward_backward(inputs, targets, batch, seq);
  const double lb = kernels.forward_backward(inputs, targets, batch, seq);
  EXPECT_NEAR(la, lb, 1e-3 * std::fabs(lb));
  bool all_equal = la == lb;
  for (size_t i = 0; i < gemm.parameters().size(); ++i) {
    const cuda::DeviceParameter& p = gemm.parameters()[i];
    const std::vector<float> ga = download(p.grad, p.count), gb = download(kernels.parameters()[i].grad, p.count);
    const Distance dist = distance(ga, gb);
    EXPECT_LE(dist.diff, 1e-2 * dist.norm) << p.name;
    all_equal = all_equal && dist.diff == 0;
  }
  EXPECT_FALSE(all_equal) << "the same bits: the epilogue did not run";
}

// The optimizer computes each NVFP4 weight's amax while it writes the weight (weight_amaxes_for_optimizer,
// ParamTensor::amax), and the next 16x16 pass reads it instead of its own: three steps with AdamW
// between them give the losses, the gradients and the weights of the same model without it, bit for
// bit; a weight changed by someone else afterwards (upload_from) is quantized with its own amax.
// AdamW over a GPU model's parameters, as CudaEngine runs it.
struct Optimizer {
  explicit Optimizer(cuda::GptCuda& g) {
    int64_t offset = 0;
    for (const cuda::DeviceParameter& p : g.parameters()) {
      tensors.push_back({p.value, p.grad, p.count, p.weight_decay, offset});
      offset += p.count;
    }
    adam = std::make_unique<train::cuda::AdamWCuda>(train::AdamWOptions{}, offset);
  }
  std::vector<train::cuda::ParamTensor> tensors;
  std::unique_ptr<train::cuda::AdamWCuda> adam;
};

// Every parameter's value and gradient of two models, bit for bit.
void expect_same_parameters(cuda::GptCuda& a, cuda::GptCuda& b) {
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    const cuda::DeviceParameter& p = a.parameters()[i];
    const cuda::DeviceParameter& q = b.parameters()[i];
    for (const auto& [x, y] : {std::pair{p.value, q.value}, std::pair{p.grad, q.grad}}) {
      const std::vector<float> vx = download(x, p.count), vy = download(y, p.count);
      EXPECT_EQ(0, std::memcmp(vx.data(), vy.data(), vx.size() * sizeof(float))) << p.name;
    }
  }
}

TEST(GptCuda, OptimizerWeightAmaxGivesTheSameBits) {
  const uint64_t seed = test::fresh_seed();
  ProducerAmaxModels m(seed);
  cuda::GptCuda &produced = m.produced, &own = m.own;
  const std::vector<uint32_t> &inputs = m.inputs, &targets = m.targets;
  const int64_t batch = m.batch, seq = m.seq;
  Optimizer opt_a(produced), opt_b(own);
  int64_t weight_amaxes = 0;
  for (uint64_t step : {1u, 2u, 3u}) {
    produced.set_step(step, 0);
    own.set_step(step, 0);
    produced.zero_grad();
    own.zero_grad();
    const double la = produced.forward_backward(inputs, targets, batch, seq);
    const double lb = own.forward_backward(inputs, targets, batch, seq);
    EXPECT_EQ(la, lb) << "step " << step;
    for (auto [g, o] : {std::pair{&produced, &opt_a}, std::pair{&own, &opt_b}}) {
      const std::vector<nibble::cuda::AmaxSlots> amaxes = g->weight_amaxes_for_optimizer();
      ASSERT_EQ(amaxes.size(), o->tensors.size());
      for (size_t i = 0; i < amaxes.size(); ++i) {
        o->tensors[i].amax = amaxes[i];
        if (g == &produced) weight_amaxes += amaxes[i].current != nullptr;
        if (g == &own) {
          EXPECT_EQ(amaxes[i].current, nullptr) << "producer amax switched off";
        }
      }
      o->adam->step(o->tensors, 1e-3, nullptr, g->stream());
      g->weights_changed(/*amaxes_produced=*/true);
    }
  }
  EXPECT_EQ(weight_amaxes, 4 * 3 * 3) << "the four linear layers of the 3 blocks, at each of 3 steps";
  produced.set_step(4, 0);
  own.set_step(4, 0);
  EXPECT_EQ(produced.loss(inputs, targets, batch, seq), own.loss(inputs, targets, batch, seq)) << "after step 3";
  expect_same_parameters(produced, own);
  // Amaxes handed out, then the weights replaced before the next quantization: the stale words are
  // dropped (upload_from calls weights_changed()), and both models load the same weights.
  for (auto [g, o] : {std::pair{&produced, &opt_a}, std::pair{&own, &opt_b}}) {
    const std::vector<nibble::cuda::AmaxSlots> amaxes = g->weight_amaxes_for_optimizer();
    for (size_t i = 0; i < amaxes.size(); ++i) o->tensors[i].amax = amaxes[i];
    o->adam->step(o->tensors, 1e-3, nullptr, g->stream());
  }
  Gpt fresh(m.c, nn::preset("nvfp4"), seed + 7, seed + 8);
  produced.upload_from(fresh);
  own.upload_from(fresh);
  produced.set_step(5, 0);
  own.set_step(5, 0);
  EXPECT_EQ(produced.loss(inputs, targets, batch, seq), own.loss(inputs, targets, batch, seq)) << "after upload_from";
}

// All NVFP4 weights' 16x16 passes in one launch at the forward's start (the default) give the bits
// of a launch per weight at its first GEMM: losses, gradients and weights over three steps with AdamW
// between them (step 1 from weights whose amax no optimizer produced), and the loss after them; each
// weight quantized once a step either way.
TEST(GptCuda, BatchedWeightQuantizationGivesTheSameBits) {
  ProducerAmaxModels m(test::fresh_seed());
  cuda::GptCuda &batched = m.produced, &single = m.own;
  single.set_producer_amax(true);
  single.set_batched_weight_quantization(false);
  Optimizer opt_a(batched), opt_b(single);
  for (uint64_t step : {1u, 2u, 3u}) {
    for (auto [g, o] : {std::pair{&batched, &opt_a}, std::pair{&single, &opt_b}}) {
      g->set_step(step, 0);
      g->zero_grad();
    }
    const double la = batched.forward_backward(m.inputs, m.targets, m.batch, m.seq);
    const double lb = single.forward_backward(m.inputs, m.targets, m.batch, m.seq);
    EXPECT_EQ(la, lb) << "step " << step;
    EXPECT_EQ(batched.batched_weight_passes(), 4 * 3 * static_cast<int64_t>(step)) << "four weights in each of 3 blocks";
    for (auto [g, o] : {std::pair{&batched, &opt_a}, std::pair{&single, &opt_b}}) {
      const std::vector<nibble::cuda::AmaxSlots> amaxes = g->weight_amaxes_for_optimizer();
      for (size_t i = 0; i < amaxes.size(); ++i) o->tensors[i].amax = amaxes[i];
      o->adam->step(o->tensors, 1e-3, nullptr, g->stream());
      g->weights_changed(/*amaxes_produced=*/true);
    }
  }
  batched.set_step(4, 0);
  single.set_step(4, 0);
  EXPECT_EQ(batched.loss(m.inputs, m.targets, m.batch, m.seq), single.loss(m.inputs, m.targets, m.batch, m.seq));
  EXPECT_EQ(batched.batched_weight_passes(), 4 * 3 * 4);
  EXPECT_EQ(single.batched_weight_passes(), 0);
  expect_same_parameters(batched, single);
}

// The optimizer writes the weights' BF16 GEMM copies while it updates them (weight_bf16_for_optimizer,
// ParamTensor::bf16): the bf16 linear layers' and the LM head's, which then convert nothing. Three
// steps with AdamW between them give the losses, gradients and weights of the same model converting
// its weights itself, bit for bit, and the layers did take the copies (the counters): under bf16
// (four linear layers a block and the tied head) and nvfp4 (the untied head only). Copies handed
// out, then the weights replaced (upload_from): the stale values are dropped.
TEST(GptCuda, OptimizerBf16WeightCopiesGiveTheSameBits) {
  for (const char* recipe : {"bf16", "nvfp4"}) {
    SCOPED_TRACE(recipe);
    const uint64_t seed = test::fresh_seed();
    const bool bf16 = std::string(recipe) == "bf16";
    TwinModels m(tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, /*tied=*/bf16), recipe, seed);
    const GptConfig& c = m.c;
    cuda::GptCuda &written = m.a, &converted = m.b;
    converted.set_optimizer_bf16_weights(false);
    std::mt19937_64 rng(seed);
    const int64_t batch = 2, seq = 64;
    const RandomBatch ids(c, rng, batch * seq);
    const std::vector<uint32_t> &inputs = ids.inputs, &targets = ids.targets;
    Optimizer opt_a(written), opt_b(converted);
    // Hands the optimizer each model's copies (the engine's order), returns how many `written` got.
    const auto optimizer_step = [&]() -> int64_t {
      int64_t copies = 0;
      for (auto [g, o] : {std::pair{&written, &opt_a}, std::pair{&converted, &opt_b}}) {
        const std::vector<bf16_t*> where = g->weight_bf16_for_optimizer();
        if (where.size() != o->tensors.size()) {
          ADD_FAILURE() << "one copy pointer a parameter";
          return -1;
        }
        for (size_t i = 0; i < where.size(); ++i) {
          o->tensors[i].bf16 = where[i];
          if (g == &written) copies += where[i] != nullptr;
          if (g == &converted) {
            EXPECT_EQ(where[i], nullptr) << "switched off";
          }
        }
        o->adam->step(o->tensors, 1e-3, nullptr, g->stream());
        g->weights_changed(/*amaxes_produced=*/false, /*bf16_produced=*/true);
      }
      return copies;
    };
    for (uint64_t step : {1u, 2u, 3u}) {
      written.set_step(step, 0);
      converted.set_step(step, 0);
      written.zero_grad();
      converted.zero_grad();
      EXPECT_EQ(written.forward_backward(inputs, targets, batch, seq),
                converted.forward_backward(inputs, targets, batch, seq))
          << "step " << step;
      EXPECT_EQ(optimizer_step(), bf16 ? 4 * 3 + 1 : 1) << "step " << step;
    }
    written.set_step(4, 0);
    converted.set_step(4, 0);
    EXPECT_EQ(written.loss(inputs, targets, batch, seq), converted.loss(inputs, targets, batch, seq)) << "after step 3";
    expect_same_parameters(written, converted);
    // Steps 2 and 3 and the loss after step 3 took the optimizer's copies; the head rounded its
    // weight itself only on step 1 (the other model: on each of the four).
    EXPECT_EQ(written.weight_bf16_adoptions(), bf16 ? 4 * 3 * 3 : 0);
    EXPECT_EQ(converted.weight_bf16_adoptions(), 0);
    EXPECT_EQ(written.head_weight_roundings(), 1);
    EXPECT_EQ(converted.head_weight_roundings(), 4);
    for (auto* g : {&written, &converted}) {  // copies handed out and written, then other weights loaded
      Optimizer& o = g == &written ? opt_a : opt_b;
      const std::vector<bf16_t*> where = g->weight_bf16_for_optimizer();
      for (size_t i = 0; i < where.size(); ++i) o.tensors[i].bf16 = where[i];
      o.adam->step(o.tensors, 1e-3, nullptr, g->stream());
    }
    Gpt fresh(c, nn::preset(recipe), seed + 7, seed + 8);
    written.upload_from(fresh);
    converted.upload_from(fresh);
    written.set_step(5, 0);
    converted.set_step(5, 0);
    EXPECT_EQ(written.loss(inputs, targets, batch, seq), converted.loss(inputs, targets, batch, seq))
        << "after upload_from";
    EXPECT_EQ(written.head_weight_roundings(), 2) << "the head rounds the loaded weight itself";
  }
}

// With set_first_microbatch_writes_grads (how CudaEngine runs the model), a step's micro-batch 0
// writes the gradients marked written_by_first_microbatch (their Wgrad GEMMs with beta = 0) and
// micro-batch 1 adds to them: starting from NaN in those (and zeros in the others, which still
// accumulate), two micro-batches give the gradients of a model that zeroes all and adds, up to the
// FP32 order of the kernels cuBLASLt picks for beta = 0 (1e-5 of each gradient's norm). Tied
// embeddings with learned positions under bf16, the LM head in chunks of 50 rows (only the first
// chunk writes); untied with RoPE under nvfp4, one chunk.
TEST(GptCuda, FirstMicrobatchWritesTheGradients) {
  struct Model {
    bool tied;
    const char* recipe;
  };
  for (const Model& m : {Model{true, "bf16"}, Model{false, "nvfp4"}}) {
    SCOPED_TRACE(std::string(m.tied ? "tied, " : "untied, ") + m.recipe);
    const uint64_t seed = test::fresh_seed();
    TwinModels twins(m.tied ? tiny(PositionKind::kLearned, NormKind::kLayerNorm, nn::MlpKind::kGelu, 4, true)
                            : tiny(PositionKind::kRope, NormKind::kRmsNorm, nn::MlpKind::kSwiglu, 2, false),
                     m.recipe, seed);
    const GptConfig& c = twins.c;
    cuda::GptCuda &writes = twins.a, &adds = twins.b;
    writes.set_first_microbatch_writes_grads(true);
    if (m.tied) {
      writes.set_lm_head_chunk_rows(50);
      adds.set_lm_head_chunk_rows(50);
    }
    writes.zero_grad();
    adds.zero_grad();
    int64_t written = 0;
    for (const cuda::DeviceParameter& p : writes.parameters()) {
      if (!p.written_by_first_microbatch) continue;
      NIBBLE_CUDA_CHECK(cudaMemsetAsync(p.grad, 0xFF, static_cast<size_t>(p.count) * sizeof(float), writes.stream()));
      ++written;
    }
    EXPECT_EQ(written, 4 * c.n_layers + 1) << "the linear weights and the LM head's (or the tied table)";
    std::mt19937_64 rng(seed);
    const int64_t batch = 2, seq = 64;
    for (uint32_t microbatch : {0u, 1u}) {
      const RandomBatch ids(c, rng, batch * seq);
      const std::vector<uint32_t> &inputs = ids.inputs, &targets = ids.targets;
      writes.set_step(2, microbatch);
      adds.set_step(2, microbatch);
      EXPECT_EQ(writes.forward_backward(inputs, targets, batch, seq, 0.5f),
                adds.forward_backward(inputs, targets, batch, seq, 0.5f));
    }
    for (size_t i = 0; i < writes.parameters().size(); ++i) {
      const cuda::DeviceParameter& p = writes.parameters()[i];
      const std::vector<float> ga = download(p.grad, p.count), gb = download(adds.parameters()[i].grad, p.count);
      EXPECT_EQ(std::count_if(ga.begin(), ga.end(), [](float v) { return !std::isfinite(v); }), 0) << p.name;
      const Distance dist = distance(ga, gb);
      EXPECT_LE(dist.diff, 1e-5 * dist.norm) << p.name;
    }
  }
}

// Bad token ids fail with the id and its position, as on the CPU.
TEST(GptCuda, RejectsOutOfRangeIds) {
  GptConfig c = tiny(PositionKind::kLearned, NormKind::kLayerNorm, MlpKind::kGelu, 4, true);
  Gpt host(c, nn::preset("bf16"), 1, 2);
  cuda::GptCuda gpu(host, 2);
  std::vector<uint32_t> inputs(64, 1), targets(64, 2);
  inputs[17] = 512;
  EXPECT_THROW(gpu.loss(inputs, targets, 1, 64), std::out_of_range);
  inputs[17] = 1;
  targets[5] = 9999;
  EXPECT_THROW(gpu.loss(inputs, targets, 1, 64), std::out_of_range);
  EXPECT_NO_THROW(gpu.loss(inputs, std::vector<uint32_t>(64, 3), 1, 64));
}

}  // namespace
}  // namespace nibble::model
