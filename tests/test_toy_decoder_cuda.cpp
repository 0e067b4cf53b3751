// The CUDA toy decoder: each kernel against a CPU reference, then the whole step against the
// CPU backend and the reference trace. Exits 77 (skipped) with the reason when this build
// has no CUDA backend or the machine has no GPU.
//
// Tolerances, and why:
// - compact_keep, argmax, embedding: exact (integer / copy semantics).
// - rmsnorm: 1 ulp-ish (2e-7 relative): same float32 formula, the double sum may round
//   the mean differently in the last place only.
// - gelu: 4e-7 relative + 1e-7 absolute: CUDA's erff and glibc's differ by <= 2 ulp.
// - memattn vs a float64 reference: 2e-6 absolute on outputs of O(1) values and 1e-6 on
//   probabilities: float32 online softmax over <= 3000 chunks (rescaling adds a few ulp).
// - decoder, CUDA vs CPU: hidden and logits 5e-5 + 5e-5 |ref| at D 1024 (cuBLAS and the
//   CPU sum 1024..2048 float32 terms in different orders, two residual layers, then the
//   final RMSNorm; observed errors are printed); tokens exact except near-ties (top-2 logit
//   gap < 1e-3 on the CPU), which are counted and must be rare.
// - trace (D 128): hidden 2e-5 + 2e-5 |ref| as in test_toy_decoder.cpp; tokens exact.
// - reruns: bitwise identical (no atomics; fixed reduction orders).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <vector>

#include "src/formats/safetensors.hpp"
#include "src/retriever/synthetic.hpp"
#include "tests/fixtures.hpp"
#include "toy_model/decoder.hpp"

#ifdef FLASHMEM_TOY_CUDA
#include <cuda_runtime_api.h>

#include "kernels/toy_decoder_kernels.hpp"
#endif

using namespace flashmem;
using flashmem::testing::fixture;

namespace {

// Runs before doctest's main: no backend or no device -> skipped (exit 77) with the reason.
struct SkipWithoutGpu {
  SkipWithoutGpu() {
#ifndef FLASHMEM_TOY_CUDA
    std::printf("SKIP: this build has no CUDA toy decoder (configured without nvcc or with -Dcuda=disabled)\n");
    std::exit(77);
#else
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
      std::printf("SKIP: no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
      std::exit(77);
    }
#endif
  }
} skip_without_gpu;

}  // namespace

#ifdef FLASHMEM_TOY_CUDA
namespace {
namespace tk = kernels::toy;

#define CK(call) REQUIRE((call) == cudaSuccess)

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { CK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(count, 1) * sizeof(T))); }
  Dev(const std::vector<T>& host) : Dev(host.size()) { CK(cudaMemcpy(p, host.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  ~Dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) REQUIRE(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

float uniform(uint64_t stream, uint64_t i) { return pm1(99, stream, i); }

}  // namespace

TEST_CASE("compact_keep: kept indices in order and counts, awkward sizes") {
  for (int N : {1, 15, 16, 97, 16384, 16385, 40000}) {
    CAPTURE(N);
    const int B = 4;
    std::vector<uint8_t> keep(static_cast<size_t>(B) * N);
    for (int n = 0; n < N; ++n) {
      keep[0 * N + n] = 0;                                         // empty
      keep[1 * N + n] = 1;                                         // all
      keep[2 * N + n] = static_cast<uint8_t>((n * 7 + 3) % 10 == 0 ? 255 : 0);  // any nonzero byte counts
      keep[3 * N + n] = uniform(1, n) > 0.8f;
    }
    Dev<uint8_t> d_keep(keep);
    Dev<int32_t> idx(static_cast<size_t>(B) * N), count(B);
    CK(tk::compact_keep(d_keep.p, B, N, idx.p, count.p, nullptr));
    CK(cudaDeviceSynchronize());
    const auto h_idx = idx.get(), h_count = count.get();
    for (int b = 0; b < B; ++b) {
      std::vector<int32_t> expect;
      for (int n = 0; n < N; ++n)
        if (keep[static_cast<size_t>(b) * N + n]) expect.push_back(n);
      REQUIRE(h_count[b] == static_cast<int32_t>(expect.size()));
      CHECK(std::equal(expect.begin(), expect.end(), h_idx.begin() + static_cast<size_t>(b) * N));
    }
  }
}

TEST_CASE("memattn: masked attention against a float64 reference (dense, sparse, empty rows)") {
  struct Size {
    int N, heads, hs;
  };
  for (const Size sz : {Size{97, 8, 16}, Size{97, 8, 5}, Size{3000, 8, 512}, Size{300, 2, 128}, Size{41, 3, 200}}) {
    CAPTURE(sz.N);
    CAPTURE(sz.hs);
    const int B = 3, N = sz.N, H = sz.heads, hs = sz.hs, D = H * hs;
    std::vector<float> q(static_cast<size_t>(B) * D), k(static_cast<size_t>(N) * D), v(static_cast<size_t>(N) * D);
    for (size_t i = 0; i < q.size(); ++i) q[i] = 2.0f * uniform(2, i);
    for (size_t i = 0; i < k.size(); ++i) k[i] = 1.7f * uniform(3, i), v[i] = uniform(4, i);
    std::vector<uint8_t> keep(static_cast<size_t>(B) * N, 0);
    for (int n = 0; n < N; ++n) keep[0 * N + n] = uniform(5, n) > 0.7f, keep[2 * N + n] = 1;  // row 1 empty
    const auto plan = tk::memattn_plan(N);
    Dev<float> dq(q), dk(k), dv(v), out(static_cast<size_t>(B) * D), probs(static_cast<size_t>(B) * H * N),
        ws(tk::memattn_workspace_floats(plan, B, H, hs));
    Dev<uint8_t> dkeep(keep);
    Dev<int32_t> idx(static_cast<size_t>(B) * N), count(B);
    for (const bool dense : {false, true}) {
      CAPTURE(dense);
      CK(cudaMemset(probs.p, 0, probs.n * sizeof(float)));
      if (!dense) CK(tk::compact_keep(dkeep.p, B, N, idx.p, count.p, nullptr));
      tk::MemAttnParams p{dq.p, dk.p, dv.p, dense ? nullptr : idx.p, dense ? nullptr : count.p, B, N, H, hs, plan, ws.p, out.p, probs.p};
      CK(tk::memattn(p, nullptr));
      CK(cudaDeviceSynchronize());
      const auto h_out = out.get(), h_probs = probs.get();
      double worst_out = 0, worst_p = 0;
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
          std::vector<double> s(N, -INFINITY);
          double m = -INFINITY;
          for (int n = 0; n < N; ++n) {
            if (!dense && !keep[static_cast<size_t>(b) * N + n]) continue;
            double dot = 0;
            for (int j = 0; j < hs; ++j) dot += static_cast<double>(q[b * D + h * hs + j]) * k[static_cast<size_t>(n) * D + h * hs + j];
            s[n] = dot / std::sqrt(static_cast<double>(hs));
            m = std::max(m, s[n]);
          }
          double sum = 0;
          for (int n = 0; n < N; ++n) sum += m == -INFINITY ? 0.0 : std::exp(s[n] - m);
          for (int j = 0; j < hs; ++j) {
            double a = 0;
            for (int n = 0; n < N; ++n)
              if (s[n] != -INFINITY) a += std::exp(s[n] - m) / sum * v[static_cast<size_t>(n) * D + h * hs + j];
            worst_out = std::max(worst_out, std::fabs(h_out[b * D + h * hs + j] - a));
          }
          for (int n = 0; n < N; ++n) {
            const double pr = s[n] == -INFINITY ? 0.0 : std::exp(s[n] - m) / sum;
            worst_p = std::max(worst_p, std::fabs(h_probs[(static_cast<size_t>(b) * H + h) * N + n] - pr));
          }
        }
      MESSAGE("memattn N ", N, " hs ", hs, std::string(dense ? " dense" : " masked"), ": max error out ", worst_out, " probs ", worst_p);
      CHECK(worst_out <= 2e-6);
      CHECK(worst_p <= 1e-6);
      for (float x : h_out) REQUIRE(std::isfinite(x));
    }
  }
}

TEST_CASE("row kernels: embedding, rmsnorm, gelu, argmax against CPU references") {
  const int B = 5, D = 1000, V = 517;
  std::vector<float> x(B * D), w(D), embed(V * D), logits(B * V);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 3.0f * uniform(6, i);
  for (int i = 0; i < D; ++i) w[i] = 1.0f + 0.1f * uniform(7, i);
  for (size_t i = 0; i < embed.size(); ++i) embed[i] = uniform(8, i);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::round(8.0f * uniform(9, i));  // many ties
  const std::vector<int64_t> tokens = {0, 516, 3, 3, 200};
  Dev<float> dx(x), dw(w), de(embed), dl(logits), out(B * D);
  Dev<int64_t> dt(tokens), next(B);

  CK(tk::embed_rows(de.p, dt.p, B, D, out.p, nullptr));
  auto h = out.get();
  for (int b = 0; b < B; ++b) CHECK(std::equal(h.begin() + b * D, h.begin() + (b + 1) * D, embed.begin() + tokens[b] * D));

  CK(tk::rmsnorm_rows(dx.p, dw.p, B, D, out.p, nullptr));
  h = out.get();
  double worst = 0;
  for (int b = 0; b < B; ++b) {
    double ss = 0;
    for (int i = 0; i < D; ++i) ss += static_cast<double>(x[b * D + i]) * x[b * D + i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + 1e-6f);
    for (int i = 0; i < D; ++i) {
      const float ref = x[b * D + i] * inv * w[i];
      worst = std::max(worst, std::fabs(h[b * D + i] - ref) / (std::fabs(ref) + 1e-30));
    }
  }
  MESSAGE("rmsnorm max relative error ", worst);
  CHECK(worst <= 2e-7);

  CK(tk::gelu_inplace(dx.p, x.size(), nullptr));
  h = dx.get();
  worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = 0.5 * x[i] * (1.0 + std::erf(x[i] / std::sqrt(2.0)));
    CHECK(std::fabs(h[i] - ref) <= 1e-7 + 4e-7 * std::fabs(ref));
  }

  CK(tk::argmax_rows(dl.p, B, V, next.p, nullptr));
  const auto hn = next.get();
  for (int b = 0; b < B; ++b) CHECK(hn[b] == std::max_element(logits.begin() + b * V, logits.begin() + (b + 1) * V) - (logits.begin() + b * V));
}

TEST_CASE("skinny_linear: the decode-step GEMV against a float64 reference, beta 0 and 1") {
  for (const int in : {4, 1000, 4096}) {
    for (int B = 1; B <= tk::kSkinnyMaxRows; ++B) {
      CAPTURE(in);
      CAPTURE(B);
      const int out = 517;
      std::vector<float> W(static_cast<size_t>(out) * in), x(static_cast<size_t>(B) * in), y0(static_cast<size_t>(B) * out);
      for (size_t i = 0; i < W.size(); ++i) W[i] = uniform(10, i);
      for (size_t i = 0; i < x.size(); ++i) x[i] = uniform(11, i);
      for (size_t i = 0; i < y0.size(); ++i) y0[i] = uniform(12, i);
      for (const float beta : {0.0f, 1.0f}) {
        Dev<float> dW(W), dx(x), dy(y0);
        CK(tk::skinny_linear(dW.p, out, in, dx.p, B, dy.p, beta, nullptr));
        const auto y = dy.get();
        double worst = 0;
        for (int b = 0; b < B; ++b)
          for (int r = 0; r < out; ++r) {
            double ref = beta * static_cast<double>(y0[b * out + r]);
            for (int k = 0; k < in; ++k) ref += static_cast<double>(W[static_cast<size_t>(r) * in + k]) * x[static_cast<size_t>(b) * in + k];
            worst = std::max(worst, std::fabs(y[b * out + r] - ref));
          }
        // float32 sum of `in` products of values in [-1, 1): error <= ~in * eps * E|term|, a few 1e-6 at 4096
        CHECK(worst <= 2e-5);
      }
    }
  }
  CHECK(tk::skinny_linear(nullptr, 8, 6, nullptr, 1, nullptr, 0.0f, nullptr) == cudaErrorInvalidValue);  // in % 4 != 0
}

TEST_CASE("CUDA decoder vs CPU decoder: synthetic D 1024, masks, attention, reruns") {
  ToyDecoderShape shape;
  shape.hidden = 1024;
  shape.chunks = 777;
  auto w = std::make_shared<const ToyDecoderWeights>(synthetic_toy_decoder(5, shape));
  auto cpu = make_decoder(Device::Cpu, w);
  auto gpu = make_decoder(Device::Cuda, w);
  CHECK(std::string(gpu->backend()) == "cuda");
  const int64_t N = shape.chunks, B = 6, V = shape.vocab;
  const std::vector<int64_t> tokens = {0, 1, 511, 42, 42, 300};
  std::vector<uint8_t> keep(B * N, 0);
  for (int64_t n = 0; n < N; ++n) {
    keep[0 * N + n] = pm1(3, 0, n) > 0.8f;  // ~10%
    keep[1 * N + n] = 1;                     // dense by mask
    keep[3 * N + n] = n == 776;              // one chunk
    keep[4 * N + n] = pm1(3, 1, n) > 0.0f;   // ~50%
    keep[5 * N + n] = n < 64;                // a prefix
  }                                          // row 2: empty
  for (const bool masked : {true, false}) {
    CAPTURE(masked);
    const std::vector<uint8_t> k = masked ? keep : std::vector<uint8_t>{};
    const auto a = cpu->step(tokens, k, true), g = gpu->step(tokens, k, true);
    CHECK(g.empty_rows == a.empty_rows);
    double eh = 0, el = 0, ea = 0;
    int bad = 0, near_ties = 0;
    for (size_t i = 0; i < a.hidden.size(); ++i) {
      eh = std::max<double>(eh, std::fabs(a.hidden[i] - g.hidden[i]));
      bad += !testing::close(g.hidden[i], a.hidden[i], 5e-5, 5e-5);
    }
    for (size_t i = 0; i < a.logits.size(); ++i) {
      el = std::max<double>(el, std::fabs(a.logits[i] - g.logits[i]));
      bad += !testing::close(g.logits[i], a.logits[i], 5e-5, 5e-5);
    }
    for (size_t i = 0; i < a.attention.size(); ++i) ea = std::max<double>(ea, std::fabs(a.attention[i] - g.attention[i]));
    for (int64_t b = 0; b < B; ++b) {
      if (a.next_token[b] == g.next_token[b]) continue;
      std::vector<float> row(a.logits.begin() + b * V, a.logits.begin() + (b + 1) * V);
      std::sort(row.rbegin(), row.rend());
      if (row[0] - row[1] < 1e-3f) ++near_ties;
      else ++bad;
    }
    MESSAGE("CUDA vs CPU (D 1024, N 777", std::string(masked ? ", masked" : ", dense"), "): max |dhidden| ", eh, " |dlogits| ", el,
            " |dattention| ", ea, ", token near-ties ", near_ties);
    CHECK(bad == 0);
    CHECK(ea <= 1e-5);
    CHECK(near_ties <= 1);
    for (float v : g.hidden) REQUIRE(std::isfinite(v));
    // The first 3 rows alone take the skinny GEMV (B <= 4) instead of cuBLAS: same tolerance.
    const std::vector<int64_t> t3(tokens.begin(), tokens.begin() + 3);
    const std::vector<uint8_t> k3 = masked ? std::vector<uint8_t>(keep.begin(), keep.begin() + 3 * N) : std::vector<uint8_t>{};
    const auto g3 = gpu->step(t3, k3, false);
    double e3 = 0;
    for (size_t i = 0; i < g3.hidden.size(); ++i) {
      e3 = std::max<double>(e3, std::fabs(a.hidden[i] - g3.hidden[i]));
      CHECK(testing::close(g3.hidden[i], a.hidden[i], 5e-5, 5e-5));
    }
    for (size_t i = 0; i < g3.logits.size(); ++i) CHECK(testing::close(g3.logits[i], a.logits[i], 5e-5, 5e-5));
    for (int b = 0; b < 3; ++b) CHECK(g3.next_token[b] == a.next_token[b]);
    MESSAGE("skinny path (B 3): max |dhidden| ", e3);
    const auto g2 = gpu->step(tokens, k, true);
    CHECK(g2.hidden == g.hidden);
    CHECK(g2.logits == g.logits);
    CHECK(g2.attention == g.attention);
  }
}

TEST_CASE("CUDA decoder: teacher-forced reference trace") {
  auto w = std::make_shared<const ToyDecoderWeights>(load_toy_decoder(fixture("toy_decoder_small.safetensors")));
  auto gpu = make_decoder(Device::Cuda, w);
  const auto trace = SafetensorsFile::open(fixture("toy_trace_small.safetensors"));
  const auto config = trace.read_i64("config");
  const int64_t N = config[0], steps = config[1], tau = config[2], B = config[4], D = w->hidden;
  for (const std::string run : {"topk.", "threshold."}) {
    CAPTURE(run);
    const auto tokens = trace.read_i64(run + "tokens");
    const auto hidden = trace.read_f32(run + "hidden");
    const auto keep_all = trace.expect(run + "cycle_keep", {DType::U8}, {-1, B, N}).as<uint8_t>();
    double worst = 0;
    int bad = 0;
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<int64_t> in(B);
      for (int64_t b = 0; b < B; ++b) in[b] = t == 0 ? 0 : tokens[(t - 1) * B + b];
      const auto out = gpu->step(in, keep_all.subspan((t / tau) * B * N, B * N), false);
      REQUIRE(out.empty_rows.empty());
      for (int64_t b = 0; b < B; ++b) {
        bad += out.next_token[b] != tokens[t * B + b];
        for (int64_t i = 0; i < D; ++i) {
          const double ref = hidden[(t * B + b) * D + i], d = std::fabs(out.hidden[b * D + i] - ref);
          worst = std::max(worst, d);
          bad += !(d <= 2e-5 + 2e-5 * std::fabs(ref));
        }
      }
    }
    MESSAGE(run, " CUDA max |hidden - ref| ", worst);
    CHECK(bad == 0);
  }
}
#endif
