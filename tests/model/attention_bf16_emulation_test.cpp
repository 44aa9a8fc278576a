// Justifies the GPU attention test's tolerances (model/attention_bf16_tolerance.h) without a GPU:
// emulates, in double, the GPU attention core's BF16 roundings (q, k, v, P, dO, dS; FP32 scores,
// softmax, dP and outputs) and measures its error against the same computation without rounding,
// on the GPU test's shapes and input scale. RoPE is left out: it acts before the rounding.
//
// Prints the largest errors over the seeds; NIBBLE_ATTN_EMULATION_SEEDS=<n> runs n seeds per shape
// (default 20; the figures in the tolerance header come from 1000).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <vector>

#include "model/attention_bf16_tolerance.h"
#include "nibble/formats/minifloat.h"
#include "test_seed.h"

namespace nibble {
namespace {

struct Shape {
  int64_t d_model, heads, kv_heads, batch, seq;
};

struct Errors {  // normwise max and RMS relative errors, forward output and d_qkv's three parts
  double max_fwd = 0, rms_fwd = 0, max_bwd = 0, rms_bwd = 0;
};

double bf16_round(double x) { return BF16::decode(BF16::encode(static_cast<float>(x), Rounding::kNearestEven)); }
double f32_round(double x) { return static_cast<float>(x); }

// Which computation attention() carries out: exact (double, no rounding), or one of the GPU core's
// two kernels with their roundings (nn/cuda/attention_cuda.cu):
// - kGemm: the batched-GEMM core. P = softmax(S) in FP32, rounded to BF16 after normalisation;
//   dS = P (dP - rowsum(P dP)).
// - kFlash: the fused kernels. Keys are visited in tiles of kFlashTile; each tile's
//   exp(s - m) is rounded to BF16 relative to the running row maximum m at that tile (rescaled in
//   FP32 when m grows) and the row sum l of the unrounded terms divides at the end; O is saved in
//   BF16, and backward takes D = rowsum(dO O) from the BF16 dO and O instead of rowsum(P dP).
enum class Mode { kExact, kGemm, kFlash };
constexpr int64_t kFlashTile = 64;

// Forward output [rows x H hd] and d_qkv [rows x (H + 2 KV) hd] of causal attention.
struct Result {
  std::vector<double> out, dqkv;
};
Result attention(const Shape& s, const std::vector<float>& qkv, const std::vector<float>& dout, Mode mode) {
  const int64_t H = s.heads, KV = s.kv_heads, hd = s.d_model / H, group = H / KV, T = s.seq;
  const int64_t width = (H + 2 * KV) * hd, out_width = H * hd;
  const bool rounded = mode != Mode::kExact;
  const auto op = [&](double x) { return rounded ? bf16_round(x) : x; };   // a BF16 operand
  const auto f32 = [&](double x) { return rounded ? f32_round(x) : x; };   // an FP32 result
  const double scale = 1.0 / std::sqrt(static_cast<double>(static_cast<float>(hd)));
  Result r{std::vector<double>(static_cast<size_t>(s.batch * T * out_width)),
           std::vector<double>(static_cast<size_t>(s.batch * T * width))};
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      const auto at = [&](int64_t t, int64_t col) { return (b * T + t) * width + col; };
      const auto q = [&](int64_t t, int64_t c) { return op(qkv[at(t, h * hd + c)]); };
      const auto k = [&](int64_t t, int64_t c) { return op(qkv[at(t, (H + g) * hd + c)]); };
      const auto v = [&](int64_t t, int64_t c) { return op(qkv[at(t, (H + KV + g) * hd + c)]); };
      const auto dO = [&](int64_t t, int64_t c) { return op(dout[(b * T + t) * out_width + h * hd + c]); };
      // p: FP32 probabilities (forward's for kGemm, backward's recomputation from the lse for kFlash);
      // pv: the BF16 operand of the PV product (normalised for kGemm, unnormalised for kFlash).
      std::vector<double> p(static_cast<size_t>(T * T), 0.0), pv(p.size(), 0.0), ds(p.size(), 0.0);
      std::vector<double> norm(static_cast<size_t>(T), 1.0), delta(static_cast<size_t>(T), 0.0);
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> row(static_cast<size_t>(i + 1));
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < hd; ++c) dot += q(i, c) * k(j, c);
          row[j] = f32(f32(dot) * scale);
        }
        if (mode != Mode::kFlash) {
          const double mx = *std::max_element(row.begin(), row.end());
          double sum = 0;
          for (double x : row) sum += std::exp(x - mx);
          for (int64_t j = 0; j <= i; ++j) p[i * T + j] = f32(std::exp(row[j] - mx) / sum), pv[i * T + j] = op(p[i * T + j]);
          continue;
        }
        // Online softmax over key tiles: pv_j = bf16(exp(s_j - m_tile)) * exp(m_tile - m_final), so
        // that O = sum_j pv_j v_j / l with l = sum_j exp(s_j - m_final).
        double m = -INFINITY;
        std::vector<double> m_at(static_cast<size_t>(i + 1));
        for (int64_t j0 = 0; j0 <= i; j0 += kFlashTile) {
          const int64_t j1 = std::min(j0 + kFlashTile, i + 1);
          m = std::max(m, *std::max_element(row.begin() + j0, row.begin() + j1));
          for (int64_t j = j0; j < j1; ++j) m_at[j] = m;
        }
        double l = 0;
        for (int64_t j = 0; j <= i; ++j) {
          l += std::exp(row[j] - m);
          pv[i * T + j] = op(std::exp(row[j] - m_at[j])) * std::exp(m_at[j] - m);
        }
        norm[i] = l;
        const double lse = f32(m + std::log(l));
        for (int64_t j = 0; j <= i; ++j) p[i * T + j] = f32(std::exp(row[j] - lse));
      }
      for (int64_t i = 0; i < T; ++i) {
        double d = 0;
        for (int64_t c = 0; c < hd; ++c) {
          double o = 0;
          for (int64_t j = 0; j <= i; ++j) o += pv[i * T + j] * v(j, c);
          o = f32(o / norm[i]);
          r.out[(b * T + i) * out_width + h * hd + c] = o;
          d += dO(i, c) * op(o);  // kFlash's D, from the saved BF16 O
        }
        delta[i] = f32(d);
      }
      for (int64_t i = 0; i < T; ++i) {  // dS = scale * P (dP - D), dP = dO v^T
        std::vector<double> dp(static_cast<size_t>(i + 1));
        double rowsum = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < hd; ++c) dot += dO(i, c) * v(j, c);
          dp[j] = f32(dot);
          rowsum += p[i * T + j] * dp[j];
        }
        const double d = mode == Mode::kFlash ? delta[i] : f32(rowsum);
        for (int64_t j = 0; j <= i; ++j) ds[i * T + j] = op(f32(scale * p[i * T + j] * (dp[j] - d)));
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < hd; ++c) {
          double dq = 0, dk = 0, dv = 0;
          for (int64_t j = 0; j <= t; ++j) dq += ds[t * T + j] * k(j, c);
          for (int64_t i = t; i < T; ++i) dk += ds[i * T + t] * q(i, c), dv += op(p[i * T + t]) * dO(i, c);
          r.dqkv[at(t, h * hd + c)] = dq;
          r.dqkv[at(t, (H + g) * hd + c)] += dk;  // the group's heads add up
          r.dqkv[at(t, (H + KV + g) * hd + c)] += dv;
        }
    }
  return r;
}

// Normwise errors of columns [begin, end) of rows of `width`; nullopt where the reference is zero
// there (the q and k gradients at seq 1, where every row attends only to itself).
std::optional<std::pair<double, double>> errors(const std::vector<double>& got, const std::vector<double>& want,
                                                int64_t width, int64_t begin, int64_t end) {
  double max_err = 0, max_ref = 0, sq_err = 0, sq_ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const int64_t col = static_cast<int64_t>(i) % width;
    if (col < begin || col >= end) continue;
    const double e = got[i] - want[i];
    max_err = std::max(max_err, std::fabs(e));
    max_ref = std::max(max_ref, std::fabs(want[i]));
    sq_err += e * e;
    sq_ref += want[i] * want[i];
  }
  if (max_ref == 0) return std::nullopt;
  return std::pair{max_err / max_ref, std::sqrt(sq_err / sq_ref)};
}

TEST(AttentionBf16Emulation, ErrorsStayWithinTheGpuTestTolerances) {
  std::mt19937_64 rng(test::fresh_seed());
  const char* env = std::getenv("NIBBLE_ATTN_EMULATION_SEEDS");
  const int seeds = env != nullptr && *env != '\0' ? std::atoi(env) : 20;
  // The shapes of tests/cuda/layers_cuda_test.cpp, but for its two of seq 1024 (too slow here; the
  // seq 200 and 100 shapes have rows spanning 4 and 2 key tiles).
  for (const Shape s : {Shape{96, 6, 2, 2, 37}, Shape{96, 6, 6, 3, 31}, Shape{192, 6, 3, 3, 37},
                        Shape{120, 6, 2, 2, 45}, Shape{64, 4, 1, 1, 64}, Shape{192, 3, 3, 2, 67},
                        Shape{256, 2, 1, 2, 100}, Shape{256, 4, 2, 3, 1}, Shape{256, 4, 2, 1, 200}}) {
    const int64_t hd = s.d_model / s.heads, width = (s.heads + 2 * s.kv_heads) * hd, rows = s.batch * s.seq;
    Errors worst[2], least[2] = {{1, 1, 1, 1}, {1, 1, 1, 1}};
    for (int n = 0; n < seeds; ++n) {
      std::normal_distribution<float> qkv_dist(0.0f, test::kAttnQkvStddev), unit(0.0f, 1.0f);
      std::vector<float> qkv(static_cast<size_t>(rows * width)), dout(static_cast<size_t>(rows * s.heads * hd));
      for (float& x : qkv) x = qkv_dist(rng);
      for (float& x : dout) x = unit(rng);
      const Result exact = attention(s, qkv, dout, Mode::kExact);
      for (int m = 0; m < 2; ++m) {
        const Result rounded = attention(s, qkv, dout, m == 0 ? Mode::kGemm : Mode::kFlash);
        const auto [max_fwd, rms_fwd] = *errors(rounded.out, exact.out, s.heads * hd, 0, s.heads * hd);
        worst[m].max_fwd = std::max(worst[m].max_fwd, max_fwd);
        worst[m].rms_fwd = std::max(worst[m].rms_fwd, rms_fwd);
        least[m].rms_fwd = std::min(least[m].rms_fwd, rms_fwd);
        // q, k, v parts of d_qkv separately, as the GPU test compares them
        const int64_t bounds[4] = {0, s.heads * hd, (s.heads + s.kv_heads) * hd, width};
        for (int part = 0; part < 3; ++part) {
          const auto e = errors(rounded.dqkv, exact.dqkv, width, bounds[part], bounds[part + 1]);
          if (!e) continue;
          worst[m].max_bwd = std::max(worst[m].max_bwd, e->first);
          worst[m].rms_bwd = std::max(worst[m].rms_bwd, e->second);
          least[m].rms_bwd = std::min(least[m].rms_bwd, e->second);
        }
      }
    }
    for (int m = 0; m < 2; ++m) {
      std::printf("[ emulate  ] %s D%lld H%lld KV%lld B%lld T%lld, %d seeds: worst max/rms forward %.2e/%.2e, "
                  "backward %.2e/%.2e\n",
                  m == 0 ? "gemm " : "flash", static_cast<long long>(s.d_model), static_cast<long long>(s.heads),
                  static_cast<long long>(s.kv_heads), static_cast<long long>(s.batch), static_cast<long long>(s.seq),
                  seeds, worst[m].max_fwd, worst[m].rms_fwd, worst[m].max_bwd, worst[m].rms_bwd);
      EXPECT_LE(worst[m].max_fwd, test::kAttnMaxFwd);
      EXPECT_LE(worst[m].rms_fwd, test::kAttnRmsFwd);
      EXPECT_LE(worst[m].max_bwd, test::kAttnMaxBwd);
      EXPECT_LE(worst[m].rms_bwd, test::kAttnRmsBwd);
      // The emulation does round: errors of the order of BF16's 2^-9, not zero.
      EXPECT_GT(least[m].rms_fwd, 1.0 / 2048);
      EXPECT_GT(least[m].rms_bwd, 1.0 / 2048);
    }
  }
}

}  // namespace
}  // namespace nibble
