// The CPU toy decoder (SPEC 5) against the reference's decode trace, an independent float64
// step, and properties (empty keep-sets, batch independence, bad input).
//
// Tolerances, and why:
// - trace hidden: |ours - ref| <= 2e-5 + 2e-5 |ref|. Both sides are float32 with different
//   summation orders (GEMVs of 128..256 terms, a softmax over 97 chunks, two residual
//   layers, then a final RMSNorm to O(1) values): a few ulp per operation, ~1e-6 observed.
// - trace tokens: exact (the argmax of logits whose top-2 gap is far above that noise; a
//   gap under 1e-4 would be reported as a near-tie, none are expected).
// - float64 step: float32 vs exact arithmetic, tiny sizes: 1e-5 absolute + 1e-5 relative on
//   hidden and logits and 1e-6 on attention probabilities (float32 relative eps 6e-8 times
//   a few dozen operations in series).
// - batched vs one-row calls: 1e-5 (the batched call may take Eigen's GEMM instead of the
//   row-by-row dot, a different summation order; the math is the same).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"
#include "tests/fixtures.hpp"
#include "toy_model/decoder.hpp"

using namespace flashmem;
using flashmem::testing::fixture;

namespace {

std::shared_ptr<const ToyDecoderWeights> small_weights() {
  static auto w = std::make_shared<const ToyDecoderWeights>(load_toy_decoder(fixture("toy_decoder_small.safetensors")));
  return w;
}

// ---- independent float64 step (written from SPEC 5, shares no code with the decoder) ----
struct RefStep {
  std::vector<double> hidden, logits, attention;  // [B,D], [B,V], [L,B,H,N]
};

std::vector<double> ref_rmsnorm(const std::vector<double>& x, const std::vector<float>& w) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + 1e-6);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * w[i];
  return y;
}

// y = W x, W row-major [out, in].
std::vector<double> ref_matvec(const std::vector<float>& W, const std::vector<double>& x, size_t out) {
  const size_t in = x.size();
  std::vector<double> y(out, 0.0);
  for (size_t r = 0; r < out; ++r)
    for (size_t c = 0; c < in; ++c) y[r] += static_cast<double>(W[r * in + c]) * x[c];
  return y;
}

RefStep ref_step(const ToyDecoderWeights& w, const std::vector<int64_t>& tokens, const std::vector<uint8_t>& keep) {
  const size_t B = tokens.size(), D = w.hidden, V = w.vocab, N = w.chunks, H = w.heads, hs = D / H, L = w.layers.size();
  RefStep out;
  out.attention.assign(L * B * H * N, 0.0);
  // keys/values of every chunk: K[n] = wk * memory[n]
  std::vector<std::vector<std::vector<double>>> K(L), Vv(L);
  for (size_t l = 0; l < L; ++l)
    for (size_t n = 0; n < N; ++n) {
      std::vector<double> m(w.memory.begin() + n * D, w.memory.begin() + (n + 1) * D);
      K[l].push_back(ref_matvec(w.layers[l].wk, m, D));
      Vv[l].push_back(ref_matvec(w.layers[l].wv, m, D));
    }
  for (size_t b = 0; b < B; ++b) {
    std::vector<double> x(w.embed.begin() + tokens[b] * D, w.embed.begin() + (tokens[b] + 1) * D);
    for (size_t l = 0; l < L; ++l) {
      const auto& ly = w.layers[l];
      const auto q = ref_matvec(ly.wq, ref_rmsnorm(x, ly.attn_norm), D);
      std::vector<double> att(D, 0.0);
      for (size_t h = 0; h < H; ++h) {
        std::vector<double> s(N);
        double m = -INFINITY;
        for (size_t n = 0; n < N; ++n) {
          if (!keep.empty() && !keep[b * N + n]) continue;
          double dot = 0;
          for (size_t j = 0; j < hs; ++j) dot += q[h * hs + j] * K[l][n][h * hs + j];
          s[n] = dot / std::sqrt(static_cast<double>(hs));
          m = std::max(m, s[n]);
        }
        if (m == -INFINITY) continue;  // empty kept set: contributes zero
        double sum = 0;
        for (size_t n = 0; n < N; ++n)
          if (keep.empty() || keep[b * N + n]) sum += std::exp(s[n] - m);
        for (size_t n = 0; n < N; ++n) {
          if (!keep.empty() && !keep[b * N + n]) continue;
          const double p = std::exp(s[n] - m) / sum;
          out.attention[((l * B + b) * H + h) * N + n] = p;
          for (size_t j = 0; j < hs; ++j) att[h * hs + j] += p * Vv[l][n][h * hs + j];
        }
      }
      const auto o = ref_matvec(ly.wo, att, D);
      for (size_t i = 0; i < D; ++i) x[i] += o[i];
      auto u = ref_matvec(ly.mlp_up, ref_rmsnorm(x, ly.mlp_norm), 2 * D);
      for (double& v : u) v = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
      const auto d = ref_matvec(ly.mlp_down, u, D);
      for (size_t i = 0; i < D; ++i) x[i] += d[i];
    }
    const auto hid = ref_rmsnorm(x, w.final_norm);
    const auto lg = ref_matvec(w.lm_head, hid, V);
    out.hidden.insert(out.hidden.end(), hid.begin(), hid.end());
    out.logits.insert(out.logits.end(), lg.begin(), lg.end());
  }
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b, double abs_tol, double rel_tol,
                    int* violations) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    worst = std::max(worst, d);
    if (!(d <= abs_tol + rel_tol * std::fabs(b[i]))) ++*violations;
  }
  return worst;
}

}  // namespace

TEST_CASE("toy decoder: loads the small checkpoint with its sizes") {
  const auto& w = *small_weights();
  CHECK(w.hidden == 128);
  CHECK(w.heads == 8);
  CHECK(w.vocab == 512);
  CHECK(w.chunks == 97);
  CHECK(w.layers.size() == 2);
}

TEST_CASE("toy decoder: teacher-forced reference trace (topk and threshold runs)") {
  auto weights = small_weights();
  auto decoder = make_decoder(Device::Cpu, weights);
  const auto trace = SafetensorsFile::open(fixture("toy_trace_small.safetensors"));
  const auto config = trace.read_i64("config");  // N, steps, tau, top-k, B, heads, vocab, max_position
  REQUIRE(config[0] == weights->chunks);
  const int64_t N = config[0], steps = config[1], tau = config[2], B = config[4], D = weights->hidden;

  for (const std::string run : {"topk.", "threshold."}) {
    CAPTURE(run);
    const auto prefill = trace.read_i64(run + "prefill_ids");  // [B, 8]
    const auto tokens = trace.read_i64(run + "tokens");        // [steps, B]
    const auto hidden = trace.read_f32(run + "hidden");        // [steps, B, D]
    const auto& keep_view = trace.expect(run + "cycle_keep", {DType::U8}, {-1, B, N});
    const auto keep_all = keep_view.as<uint8_t>();

    // Prefill: all B*8 prompt tokens in one dense call (the step has no token state: its
    // output depends on the token and the keep-row only). Property: same as one-row calls.
    const auto pre = decoder->step(prefill, {}, false);
    REQUIRE(pre.batch == static_cast<int64_t>(prefill.size()));
    CHECK(pre.empty_rows.empty());
    double pre_worst = 0;
    for (size_t r = 0; r < prefill.size(); ++r) {
      const int64_t tok = prefill[r];
      const auto one = decoder->step(std::span<const int64_t>(&tok, 1), {}, false);
      CHECK(one.next_token[0] == pre.next_token[r]);
      for (int64_t i = 0; i < D; ++i) pre_worst = std::max<double>(pre_worst, std::fabs(one.hidden[i] - pre.hidden[r * D + i]));
    }
    CHECK(pre_worst <= 1e-5);

    double worst = 0;
    int bad_hidden = 0, bad_tokens = 0, empty = 0, compared = 0;
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<int64_t> in(B);
      for (int64_t b = 0; b < B; ++b) in[b] = t == 0 ? 0 : tokens[(t - 1) * B + b];  // SPEC 6.2
      const auto keep = keep_all.subspan((t / tau) * B * N, B * N);
      const auto out = decoder->step(in, keep, false);
      empty += static_cast<int>(out.empty_rows.size());
      for (int64_t b = 0; b < B; ++b) {
        bool row_empty = false;
        for (int64_t e : out.empty_rows) row_empty |= e == b;
        if (row_empty) continue;  // the reference holds NaN there; checked below
        ++compared;
        if (out.next_token[b] != tokens[t * B + b]) ++bad_tokens;
        for (int64_t i = 0; i < D; ++i) {
          const double ref = hidden[(t * B + b) * D + i], d = std::fabs(out.hidden[b * D + i] - ref);
          worst = std::max(worst, d);
          if (!(d <= 2e-5 + 2e-5 * std::fabs(ref))) ++bad_hidden;
        }
      }
    }
    MESSAGE(run, " rows compared ", compared, ", empty keep-rows ", empty, ", max |hidden - ref| ", worst);
    CHECK(compared > 0);
    CHECK(bad_hidden == 0);
    CHECK(bad_tokens == 0);
  }
}

TEST_CASE("toy decoder: one step against an independent float64 computation") {
  ToyDecoderShape shape;
  shape.hidden = 40;  // head size 5: not a power of two nor a multiple of the SIMD width
  shape.heads = 8;
  shape.vocab = 61;
  shape.chunks = 23;
  auto w = std::make_shared<const ToyDecoderWeights>(synthetic_toy_decoder(7, shape));
  auto decoder = make_decoder(Device::Cpu, w);
  const int64_t N = shape.chunks;
  // Rows: sparse, dense-by-mask, empty, single chunk, sparse again (a duplicate token).
  const std::vector<int64_t> tokens = {3, 60, 17, 0, 3};
  std::vector<uint8_t> keep(tokens.size() * N, 0);
  for (int64_t n = 0; n < N; ++n) {
    keep[0 * N + n] = n % 3 == 1;
    keep[1 * N + n] = 1;
    keep[4 * N + n] = n % 4 == 0;
  }
  keep[3 * N + 11] = 1;
  for (const bool masked : {true, false}) {
    CAPTURE(masked);
    const std::vector<uint8_t> k = masked ? keep : std::vector<uint8_t>{};
    const auto got = decoder->step(tokens, k, true);
    const auto ref = ref_step(*w, tokens, k);
    int bad = 0;
    const double eh = max_abs_diff(got.hidden, ref.hidden, 1e-5, 1e-5, &bad);
    const double el = max_abs_diff(got.logits, ref.logits, 1e-5, 1e-5, &bad);
    const double ea = max_abs_diff(got.attention, ref.attention, 1e-6, 0.0, &bad);
    MESSAGE("float64 step: max error hidden ", eh, " logits ", el, " attention ", ea);
    CHECK(bad == 0);
    for (size_t b = 0; b < tokens.size(); ++b) {
      const double* lg = ref.logits.data() + b * shape.vocab;
      CHECK(got.next_token[b] == std::max_element(lg, lg + shape.vocab) - lg);
    }
    CHECK(got.empty_rows == (masked ? std::vector<int64_t>{2} : std::vector<int64_t>{}));
  }
}

TEST_CASE("toy decoder: an empty keep-set contributes zero, without NaN, and is counted") {
  auto w = small_weights();
  auto decoder = make_decoder(Device::Cpu, w);
  const int64_t N = w->chunks, D = w->hidden, H = w->heads, L = 2;
  const std::vector<int64_t> tokens = {5, 5, 9};
  std::vector<uint8_t> keep(3 * N, 1);
  std::fill(keep.begin(), keep.begin() + N, 0);           // row 0: nothing kept
  std::fill(keep.begin() + 2 * N, keep.end(), 0);         // row 2: nothing kept
  const auto out = decoder->step(tokens, keep, true);
  CHECK(out.empty_rows == std::vector<int64_t>{0, 2});
  for (float v : out.hidden) REQUIRE(std::isfinite(v));
  for (float v : out.logits) REQUIRE(std::isfinite(v));
  // Attention probabilities: all zero for the empty rows, a distribution for row 1.
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t h = 0; h < H; ++h) {
        double sum = 0;
        for (int64_t n = 0; n < N; ++n) sum += out.attention[((l * 3 + b) * H + h) * N + n];
        CHECK(sum == doctest::Approx(b == 1 ? 1.0 : 0.0).epsilon(1e-5));
      }
  // Property: an empty kept set means the attention sub-layer adds exactly nothing, so the
  // result equals a decoder whose wo is zero (any keep-set), bit for bit.
  auto zero_wo = std::make_shared<ToyDecoderWeights>(*w);
  for (auto& layer : zero_wo->layers) std::fill(layer.wo.begin(), layer.wo.end(), 0.0f);
  auto plain = make_decoder(Device::Cpu, zero_wo);
  const int64_t tok = 5;
  const auto ref = plain->step(std::span<const int64_t>(&tok, 1), {}, false);
  for (int64_t i = 0; i < D; ++i) CHECK(out.hidden[i] == ref.hidden[i]);
}

TEST_CASE("toy decoder: synthetic weights are deterministic, O(1) and not degenerate") {
  ToyDecoderShape shape;
  shape.hidden = 256;
  shape.chunks = 64;
  const auto a = synthetic_toy_decoder(11, shape), b = synthetic_toy_decoder(11, shape), c = synthetic_toy_decoder(12, shape);
  CHECK(a.layers[1].mlp_down == b.layers[1].mlp_down);
  CHECK(a.memory == b.memory);
  CHECK(a.memory != c.memory);
  CHECK(a.memory == synthetic_toy_memory(11, shape.chunks, shape.hidden));
  auto dec = make_decoder(Device::Cpu, std::make_shared<const ToyDecoderWeights>(a));
  // Greedy free-running decode from token 0, dense: the tokens must not collapse to a constant.
  std::vector<int64_t> seen;
  int64_t tok = 0;
  for (int i = 0; i < 32; ++i) {
    const auto out = dec->step(std::span<const int64_t>(&tok, 1), {}, true);
    tok = out.next_token[0];
    seen.push_back(tok);
    double ss = 0;
    for (float v : out.hidden) ss += v * v;
    CHECK(std::sqrt(ss / shape.hidden) == doctest::Approx(1.0).epsilon(0.2));  // final norm ~1 +- 0.1
    // Attention is neither uniform nor one-hot: the top chunk holds 5%..95% of the mass.
    const float top = *std::max_element(out.attention.begin(), out.attention.begin() + shape.chunks);
    CHECK(top > 0.05f);
    CHECK(top < 0.95f);
  }
  std::sort(seen.begin(), seen.end());
  const auto distinct = std::unique(seen.begin(), seen.end()) - seen.begin();
  MESSAGE("distinct tokens in 32 free-running steps: ", distinct);
  CHECK(distinct >= 4);
}

TEST_CASE("toy decoder: bad input is an error naming what is wrong") {
  auto decoder = make_decoder(Device::Cpu, small_weights());
  const std::vector<int64_t> bad_token = {512};
  CHECK_THROWS_WITH_AS(decoder->step(bad_token, {}, false), doctest::Contains("tokens[0] = 512"), Error);
  const std::vector<int64_t> ok = {1, 2};
  const std::vector<uint8_t> short_keep(97, 1);
  CHECK_THROWS_WITH_AS(decoder->step(ok, short_keep, false), doctest::Contains("keep has 97"), Error);
  CHECK_THROWS_AS(decoder->step({}, {}, false), Error);

  // A checkpoint with one weight missing, and one with a wrong shape: the error names the key.
  const auto src = SafetensorsFile::open(fixture("toy_decoder_small.safetensors"));
  for (const std::string& drop : {std::string("mlp_down.1.weight"), std::string("final_norm")}) {
    SafetensorsWriter writer;
    for (const auto& name : src.names())
      if (name != drop) writer.add_f32(name, src.tensor(name).shape, src.read_f32(name));
    const auto path = flashmem::testing::scratch("toy_missing.safetensors");
    writer.write(path);
    CHECK_THROWS_WITH_AS(load_toy_decoder(path), doctest::Contains(drop.c_str()), Error);
  }
  SafetensorsWriter writer;
  for (const auto& name : src.names()) {
    auto shape = src.tensor(name).shape;
    auto values = src.read_f32(name);
    if (name == "wv.0.weight") {
      shape = {128, 127};
      values.resize(128 * 127);
    }
    writer.add_f32(name, shape, values);
  }
  const auto path = flashmem::testing::scratch("toy_shape.safetensors");
  writer.write(path);
  CHECK_THROWS_WITH_AS(load_toy_decoder(path), doctest::Contains("wv.0.weight"), Error);
#ifndef FLASHMEM_HAVE_CUDA
  CHECK_THROWS_WITH_AS(make_decoder(Device::Cuda, small_weights()), doctest::Contains("no CUDA backend"), Error);
#endif
}
