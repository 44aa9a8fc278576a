// Timing of the GPU high-precision layers (nn/cuda/layers_cuda.h, train/cuda/adamw_cuda.h) at the
// shapes of one GPT-2 124M training step: 16 x 1024 tokens, d_model 768, 12 heads, vocab 50304.
// Prints the median time of each forward/backward and the memory traffic it implies (bytes the
// kernels must read and write at least, over the time), to see which ones are far from the
// device's bandwidth (~3 TB/s on an H100). The attention core is reported against its FLOPs
// instead, for both kernels side by side: the fused (flash-style) one that training uses and the
// batched-GEMM one it replaced (kept as the fallback for head_dim > 128), with the device memory
// each holds (saved tensors and workspace).
//
//   nibble_layers_bench_cuda
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_timing.h"
#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/nn/cuda/linear_cuda.h"
#include "nibble/nn/cuda/lm_head_cuda.h"
#include "nibble/train/cuda/adamw_cuda.h"

namespace {

using nibble::bench::median_ms;
using nibble::cuda::DeviceBuffer;
namespace ncu = nibble::nn::cuda;

DeviceBuffer<float> random_buffer(int64_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return DeviceBuffer<float>(std::span<const float>(v));
}

DeviceBuffer<nibble::bf16_t> random_bf16_buffer(int64_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<nibble::bf16_t> v(static_cast<size_t>(n));
  for (auto& x : v) x.bits = static_cast<uint16_t>(nibble::BF16::encode(d(rng), nibble::Rounding::kNearestEven));
  return DeviceBuffer<nibble::bf16_t>(std::span<const nibble::bf16_t>(v));
}

// The amax of a fused NVFP4 pass with the RHT on its columnwise side, for the lines that time a
// producer with that pass's amax kernel after it (amax_pass) or with the amax computed in it (producer).
struct PassAmax {
  DeviceBuffer<uint32_t> words;
  nibble::cuda::RowColSpec spec;
  nibble::cuda::ProducerAmax producer;
  PassAmax() : words(4) {
    words.zero();
    spec.col_rht = true;
    producer.slots = {words.data(), words.data() + 2};
    producer.col_rht = true;
  }
  void amax_pass(const nibble::bf16_t* x, int64_t rows, int64_t cols) {
    nibble::cuda::nvfp4_amax(x, rows, cols, spec, nibble::cuda::AmaxSlots{words.data(), nullptr}, nullptr);
  }
};

void report(const char* what, float ms, double bytes) {
  std::printf("%-34s %9.3f ms  %8.1f GB/s\n", what, ms, bytes / (ms * 1e-3) / 1e9);
}

int64_t device_bytes_in_use() {
  size_t free = 0, total = 0;
  nibble::bench::check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return static_cast<int64_t>(total - free);
}

}  // namespace

int main() {
  const int64_t B = 16, T = 1024, d = 768, H = 12, vocab = 50304, hidden = 4 * d, tokens = B * T;
  std::printf("GPT-2 124M shapes: %lld tokens, d_model %lld, %lld heads, vocab %lld\n", static_cast<long long>(tokens),
              static_cast<long long>(d), static_cast<long long>(H), static_cast<long long>(vocab));
  std::mt19937_64 rng(1);
  std::vector<uint32_t> ids(static_cast<size_t>(tokens));
  for (auto& id : ids) id = static_cast<uint32_t>(rng() % vocab);
  DeviceBuffer<uint32_t> d_ids{std::span<const uint32_t>(ids)};
  const double act = static_cast<double>(tokens * d) * 4;  // one [tokens x d] FP32 activation

  {
    ncu::EmbeddingCuda emb(vocab, d);
    DeviceBuffer<float> out(static_cast<size_t>(tokens * d));
    auto dout = random_buffer(tokens * d, 1.0f, 2);
    report("embedding forward", median_ms([&] { emb.forward(d_ids.data(), tokens, out.data(), false, nullptr); }),
           2 * act);
    // GPT-2's learned positions: the step's one pass, and the two it took before (tokens, then the
    // positions' rows added onto them).
    ncu::EmbeddingCuda positions(T, d);
    std::vector<uint32_t> position_ids(static_cast<size_t>(tokens));
    for (int64_t i = 0; i < tokens; ++i) position_ids[static_cast<size_t>(i)] = static_cast<uint32_t>(i % T);
    DeviceBuffer<uint32_t> d_positions{std::span<const uint32_t>(position_ids)};
    report("embedding forward with positions, one pass",
           median_ms([&] { emb.forward_with_positions(d_ids.data(), B, T, positions, out.data(), nullptr); }), 2 * act);
    report("embedding forward with positions, two passes", median_ms([&] {
             emb.forward(d_ids.data(), tokens, out.data(), false, nullptr);
             positions.forward(d_positions.data(), tokens, out.data(), true, nullptr);
           }), 5 * act);
    report("embedding backward", median_ms([&] { emb.backward(d_ids.data(), tokens, dout.data(), nullptr); }),
           3 * act);
    // Ids as in text: Zipf's law (frequency of the k-th id ~ 1 / k), so the top id takes ~9% of the
    // positions and the scatter-add has runs of ~1,400 rows to add in order.
    std::vector<double> cdf(static_cast<size_t>(vocab));
    double sum = 0;
    for (int64_t k = 0; k < vocab; ++k) cdf[static_cast<size_t>(k)] = sum += 1.0 / static_cast<double>(k + 1);
    std::uniform_real_distribution<double> u(0.0, sum);
    std::vector<uint32_t> zipf(static_cast<size_t>(tokens));
    for (auto& id : zipf) id = static_cast<uint32_t>(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
    DeviceBuffer<uint32_t> d_zipf{std::span<const uint32_t>(zipf)};
    report("embedding backward, Zipf ids", median_ms([&] { emb.backward(d_zipf.data(), tokens, dout.data(), nullptr); }),
           3 * act);
  }
  {
    ncu::NormCuda norm(d, nibble::nn::NormKind::kLayerNorm);
    auto x = random_buffer(tokens * d, 1.0f, 3), dy = random_buffer(tokens * d, 1.0f, 4);
    DeviceBuffer<float> y(x.size()), dx(x.size());
    report("layernorm forward", median_ms([&] { norm.forward(x.data(), tokens, y.data(), nullptr); }), 3 * act);
    // BF16 output (and so BF16 saved rows), as the bf16 and nvfp4 steps write qkv's and fc's input:
    // alone, followed by the amax pass of the fused NVFP4 pass over it, and computing that amax itself
    // (nibble::cuda::ProducerAmax).
    DeviceBuffer<nibble::bf16_t> y16(x.size());
    PassAmax amax;
    report("layernorm forward bf16", median_ms([&] { norm.forward(x.data(), tokens, y16.data(), nullptr); }),
           2 * act);
    report("layernorm forward bf16 + amax pass", median_ms([&] {
             norm.forward(x.data(), tokens, y16.data(), nullptr);
             amax.amax_pass(y16.data(), tokens, d);
           }), 2.5 * act);
    report("layernorm forward bf16, amax in it",
           median_ms([&] { norm.forward(x.data(), tokens, y16.data(), nullptr, amax.producer); }), 2 * act);
    report("layernorm backward", median_ms([&] {
             norm.forward(x.data(), tokens, y.data(), nullptr);
             norm.backward(dy.data(), dx.data(), nullptr);
           }), 3 * act + 4 * act);
    // As the nvfp4 step runs it: the forward with BF16 output (BF16 rows), dy in BF16 (a linear
    // layer's Dgrad output; y16's values), dx added to the residual stream's gradient and also written
    // in BF16, with the amax of the NVFP4 pass over it.
    DeviceBuffer<nibble::bf16_t> dx16(x.size());
    report("layernorm backward, bf16 in + out, amax", median_ms([&] {
             norm.forward(x.data(), tokens, y16.data(), nullptr);
             norm.backward(y16.data(), dx.data(), nullptr, /*accumulate=*/true, dx16.data(), amax.producer);
           }), 2 * act + 3.5 * act);
  }
  {
    auto pre = random_buffer(tokens * hidden, 1.0f, 5), dact = random_buffer(tokens * hidden, 1.0f, 6);
    DeviceBuffer<float> a(pre.size()), dpre(pre.size());
    const double h = static_cast<double>(tokens * hidden) * 4;
    report("gelu forward", median_ms([&] {
             ncu::activation_forward(nibble::nn::MlpKind::kGelu, pre.data(), tokens, hidden, a.data(), nullptr);
           }), 2 * h);
    report("gelu backward", median_ms([&] {
             ncu::activation_backward(nibble::nn::MlpKind::kGelu, pre.data(), dact.data(), tokens, hidden, dpre.data(),
                                      nullptr);
           }), 3 * h);
  }
  {
    // The GELU as the nvfp4 step runs it (BF16 in and out): alone, followed by the amax pass of the
    // fused NVFP4 pass over its output (RHT on the columnwise side), and computing that amax itself
    // (nibble::cuda::ProducerAmax, what training does).
    auto pre = random_bf16_buffer(tokens * hidden, 1.0f, 7), dact = random_bf16_buffer(tokens * hidden, 1e-3f, 8);
    DeviceBuffer<nibble::bf16_t> out(pre.size());
    PassAmax amax;
    const double h = static_cast<double>(tokens * hidden) * 2;
    const auto gelu = [&](bool backward, nibble::cuda::ProducerAmax a) {
      if (backward)
        ncu::activation_backward(nibble::nn::MlpKind::kGelu, pre.data(), dact.data(), tokens, hidden, out.data(),
                                 nullptr, a);
      else
        ncu::activation_forward(nibble::nn::MlpKind::kGelu, pre.data(), tokens, hidden, out.data(), nullptr, a);
    };
    for (bool backward : {false, true}) {
      const double bytes = (backward ? 3 : 2) * h;
      report(backward ? "gelu backward bf16" : "gelu forward bf16", median_ms([&] { gelu(backward, {}); }), bytes);
      report(backward ? "gelu backward bf16 + amax pass" : "gelu forward bf16 + amax pass", median_ms([&] {
               gelu(backward, {});
               amax.amax_pass(out.data(), tokens, hidden);
             }), bytes + h);
      report(backward ? "gelu backward bf16, amax in it" : "gelu forward bf16, amax in it",
             median_ms([&] { gelu(backward, amax.producer); }), bytes);
    }
  }
  {
    // One block's MLP as the step runs it, forward and backward (fc, GELU, proj2 adding into the
    // residual stream; proj2's backward, GELU', fc's backward), with the GELU in kernels (their
    // producer amaxes under nvfp4, as in training) and in the GEMMs' epilogues (LinearContext::
    // gelu_in_gemm). Each run starts from the same BF16 input and proj2 dY (copies, in both).
    auto x_in = random_bf16_buffer(tokens * d, 1.0f, 20), dy_in = random_bf16_buffer(tokens * d, 1e-3f, 21);
    auto w_fc = random_buffer(hidden * d, 0.02f, 22), w_proj2 = random_buffer(d * hidden, 0.02f, 23);
    DeviceBuffer<float> y(static_cast<size_t>(tokens * d));
    DeviceBuffer<nibble::bf16_t> pre(static_cast<size_t>(tokens * hidden)), dact(pre.size()), dx(y.size());
    y.zero();
    const auto copy = [](nibble::bf16_t* dst, const DeviceBuffer<nibble::bf16_t>& src) {
      nibble::bench::check(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(nibble::bf16_t),
                                           cudaMemcpyDeviceToDevice, nullptr), "copy");
    };
    for (const char* recipe : {"bf16", "nvfp4"}) {
      float ms[2] = {};
      for (const bool in_gemm : {false, true}) {
        ncu::LinearContext ctx;
        ctx.gelu_in_gemm = in_gemm;
        ncu::LinearCuda fc(d, hidden, nibble::nn::preset(recipe), {2, 1}, ctx);
        ncu::LinearCuda proj2(hidden, d, nibble::nn::preset(recipe), {3, 1}, ctx);
        fc.upload_weight(w_fc.download());
        proj2.upload_weight(w_proj2.download());
        const bool fwd_epilogue = in_gemm && fc.fprop_takes_gelu();
        const bool bwd_epilogue = in_gemm && proj2.dgrad_takes_gelu();
        const auto gelu = nibble::nn::MlpKind::kGelu;
        const auto step = [&] {
          copy(fc.bf16_input(tokens), x_in);
          if (fwd_epilogue) {
            fc.forward_bf16_input_gelu(tokens, proj2, pre.data(), nullptr);
          } else {
            fc.forward_bf16_input(tokens, pre.data(), nullptr);
            nibble::bf16_t* act = proj2.bf16_input(tokens);
            ncu::activation_forward(gelu, pre.data(), tokens, hidden, act, nullptr,
                                    proj2.bf16_input_amax(tokens, nullptr));
          }
          proj2.forward_bf16_input(tokens, y.data(), nullptr, /*accumulate=*/true);
          copy(proj2.bf16_dy_input(), dy_in);
          if (bwd_epilogue) {
            proj2.backward_bf16_input_gelu(fc, pre.data(), nullptr);
          } else {
            proj2.backward_bf16_input(dact.data(), nullptr);
            ncu::activation_backward(gelu, pre.data(), dact.data(), tokens, hidden, fc.bf16_dy_input(), nullptr,
                                     fc.bf16_dy_amax(nullptr));
          }
          fc.backward_bf16_input(dx.data(), nullptr);
        };
        ms[in_gemm] = median_ms(step, 20);
        const char* where = fwd_epilogue && bwd_epilogue ? "in fprop + dgrad" : "kernels";
        char what[96];
        std::snprintf(what, sizeof what, "mlp fwd+bwd %s, gelu %s", recipe, where);
        std::printf("%-44s %9.3f ms\n", what, ms[in_gemm]);
      }
      std::printf("mlp fwd+bwd %s: gelu in gemm saves %.3f ms a block\n", recipe, ms[0] - ms[1]);
    }
  }
  {
    // Useful FLOPs of causal attention: QK^T and PV over the T (T + 1) / 2 unmasked scores
    // forward; backward 5 such products (dV, dP, dS Q, dS K, and the recomputed QK^T).
    const double fwd_flops = 2.0 * 2.0 * B * H * (T * (T + 1) / 2.0) * (d / H);
    const double bwd_flops = 2.5 * fwd_flops;
    const auto print_forward_backward = [&](const char* name, float fwd, float both) {
      std::printf("attention core %-14s forward          %9.3f ms  %8.1f TFLOP/s (causal)\n", name, fwd,
                  fwd_flops / (fwd * 1e-3) / 1e12);
      std::printf("attention core %-14s backward         %9.3f ms  %8.1f TFLOP/s (causal)\n", name, both - fwd,
                  bwd_flops / ((both - fwd) * 1e-3) / 1e12);
    };
    auto qkv = random_buffer(tokens * 3 * d, 1.0f, 7), dout = random_buffer(tokens * d, 1.0f, 8);
    DeviceBuffer<float> out(static_cast<size_t>(tokens * d)), dqkv(qkv.size());
    // The fused kernels with the Hopper forward where it applies (wgmma: this shape on an sm_90
    // device), the fused kernels with mma.sync only, and the batched-GEMM core.
    struct Choice {
      const char* name;
      ncu::AttentionKernel kernel;
      bool wgmma;
      float both;
    } choices[] = {{"fused", ncu::AttentionKernel::kFused, true, 0.0f},
                   {"fused mma.sync", ncu::AttentionKernel::kFused, false, 0.0f},
                   {"gemm", ncu::AttentionKernel::kGemm, true, 0.0f}};
    for (Choice& choice : choices) {
      const auto kernel = choice.kernel;
      const char* name = choice.name;
      ncu::detail::set_flash_wgmma(choice.wgmma);
      size_t free_before = 0, free_after = 0, total = 0;
      nibble::bench::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
      nibble::cuda::GemmRunner gemm;
      ncu::AttentionWorkspace workspace;
      ncu::AttentionCoreCuda attn({d, H, H, false, 10000.0f}, gemm, workspace, kernel);
      const float fwd = median_ms([&] { attn.forward(qkv.data(), B, T, out.data(), nullptr); }, 20);
      const float both = median_ms([&] {
        attn.forward(qkv.data(), B, T, out.data(), nullptr);
        attn.backward(dout.data(), dqkv.data(), nullptr);
      }, 20);
      nibble::bench::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
      ncu::detail::set_flash_wgmma(true);
      choice.both = both;
      print_forward_backward(name, fwd, both);
      std::printf("attention core %-14s forward+backward %9.3f ms  %8.1f TFLOP/s (causal), %.0f MiB held\n", name,
                  both, (fwd_flops + bwd_flops) / (both * 1e-3) / 1e12,
                  (static_cast<double>(free_before) - static_cast<double>(free_after)) / (1 << 20));
    }
    {
      // As the GPT step runs it: q, k and v read in place from the BF16 qkv, the output in BF16 (the
      // projection's input), dO in BF16 and d_qkv written in BF16. No packing passes but dO's.
      auto qkv16 = random_bf16_buffer(tokens * 3 * d, 1.0f, 7), dout16 = random_bf16_buffer(tokens * d, 1.0f, 8);
      DeviceBuffer<nibble::bf16_t> out16(static_cast<size_t>(tokens * d)), dqkv16(qkv16.size());
      nibble::cuda::GemmRunner gemm;
      ncu::AttentionWorkspace workspace;
      ncu::AttentionCoreCuda attn({d, H, H, false, 10000.0f}, gemm, workspace, ncu::AttentionKernel::kFused);
      const float fwd = median_ms([&] { attn.forward_kept(qkv16.data(), B, T, out16.data(), nullptr); }, 20);
      const float both = median_ms([&] {
        attn.forward_kept(qkv16.data(), B, T, out16.data(), nullptr);
        attn.backward(dout16.data(), dqkv16.data(), nullptr);
      }, 20);
      print_forward_backward("BF16 in place", fwd, both);
      // Under nvfp4, proj's and qkv's fused passes need the amax of out16 and d_qkv: their amax
      // kernels after the core, or the words computed in its kernels (ProducerAmax, what training does).
      PassAmax amax;
      const float passes = median_ms([&] {
        attn.forward_kept(qkv16.data(), B, T, out16.data(), nullptr);
        amax.amax_pass(out16.data(), tokens, d);
        attn.backward(dout16.data(), dqkv16.data(), nullptr);
        amax.amax_pass(dqkv16.data(), tokens, 3 * d);
      }, 20);
      const float in_kernels = median_ms([&] {
        attn.forward_kept(qkv16.data(), B, T, out16.data(), nullptr, amax.producer);
        attn.backward(dout16.data(), dqkv16.data(), nullptr, amax.producer);
      }, 20);
      std::printf("attention core BF16 in place, fwd+bwd + amax passes    %9.3f ms\n", passes);
      std::printf("attention core BF16 in place, fwd+bwd, amax in kernels %9.3f ms (x 12 layers: %.3f ms saved a "
                  "step)\n", in_kernels, 12 * (passes - in_kernels));
    }
    std::printf("attention core forward+backward: fused %.2fx faster than gemm (x 12 layers: %.1f ms saved a step), "
                "%.2fx faster than fused mma.sync\n",
                choices[2].both / choices[0].both, 12 * (choices[2].both - choices[0].both),
                choices[1].both / choices[0].both);
  }
  {
    // The loss alone, both kernels (the staged one is the default): in place over the whole batch's
    // FP32 logits, and one chunk of the chunked LM head (BF16 logits, BF16 gradient in place, as in
    // training; the repeated runs take the last run's gradient for logits, the same work). Traffic:
    // each logit read once and its gradient written once (the strided kernel reads the logits three times).
    auto logits = random_buffer(tokens * vocab, 2.0f, 9);
    DeviceBuffer<double> loss(1);
    const int64_t chunk = ncu::LmHeadLossCuda::default_chunk_rows(vocab);
    auto chunk16 = random_bf16_buffer(chunk * vocab, 2.0f, 10);
    auto* const chunk_logits = reinterpret_cast<__nv_bfloat16*>(chunk16.data());
    for (const auto kernel : {ncu::CrossEntropyKernel::kStaged, ncu::CrossEntropyKernel::kStrided}) {
      const bool staged = kernel == ncu::CrossEntropyKernel::kStaged;
      ncu::CrossEntropyCuda ce(kernel);
      if (staged && !ce.staged(vocab)) std::printf("(the staged kernel does not fit this device: both run strided)\n");
      report(staged ? "cross-entropy fwd+bwd (in place)" : "cross-entropy in place, strided", median_ms([&] {
               ce.forward_backward(logits.data(), d_ids.data(), tokens, vocab, 1.0f / tokens, loss.data(), nullptr);
             }, 20), 8.0 * tokens * vocab);
      char what[64];
      std::snprintf(what, sizeof what, "cross-entropy chunk of %lld%s", static_cast<long long>(chunk),
                    staged ? "" : ", strided");
      report(what, median_ms([&] {
               ce.chunk(chunk_logits, d_ids.data(), 0, chunk, tokens, vocab, 1.0f / tokens, chunk_logits, nullptr);
             }, 20), 4.0 * chunk * vocab);
    }
  }
  {
    // The LM head + loss of one step, as GptCuda ran it before (LinearCuda under bf16 on the full FP32
    // logits, the loss in place, the logits' gradient converted to BF16) and chunked (LmHeadLossCuda).
    // Memory: what each one's buffers add on the device, measured around its first call.
    auto h = random_buffer(tokens * d, 1.0f, 12), w = random_buffer(vocab * d, 0.02f, 13);
    DeviceBuffer<float> dh(static_cast<size_t>(tokens * d)), dw(static_cast<size_t>(vocab * d));
    DeviceBuffer<double> loss(1);
    const float scale = 1.0f / tokens;
    const double flops = 3 * 2.0 * tokens * vocab * d;  // Fprop, Dgrad, Wgrad
    {
      const int64_t before = device_bytes_in_use();
      ncu::LinearContext ctx;
      ncu::LinearCuda head(d, vocab, nibble::nn::preset("bf16"), {}, ctx);
      head.upload_weight(w.download());
      ncu::CrossEntropyCuda ce;
      DeviceBuffer<float> logits(static_cast<size_t>(tokens * vocab));
      const auto step = [&] {
        head.weight_changed();  // as after an optimizer step
        head.forward(h.data(), tokens, logits.data(), nullptr);
        ce.forward_backward(logits.data(), d_ids.data(), tokens, vocab, scale, loss.data(), nullptr);
        head.backward(logits.data(), dh.data(), nullptr);
      };
      step();
      nibble::bench::check(cudaDeviceSynchronize(), "unchunked head");
      const int64_t used = device_bytes_in_use() - before;
      const float ms = median_ms(step, 20);
      std::printf("%-34s %9.3f ms  %8.1f TFLOP/s  %lld MiB of buffers\n", "LM head+loss unchunked (before)", ms,
                  flops / (ms * 1e-3) / 1e12, static_cast<long long>(used >> 20));
    }
    // The default chunk (LmHeadLossCuda::kChunkLogitBytes) and others around it, to choose that
    // constant: smaller chunks save memory but re-read dW (vocab x d FP32) once more per chunk and
    // give the Dgrad GEMM (chunk x d outputs) fewer tiles.
    const int64_t default_rows = ncu::LmHeadLossCuda::default_chunk_rows(vocab);
    for (const int64_t chunk : {default_rows / 4, default_rows / 2, default_rows, 2 * default_rows, tokens}) {
      const int64_t before = device_bytes_in_use();
      nibble::cuda::GemmRunner gemm;
      ncu::LmHeadLossCuda head(d, vocab, gemm);
      head.set_chunk_rows(chunk);
      const auto step = [&] {
        head.weight_changed();
        head.forward_backward(w.data(), h.data(), d_ids.data(), tokens, scale, loss.data(), dh.data(), dw.data(),
                              nullptr);
      };
      step();
      nibble::bench::check(cudaDeviceSynchronize(), "chunked head");
      const int64_t used = device_bytes_in_use() - before;
      const float ms = median_ms(step, 20);
      char what[64];
      std::snprintf(what, sizeof what, "LM head+loss chunks of %lld%s",
                    static_cast<long long>(head.rows_per_chunk(tokens)), chunk == default_rows ? " (default)" : "");
      std::printf("%-34s %9.3f ms  %8.1f TFLOP/s  %lld MiB of buffers\n", what, ms, flops / (ms * 1e-3) / 1e12,
                  static_cast<long long>(used >> 20));
      if (chunk == default_rows) {
        const float eval =
            median_ms([&] { head.loss(w.data(), h.data(), d_ids.data(), tokens, loss.data(), nullptr); }, 20);
        std::printf("%-34s %9.3f ms\n", "LM head+loss default, eval only", eval);
        // As the step runs it: the weight's BF16 copy kept (the optimizer writes it) and the hidden
        // rows already in BF16 (the final norm writes them; here the last call's conversion).
        const float as_step = median_ms([&] {
          head.forward_backward_bf16_hidden(w.data(), d_ids.data(), tokens, scale, loss.data(), dh.data(), dw.data(),
                                            nullptr);
        }, 20);
        std::printf("%-34s %9.3f ms\n", "LM head+loss default, no conversions", as_step);
      }
    }
  }
  {
    const int64_t n = 124'000'000;
    nibble::train::cuda::AdamWCuda opt({}, n);
    auto w = random_buffer(n, 0.02f, 10), g = random_buffer(n, 1e-3f, 11);
    const nibble::train::cuda::ParamRange all{0, n, true};
    report("adamw step (124M params)", median_ms([&] { opt.step(w.data(), g.data(), {&all, 1}, 1e-4, nullptr, nullptr); }, 20),
           7.0 * n * 4);
    nibble::train::cuda::GradNormCuda gn;
    DeviceBuffer<double> norm(1);
    const nibble::train::cuda::GradSpan span{g.data(), n};
    report("grad norm (124M params)", median_ms([&] { gn.compute({&span, 1}, norm.data(), nullptr); }, 20), 1.0 * n * 4);
  }
  return 0;
}
