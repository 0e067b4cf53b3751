// The loop's measures against independent float64/long double computations on small sizes,
// and properties (all kept: recall 1, KL 0, top-1 agreement; empty keep-set: counted, no NaN),
// plus the keep rules (sink, tail, cap, budget).
//
// Tolerances: the functions under test accumulate float inputs in double; the references
// below take the same float inputs in long double with a different loop order, so only the
// summation order differs: relative 1e-12 is ~1e4 double ulps of headroom.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "src/loop/config.hpp"
#include "src/loop/loop.hpp"
#include "src/loop/metrics.hpp"
#include "src/loop/policy.hpp"
#include "src/loop/report.hpp"
#include "src/loop/setup.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;
using flashmem::testing::fixture;

namespace {

// Softmax rows of random logits: attention [layers, heads, N] as a decoder would produce.
std::vector<float> random_attention(int64_t L, int64_t H, int64_t N, std::mt19937_64& rng) {
  std::normal_distribution<double> g(0.0, 2.0);
  std::vector<float> a(L * H * N);
  for (int64_t r = 0; r < L * H; ++r) {
    std::vector<double> e(N);
    double s = 0;
    for (auto& v : e) s += (v = std::exp(g(rng)));
    for (int64_t n = 0; n < N; ++n) a[r * N + n] = static_cast<float>(e[n] / s);
  }
  return a;
}

}  // namespace

TEST_CASE("attention-mass recall matches a long double computation") {
  std::mt19937_64 rng(42);
  for (int64_t N : {1, 7, 97, 300}) {
    const int64_t L = 3, H = 5;
    const auto a = random_attention(L, H, N, rng);
    std::vector<uint8_t> keep(N);
    for (auto& k : keep) k = rng() % 3 == 0;
    const auto recall = attention_mass_recall(a, L, H, keep);
    REQUIRE(recall.size() == 3);
    for (int64_t l = 0; l < L; ++l) {
      long double kept = 0, total = 0;
      for (int64_t n = 0; n < N; ++n)  // chunk-major, unlike the function
        for (int64_t h = 0; h < H; ++h) {
          const long double v = a[(l * H + h) * N + n];
          total += v;
          kept += keep[n] ? v : 0.0L;
        }
      CHECK(recall[l] == doctest::Approx(static_cast<double>(kept / total)).epsilon(1e-12));
    }
    CHECK(mean_recall(recall) == doctest::Approx((recall[0] + recall[1] + recall[2]) / 3).epsilon(1e-15));
  }
}

TEST_CASE("recall properties: all kept 1, none kept 0") {
  std::mt19937_64 rng(7);
  const auto a = random_attention(2, 4, 50, rng);
  for (double r : attention_mass_recall(a, 2, 4, std::vector<uint8_t>(50, 1))) CHECK(r == doctest::Approx(1.0).epsilon(1e-15));
  for (double r : attention_mass_recall(a, 2, 4, std::vector<uint8_t>(50, 0))) CHECK(r == 0.0);
}

TEST_CASE("KL(dense || sparse) matches a long double computation") {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> g(0.0f, 3.0f);
  for (int V : {2, 17, 512}) {
    std::vector<float> p(V), q(V);
    for (auto& v : p) v = g(rng);
    for (auto& v : q) v = g(rng);
    long double zp = 0, zq = 0;
    for (int i = 0; i < V; ++i) zp += std::exp(static_cast<long double>(p[i])), zq += std::exp(static_cast<long double>(q[i]));
    long double kl = 0;
    for (int i = 0; i < V; ++i) {
      const long double pi = std::exp(static_cast<long double>(p[i])) / zp, qi = std::exp(static_cast<long double>(q[i])) / zq;
      kl += pi * std::log(pi / qi);
    }
    CHECK(kl_divergence(p, q) == doctest::Approx(static_cast<double>(kl)).epsilon(1e-10));
    CHECK(kl_divergence(p, p) == 0.0);  // identical logits: exactly 0
    CHECK(top1_agree(p, p));
  }
  // Large logits do not overflow (log-softmax form).
  std::vector<float> big{1000.0f, 0.0f, -1000.0f}, other{0.0f, 1000.0f, -1000.0f};
  CHECK(std::isfinite(kl_divergence(big, other)));
  CHECK(kl_divergence(big, other) == doctest::Approx(1000.0).epsilon(1e-12));
  CHECK(!top1_agree(big, other));
  CHECK(argmax(std::vector<float>{1, 3, 3, 2}) == 1);  // ties: lowest index
}

TEST_CASE("top-fraction mass") {
  std::vector<double> mass(100, 0.0);
  for (int i = 0; i < 10; ++i) mass[i * 7] = 0.09;
  for (int i = 0; i < 100; ++i) mass[i] += 0.001;
  CHECK(top_fraction_mass(mass, 0.10) == doctest::Approx((0.9 + 0.01) / 1.0).epsilon(1e-12));
  CHECK(top_fraction_mass(std::vector<double>(10, 1.0), 0.10) == doctest::Approx(0.1));
  CHECK(top_fraction_mass(std::vector<double>(10, 0.0), 0.10) == 0.0);
}

TEST_CASE("keep rules: sink, tail, cap and budget, in one place") {
  const int64_t N = 20;
  KeepProposal p{std::vector<uint8_t>(N, 0), std::vector<double>(N, 0.0), {}};
  for (int n : {5, 6, 7, 8}) p.candidates[n] = 1;
  p.priority[5] = 0.1, p.priority[6] = 0.9, p.priority[7] = 0.5, p.priority[8] = 0.9;
  auto keep = apply_keep_rules(p, 1, N, {2, 3, 0});
  std::vector<uint8_t> want(N, 0);
  for (int n : {0, 1, 2, 5, 6, 7, 8, 18, 19}) want[n] = 1;
  CHECK(keep == want);
  keep = apply_keep_rules(p, 1, N, {2, 3, 7});  // cap 7: forced 5, then the two best (6, 8)
  want.assign(N, 0);
  for (int n : {0, 1, 2, 6, 8, 18, 19}) want[n] = 1;
  CHECK(keep == want);
  p.budget = {6};  // budget tighter than cap: ties at 0.9 go to the lower index (6)
  keep = apply_keep_rules(p, 1, N, {2, 3, 7});
  want[8] = 0;
  CHECK(keep == want);
}

// ---- the same properties through the whole loop (fixture decoder and retriever) ----

namespace {

class FixedPolicy : public KeepPolicy {
 public:
  explicit FixedPolicy(uint8_t v) : v_(v) {}
  const char* name() const override { return v_ ? "test_all" : "test_none"; }
  KeepProposal propose(const CycleContext& ctx) override {
    return {std::vector<uint8_t>(ctx.batch * ctx.chunks, v_), std::vector<double>(ctx.batch * ctx.chunks, 0.0), {}};
  }

 private:
  uint8_t v_;
};

class Capture : public StepObserver {
 public:
  std::vector<RowMeasures> rows;
  int64_t empty = 0;
  void on_step(const StepEvent& ev) override {
    rows.insert(rows.end(), ev.measures.begin(), ev.measures.end());
    empty += static_cast<int64_t>(ev.empty_sparse_rows.size());
  }
};

void run_small(const std::string& policy_name, Capture& cap, MetricsCollector& metrics) {
  register_keep_policy("test_all", [] { return std::make_unique<FixedPolicy>(1); });
  register_keep_policy("test_none", [] { return std::make_unique<FixedPolicy>(0); });
  RunConfig cfg;
  cfg.device = "cpu";
  cfg.model.weights = fixture("toy_decoder_small.safetensors");
  cfg.retriever.checkpoint = fixture("retriever_small.safetensors");
  cfg.retriever.max_position = 4096;
  cfg.keys.mode = "memory";
  cfg.loop.batch = 2, cfg.loop.steps = 20, cfg.loop.tau = 8;
  cfg.policy.kind = policy_name, cfg.policy.tail = 0, cfg.policy.sink = 0, cfg.policy.cap = 0;
  RunSetup setup = prepare_run(cfg);
  auto decoder = make_decoder(Device::Cpu, setup.decoder_weights);
  auto retriever = make_retriever(Device::Cpu, setup.retriever_weights, retriever_options(cfg));
  auto policy = make_keep_policy(policy_name);
  StepObserver* obs[] = {&cap, &metrics};
  run_decode_loop(loop_settings(cfg), {decoder.get(), retriever.get(), setup.keys_view(), setup.prompt}, *policy, obs);
}

}  // namespace

TEST_CASE("loop: everything kept gives recall 1, KL 0, full top-1 agreement, no divergence") {
  Capture cap;
  MetricsCollector metrics;
  run_small("test_all", cap, metrics);
  REQUIRE(cap.rows.size() == 40);
  for (const auto& m : cap.rows) {
    CHECK(m.kept == 97);
    CHECK(m.recall == doctest::Approx(1.0).epsilon(1e-12));
    CHECK(m.kl == 0.0);  // sparse and shadow rows compute the same thing bit for bit
    CHECK(m.top1);
  }
  CHECK(metrics.summary()["first_divergence"] == std::vector<int64_t>{-1, -1});
  CHECK(cap.empty == 0);
}

TEST_CASE("loop: an empty keep-set is counted and produces no NaN") {
  Capture cap;
  MetricsCollector metrics;
  run_small("test_none", cap, metrics);
  REQUIRE(cap.rows.size() == 40);
  CHECK(cap.empty == 40);
  for (const auto& m : cap.rows) {
    CHECK(m.empty);
    CHECK(m.recall == 0.0);
    CHECK(std::isfinite(m.kl));
    CHECK(m.kl >= 0.0);
  }
  CHECK(metrics.summary()["empty_row_steps"] == 40);
  CHECK(std::isfinite(metrics.summary()["kl_mean"].get<double>()));
}

TEST_CASE("baselines keep the retriever's budget; the oracle beats random on recall") {
  double recall[3];
  int i = 0;
  for (const char* name : {"oracle", "random", "recency"}) {
    Capture cap;
    MetricsCollector metrics;
    run_small(name, cap, metrics);
    recall[i++] = metrics.summary()["recall"].get<double>();
    for (const auto& c : metrics.cycles()) CHECK(c["kept"] == c["retriever_kept"]);
  }
  CHECK(recall[0] > recall[1]);
}
