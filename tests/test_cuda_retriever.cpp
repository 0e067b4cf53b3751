// The CUDA retriever against the golden fixtures and against the CPU backend (which is
// validated against the fixtures in test_retriever_fixtures). Needs a GPU: without one (or
// in a build without CUDA) the executable prints why and exits 77, which meson reports as SKIP.
//
// Tolerances. Both backends compute the same float32 pipeline but sum the projections in a
// different order (cuBLAS vs Eigen), so q_raw differs by ~1e-7 relative; the two bf16
// roundings of the query then occasionally land on the other side of a rounding midpoint,
// which moves that one query value by one bf16 ulp (<= 2^-7 relative). A logit is a sum of
// H * 128 such products, so such a flip moves it by far less than 1e-3 of the size of its
// terms; the size of the terms is measured by the row's RMS logit (one logit can be small by
// cancellation while its terms are not). Exact mode adds the hi/lo fp16 split (22
// significant bits) and tensor-core f32 sums (~1e-6 relative). We therefore allow
// |d logit| <= 2e-3 * (|ref| + rms(ref row) + 1e-3) against the reference and the CPU, and
// |d score| <= 1e-3 (sigmoid has slope <= 1/4, and where it is not saturated |logit| is a
// few units at most, so the logit bound is ~4e-3 there). Selections must
// agree exactly except for chunks whose reference score lies within 1e-4 of the cut
// (the threshold, or the k-th best score for top-k), where the order may legitimately swap.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <set>
#include <string>
#include <tuple>

#include "src/common/error.hpp"
#include "src/formats/safetensors.hpp"
#include "src/retriever/retriever.hpp"
#include "src/retriever/synthetic.hpp"

#ifdef FLASHMEM_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/retriever_kernels.hpp"
#include "src/numerics/bf16.hpp"
#include "src/numerics/fp8.hpp"
#include "src/retriever/cuda_retriever.hpp"

using namespace flashmem;

namespace {

std::string data_path(const std::string& name) {
  const char* dir = std::getenv("FLASHMEM_TEST_DATA");
  return std::string(dir ? dir : "tests/data") + "/" + name;
}

constexpr double kLogitRtol = 2e-3, kScoreAtol = 1e-3, kCutBand = 1e-4;

// Largest |a - ref| / (rtol * (|ref| + rms(ref row) + 1e-3)) over rows of n; <= 1 passes.
double logit_violation(std::span<const float> a, std::span<const float> ref, int64_t n, double rtol = kLogitRtol) {
  REQUIRE(a.size() == ref.size());
  double worst = 0;
  for (size_t row = 0; row < a.size() / n; ++row) {
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(ref[row * n + i]) * ref[row * n + i];
    const double rms = std::sqrt(sq / n);
    for (int64_t j = 0; j < n; ++j) {
      const size_t i = row * n + j;
      if (!std::isfinite(a[i])) return INFINITY;
      worst = std::max(worst, std::abs(static_cast<double>(a[i]) - ref[i]) / (rtol * (std::abs(ref[i]) + rms + 1e-3)));
    }
  }
  return worst;
}

double max_abs_diff(std::span<const float> a, std::span<const float> ref) {
  REQUIRE(a.size() == ref.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    worst = std::max(worst, std::abs(static_cast<double>(a[i]) - ref[i]));
  }
  return worst;
}

// Threshold masks: equal except where the reference score is within the band of t.
int64_t threshold_mismatches(std::span<const uint8_t> keep, std::span<const uint8_t> ref, std::span<const float> ref_scores,
                             float t) {
  int64_t bad = 0;
  for (size_t i = 0; i < keep.size(); ++i)
    if (keep[i] != ref[i] && std::abs(ref_scores[i] - t) > kCutBand) ++bad;
  return bad;
}

// Top-k masks per row: equal except for chunks whose reference score is within the band
// of the row's k-th best reference score.
int64_t topk_mismatches(std::span<const uint8_t> keep, std::span<const uint8_t> ref, std::span<const float> ref_scores,
                        int64_t B, int64_t N, int64_t k) {
  int64_t bad = 0;
  k = std::min(k, N);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> row(ref_scores.begin() + b * N, ref_scores.begin() + (b + 1) * N);
    std::nth_element(row.begin(), row.begin() + (k - 1), row.end(), std::greater<float>());
    const float kth = row[k - 1];
    for (int64_t n = 0; n < N; ++n)
      if (keep[b * N + n] != ref[b * N + n] && std::abs(ref_scores[b * N + n] - kth) > kCutBand) ++bad;
  }
  return bad;
}

struct Case {
  std::vector<float> hidden;
  std::vector<uint8_t> keys;
  std::vector<int64_t> positions;
  int64_t B = 0, N = 0;
  ScoreInputs inputs() const { return {hidden, {keys.data(), B, N}, positions}; }
};

Case random_case(int64_t B, int64_t N, int64_t D, uint64_t seed, bool negative_scales = true) {
  Case c;
  c.B = B;
  c.N = N;
  c.keys = mock_compressed_keys(B, N, seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  c.hidden.resize(B * D);
  for (float& v : c.hidden) v = normal(rng);
  for (int64_t b = 0; b < B; ++b) c.positions.push_back(static_cast<int64_t>(rng() % 2000000));
  if (negative_scales)  // every 7th chunk gets a negative scale: relu(s * d) with s < 0
    for (int64_t i = 0; i < B * N; i += 7) {
      float s;
      std::memcpy(&s, c.keys.data() + i * 132 + 128, 4);
      s = -s;
      std::memcpy(c.keys.data() + i * 132 + 128, &s, 4);
    }
  return c;
}

// A case's keys and hidden states copied to the device (freed at scope end), as device inputs.
struct DeviceCase {
  void* keys = nullptr;
  void* hidden = nullptr;
  CudaRetriever::DeviceInputs in;
  explicit DeviceCase(const Case& c) {
    REQUIRE(cudaMalloc(&keys, c.keys.size()) == cudaSuccess);
    REQUIRE(cudaMalloc(&hidden, c.hidden.size() * 4) == cudaSuccess);
    REQUIRE(cudaMemcpy(keys, c.keys.data(), c.keys.size(), cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(hidden, c.hidden.data(), c.hidden.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    in = {static_cast<const float*>(hidden), static_cast<const uint8_t*>(keys), c.B, c.N, c.positions};
  }
  DeviceCase(const DeviceCase&) = delete;
  DeviceCase& operator=(const DeviceCase&) = delete;
  ~DeviceCase() {
    cudaFree(keys);
    cudaFree(hidden);
  }
};

std::shared_ptr<const RetrieverWeights> small_synthetic(int64_t D, int64_t R, int64_t H, uint64_t seed) {
  SyntheticShape shape;
  shape.hidden = D;
  shape.rank = R;
  shape.heads = H;
  return std::make_shared<const RetrieverWeights>(synthetic_retriever(seed, shape));
}

// The random-input sweep: for H = 128 (the production head count, one wgmma head tile) at small
// D and R, and the fixtures' H = 4 (padded to one head tile), every N x B that keep(H, N, B)
// allows, both ensembles: fn(weights, case, options) with the case's values captured. Weights
// from weight_seed, the case of (N, B) from case_seed + N + B.
template <typename Keep, typename Fn>
void sweep_random_cases(uint64_t weight_seed, uint64_t case_seed, std::initializer_list<int64_t> Ns,
                        std::initializer_list<int64_t> Bs, Keep&& keep, Fn&& fn) {
  for (const auto& [D, R, H] : {std::tuple<int64_t, int64_t, int64_t>{512, 256, 128}, {128, 64, 4}}) {
    auto weights = small_synthetic(D, R, H, weight_seed);
    for (int64_t N : Ns)
      for (int64_t B : Bs) {
        if (!keep(H, N, B)) continue;
        CAPTURE(N);
        CAPTURE(B);
        CAPTURE(H);
        const Case c = random_case(B, N, D, case_seed + N + B);
        for (Ensemble ens : {Ensemble::Max, Ensemble::Mean}) {
          CAPTURE(static_cast<int>(ens));
          RetrieverOptions opt;
          opt.max_position = 1048576;
          opt.ensemble = ens;
          fn(weights, c, opt);
        }
      }
  }
}

}  // namespace

TEST_CASE("cuda retriever matches the golden retriever cases A, B, C") {
  const SafetensorsFile cases = SafetensorsFile::open(data_path("retriever_cases.safetensors"));
  struct Spec {
    const char* prefix;
    const char* checkpoint;
    std::vector<std::string> layers;
  };
  for (const Spec& spec : {Spec{"A.", "retriever_small.safetensors", {"l10", "l12", "l20"}},
                           Spec{"B.", "retriever_small.safetensors", {"l10", "l12", "l20"}},
                           Spec{"C.", "retriever_small_bf16.safetensors", {"l20", "l10"}}}) {
    CAPTURE(spec.prefix);
    const std::string p = spec.prefix;
    auto weights = std::make_shared<const RetrieverWeights>(load_retriever(data_path(spec.checkpoint), spec.layers));
    const std::vector<float> hidden = cases.read_f32(p + "hidden");
    const auto keys = cases.tensor(p + "compressed_k").as<uint8_t>();
    const std::vector<int64_t> positions = cases.read_i64(p + "positions");
    const int64_t B = 3, N = 97;
    const ScoreInputs in{hidden, {keys.data(), B, N}, positions};
    for (Ensemble ens : {Ensemble::Max, Ensemble::Mean}) {
      RetrieverOptions opt;
      opt.max_position = cases.read_i64(p + "max_position")[0];
      opt.ensemble = ens;
      auto cuda = make_retriever(Device::Cuda, weights, opt);
      CHECK(std::string(cuda->backend()) == "cuda");
      const Scores s = cuda->score(in, true);
      for (size_t l = 0; l < spec.layers.size(); ++l) {
        const std::vector<float> ref = cases.read_f32(p + spec.layers[l] + ".logits");
        CHECK(logit_violation(s.layer_logits[l], ref, N) <= 1.0);
        CHECK(logit_violation(cuda->layer_logits(l, in), ref, N) <= 1.0);
      }
      const std::vector<float> ref_scores = cases.read_f32(p + (ens == Ensemble::Max ? "ensemble_max" : "ensemble_mean"));
      CHECK(max_abs_diff(s.ensemble, ref_scores) <= kScoreAtol);
      const std::string thr = p + (ens == Ensemble::Max ? "keep_thr0.5_max" : "keep_thr0.5_mean");
      const Selection sel = cuda->retrieve(in, SelectRule::threshold_rule(0.5f));
      CHECK(threshold_mismatches(sel.keep, cases.tensor(thr).as<uint8_t>(), ref_scores, 0.5f) == 0);
      for (int64_t b = 0; b < B; ++b)
        CHECK(sel.kept_count[b] == std::count(sel.keep.begin() + b * N, sel.keep.begin() + (b + 1) * N, 1));
      if (ens == Ensemble::Max) {
        const Selection top = cuda->retrieve(in, SelectRule::top_k_rule(10));
        CHECK(topk_mismatches(top.keep, cases.tensor(p + "keep_top10_max").as<uint8_t>(), ref_scores, B, N, 10) == 0);
        CHECK(top.top_indices.size() == static_cast<size_t>(B * 10));
      }
    }
  }
}

TEST_CASE("cuda retriever matches realdim_public (exact), and fast agrees with exact") {
  const SafetensorsFile f = SafetensorsFile::open(data_path("realdim_public.safetensors"));
  auto weights = std::make_shared<const RetrieverWeights>(synthetic_retriever(f.read_i64("seed")[0]));
  const std::vector<float> hidden = f.read_f32("hidden");
  const auto keys = f.tensor("compressed_k").as<uint8_t>();
  const std::vector<int64_t> positions = f.read_i64("positions");
  const int64_t B = 2, N = 1237;
  const ScoreInputs in{hidden, {keys.data(), B, N}, positions};
  RetrieverOptions opt;
  auto exact = make_retriever(Device::Cuda, weights, opt);
  const Scores s = exact->score(in, true);
  const std::string names[] = {"l10", "l12", "l20"};
  for (int l = 0; l < 3; ++l) {
    const std::vector<float> ref = f.read_f32(names[l] + ".logits");
    const double v = logit_violation(s.layer_logits[l], ref, N);
    MESSAGE("realdim exact ", names[l], ": max |d logit| / tolerance = ", v);
    CHECK(v <= 1.0);
  }
  const std::vector<float> ref_max = f.read_f32("ensemble_max");
  CHECK(max_abs_diff(s.ensemble, ref_max) <= kScoreAtol);
  const Selection thr = exact->retrieve(in, SelectRule::threshold_rule(0.5f));
  CHECK(threshold_mismatches(thr.keep, f.tensor("keep_thr0.5_max").as<uint8_t>(), ref_max, 0.5f) == 0);
  const Selection top = exact->retrieve(in, SelectRule::top_k_rule(64));
  CHECK(topk_mismatches(top.keep, f.tensor("keep_top64_max").as<uint8_t>(), ref_max, B, N, 64) == 0);
  {
    RetrieverOptions mean = opt;
    mean.ensemble = Ensemble::Mean;
    auto m = make_retriever(Device::Cuda, weights, mean);
    CHECK(max_abs_diff(m->score(in).ensemble, f.read_f32("ensemble_mean")) <= kScoreAtol);
  }

  // Fast mode: bf16 weights and fp8 scoring (e4m3 queries x the e4m3 keys, f32 accumulate);
  // agreement is reported, and held to a loose floor (it is an approximation by design).
  opt.precision = Precision::Fast;
  auto fast = make_retriever(Device::Cuda, weights, opt);
  const Selection fthr = fast->retrieve(in, SelectRule::threshold_rule(0.5f));
  const Selection ftop = fast->retrieve(in, SelectRule::top_k_rule(64));
  int64_t same = 0, overlap = 0;
  for (int64_t i = 0; i < B * N; ++i) same += fthr.keep[i] == thr.keep[i];
  for (int64_t i = 0; i < B * N; ++i) overlap += ftop.keep[i] && top.keep[i];
  const double same_share = static_cast<double>(same) / (B * N), top_share = static_cast<double>(overlap) / (B * 64);
  MESSAGE("realdim_public fast vs exact: identical threshold decisions ", same_share, ", top-64 overlap ", top_share);
  CHECK(same_share >= 0.98);
  CHECK(top_share >= 0.8);
}

TEST_CASE("cuda fast vs exact agreement on random inputs at N = 262144 (real dims)") {
  auto weights = std::make_shared<const RetrieverWeights>(synthetic_retriever(7));
  const int64_t B = 1, N = 262144, k = 512;
  Case c = random_case(B, N, weights->hidden, 99, false);
  for (size_t i = 0; i < c.hidden.size(); ++i) c.hidden[i] = pm1(77, 0, i) * 1.7f;  // as bench_retriever_cuda
  RetrieverOptions opt;
  auto exact = make_retriever(Device::Cuda, weights, opt);
  Scores se;
  const Selection ethr = exact->retrieve(c.inputs(), SelectRule::threshold_rule(0.5f), &se);
  const Selection etop = exact->retrieve(c.inputs(), SelectRule::top_k_rule(k));
  opt.precision = Precision::Fast;
  auto fast = make_retriever(Device::Cuda, weights, opt);
  Scores sf;
  const Selection fthr = fast->retrieve(c.inputs(), SelectRule::threshold_rule(0.5f), &sf);
  const Selection ftop = fast->retrieve(c.inputs(), SelectRule::top_k_rule(k));
  int64_t same = 0, overlap = 0;
  for (int64_t i = 0; i < B * N; ++i) same += fthr.keep[i] == ethr.keep[i];
  for (int64_t i = 0; i < B * N; ++i) overlap += ftop.keep[i] && etop.keep[i];
  double mean_kept = 0;
  for (float v : se.ensemble) mean_kept += v > 0.5f;
  // Also at the exact scores' median as threshold (half kept: the decisions are not trivial).
  std::vector<float> sorted = se.ensemble;
  std::nth_element(sorted.begin(), sorted.begin() + N / 2, sorted.end());
  const float t_med = sorted[N / 2];
  int64_t same_med = 0;
  for (int64_t i = 0; i < B * N; ++i) same_med += (sf.ensemble[i] > t_med) == (se.ensemble[i] > t_med);
  {  // For comparison (reported only): fast mode with fp16 single-term scoring instead of fp8.
    setenv("FLASHMEM_CUDA_FAST_SCORING", "fp16", 1);
    auto fast16 = make_retriever(Device::Cuda, weights, opt);
    unsetenv("FLASHMEM_CUDA_FAST_SCORING");
    const Scores s16 = fast16->score(c.inputs());
    int64_t same16 = 0, same16_med = 0;
    for (int64_t i = 0; i < B * N; ++i) {
      same16 += (s16.ensemble[i] > 0.5f) == (se.ensemble[i] > 0.5f);
      same16_med += (s16.ensemble[i] > t_med) == (se.ensemble[i] > t_med);
    }
    MESSAGE("random N=262144 fast (fp16 scoring) vs exact: identical decisions ", static_cast<double>(same16) / (B * N),
            " at t = 0.5, ", static_cast<double>(same16_med) / (B * N), " at t = median; max |d score| ",
            max_abs_diff(s16.ensemble, se.ensemble));
  }
  MESSAGE("random N=262144 fast vs exact: identical threshold decisions ", static_cast<double>(same) / (B * N),
          " at t = 0.5 (exact keeps ", mean_kept / N, "), ", static_cast<double>(same_med) / (B * N), " at t = median ",
          t_med, "; top-", k, " overlap ", static_cast<double>(overlap) / (B * k), "; max |d score| ",
          max_abs_diff(sf.ensemble, se.ensemble));
  CHECK(static_cast<double>(same) / (B * N) >= 0.98);
  CHECK(static_cast<double>(same_med) / (B * N) >= 0.98);
}

TEST_CASE("cuda retriever agrees with the cpu backend on random inputs") {
  double worst_logit = 0, worst_score = 0;
  // B = 6: the cuBLAS projections (our GEMV serves B <= 4); the CPU side is kept quick.
  const auto keep = [](int64_t H, int64_t N, int64_t B) { return !(H == 4 && N > 1237) && !(B == 6 && N > 1237); };
  const auto check = [&](auto weights, const Case& c, RetrieverOptions opt) {
    const int64_t B = c.B, N = c.N;
    auto cpu = make_retriever(Device::Cpu, weights, opt);
    auto cuda = make_retriever(Device::Cuda, weights, opt);
    const Scores sc = cpu->score(c.inputs(), true);
    Scores sg;
    const Selection gthr = cuda->retrieve(c.inputs(), SelectRule::threshold_rule(0.5f), &sg);
    CHECK(max_abs_diff(sg.ensemble, sc.ensemble) <= kScoreAtol);
    const Scores sgl = cuda->score(c.inputs(), true);
    for (size_t l = 0; l < 3; ++l) {
      const double v = logit_violation(sgl.layer_logits[l], sc.layer_logits[l], N);
      worst_logit = std::max(worst_logit, v);
      CHECK(v <= 1.0);
    }
    worst_score = std::max(worst_score, max_abs_diff(sg.ensemble, sc.ensemble));
    const Selection cthr = select_chunks(sc.ensemble, B, N, SelectRule::threshold_rule(0.5f));
    CHECK(threshold_mismatches(gthr.keep, cthr.keep, sc.ensemble, 0.5f) == 0);
    for (int64_t k : {int64_t{64}, N + 5}) {
      const Selection gtop = cuda->retrieve(c.inputs(), SelectRule::top_k_rule(k));
      const Selection ctop = select_chunks(sc.ensemble, B, N, SelectRule::top_k_rule(k));
      CHECK(topk_mismatches(gtop.keep, ctop.keep, sc.ensemble, B, N, k) == 0);
      CHECK(gtop.kept_count == ctop.kept_count);
      CHECK(gtop.top_indices.size() == ctop.top_indices.size());
    }
  };
  sweep_random_cases(3, 1000, {1, 63, 1237, 100003, 262144}, {1, 3, 6}, keep, check);
  MESSAGE("cpu vs cuda (exact), random inputs: worst logit error / tolerance ", worst_logit, ", worst |d score| ",
          worst_score);
}

TEST_CASE("cuda fast mode on ragged shapes agrees with exact mode") {
  // The fp8 kernel's edges: one chunk, a partial 64-chunk unit, rows of B = 3 that start off
  // 16-byte alignment (N % 4 != 0), negative scales, both ensembles, the per-layer logits.
  // Bound: |d score| <= 0.25. The fp8 rounding of the queries moves these small synthetic
  // checkpoints' scores by up to 0.148 (H100; 0.099 at real dims, N 262144); a misplaced row,
  // byte or query word gives unrelated scores (0.34 to 0.96 measured when the query image and
  // the key fragments disagreed on the K order).
  double worst = 0;
  const auto all = [](int64_t, int64_t, int64_t) { return true; };
  const auto check = [&](auto weights, const Case& c, RetrieverOptions opt) {
    auto exact = make_retriever(Device::Cuda, weights, opt);
    opt.precision = Precision::Fast;
    auto fast = make_retriever(Device::Cuda, weights, opt);
    const Scores se = exact->score(c.inputs());
    const Scores sf = fast->score(c.inputs(), true);
    const double d = max_abs_diff(sf.ensemble, se.ensemble);
    worst = std::max(worst, d);
    CHECK(d <= 0.25);
    // The ensemble is made of the layer logits it reports (approximate sigmoid: 1e-5).
    double ens_err = 0;
    for (int64_t i = 0; i < c.B * c.N; ++i) {
      double e = 0.0;
      for (size_t l = 0; l < 3; ++l) {
        const double sg = 1.0 / (1.0 + std::exp(-static_cast<double>(sf.layer_logits[l][i])));
        e = opt.ensemble == Ensemble::Max ? std::max(e, sg) : e + sg / 3.0;
      }
      ens_err = std::max(ens_err, std::abs(e - sf.ensemble[i]));
    }
    CHECK(ens_err <= 1e-5);
  };
  sweep_random_cases(5, 2000, {1, 63, 1237, 100003}, {1, 3}, all, check);
  MESSAGE("fast vs exact on ragged shapes: max |d score| ", worst);
}

TEST_CASE("cuda fast mode with two head tiles agrees with the cpu backend") {
  // H = 200 pads to two 128-head tiles: the fp8 kernel's general path (one tile has its own
  // instantiation). Exact mode's two fp16 terms of 256 heads do not fit its shared memory, so
  // the CPU backend is the reference; bound |d score| <= 0.25 as for the ragged shapes (the fp8
  // rounding of the queries), while a wrong tile's weights or queries give unrelated scores.
  auto weights = small_synthetic(256, 128, 200, 9);
  double worst = 0;
  for (int64_t N : {63, 1237})
    for (int64_t B : {1, 3})
      for (Ensemble ens : {Ensemble::Max, Ensemble::Mean}) {
        CAPTURE(N);
        CAPTURE(B);
        CAPTURE(static_cast<int>(ens));
        const Case c = random_case(B, N, 256, 3000 + N + B);
        RetrieverOptions opt;
        opt.max_position = 1048576;
        opt.ensemble = ens;
        const Scores want = make_retriever(Device::Cpu, weights, opt)->score(c.inputs());
        opt.precision = Precision::Fast;
        const Scores got = make_retriever(Device::Cuda, weights, opt)->score(c.inputs());
        const double d = max_abs_diff(got.ensemble, want.ensemble);
        worst = std::max(worst, d);
        CHECK(d <= 0.25);
      }
  MESSAGE("fast at H = 200 (two head tiles) vs cpu: max |d score| ", worst);
}

TEST_CASE("cuda fast mode on full-range e4m3 keys agrees with exact mode") {
  // The mock keys are small e4m3 values (|k| ~ 0.5); a real quantiser maps each chunk's
  // largest |value| to e4m3's 448 and keeps amax / 448 as the scale. Fast mode accumulates the
  // dot products in f16 (score_fp8_kernel.cu), which holds only because the queries are scaled
  // by their L1 norm: with full-range keys any larger query scale overflows f16 (inf, then
  // NaN scores). Same chunks as real values, re-encoded at full range, plus two chunks of
  // 448s and -448s; same bound as the ragged shapes (|d score| <= 0.25).
  auto weights = std::make_shared<const RetrieverWeights>(synthetic_retriever(7));
  Case c = random_case(2, 8192, weights->hidden, 31);
  for (int64_t i = 0; i < c.B * c.N; ++i) {
    uint8_t* chunk = c.keys.data() + i * 132;
    float s;
    std::memcpy(&s, chunk + 128, 4);
    float real[128], amax = 0.0f;
    for (int d = 0; d < 128; ++d) {
      real[d] = fp8_e4m3fn_decode(chunk[d]) * std::abs(s);
      amax = std::max(amax, std::abs(real[d]));
    }
    const float full = amax / 448.0f;
    for (int d = 0; d < 128; ++d) chunk[d] = fp8_e4m3fn_encode(real[d] / full);
    const bool extreme = i == 5 || i == 9000;
    if (extreme) std::memset(chunk, i == 5 ? 0x7E : 0xFE, 128);  // +-448 everywhere
    const float scale = std::copysign(extreme ? 1e-3f : full, s);
    std::memcpy(chunk + 128, &scale, 4);
  }
  int64_t full_range = 0;
  for (int64_t i = 0; i < c.B * c.N; ++i) full_range += (c.keys[i * 132] & 0x78) >= 0x58;  // |k| >= 16
  CHECK(full_range > c.B * c.N / 2);
  RetrieverOptions opt;
  auto exact = make_retriever(Device::Cuda, weights, opt);
  opt.precision = Precision::Fast;
  auto fast = make_retriever(Device::Cuda, weights, opt);
  const Scores se = exact->score(c.inputs()), sf = fast->score(c.inputs());
  CHECK(std::all_of(sf.ensemble.begin(), sf.ensemble.end(), [](float v) { return std::isfinite(v); }));
  const double d = max_abs_diff(sf.ensemble, se.ensemble);
  int64_t same = 0;
  for (int64_t i = 0; i < c.B * c.N; ++i) same += (sf.ensemble[i] > 0.5f) == (se.ensemble[i] > 0.5f);
  MESSAGE("full-range keys, fast vs exact: max |d score| ", d, ", identical decisions at t = 0.5 ",
          static_cast<double>(same) / (c.B * c.N));
  CHECK(d <= 0.25);
  CHECK(static_cast<double>(same) / (c.B * c.N) >= 0.98);
}

TEST_CASE("cuda top-k breaks ties to the lower index, as the cpu") {
  // Scores that saturate to exactly 1.0f tie; huge weights_proj make every logit large.
  auto base = small_synthetic(128, 64, 8, 5);
  RetrieverWeights w = *base;
  for (auto& layer : w.layers)
    for (float& v : layer.weights_proj) v *= 1e4f;
  auto weights = std::make_shared<const RetrieverWeights>(std::move(w));
  const Case c = random_case(2, 3000, 128, 17, false);
  auto cpu = make_retriever(Device::Cpu, weights);
  auto cuda = make_retriever(Device::Cuda, weights);
  const Scores sc = cpu->score(c.inputs());
  const int64_t ones = std::count(sc.ensemble.begin(), sc.ensemble.end(), 1.0f);
  MESSAGE("chunks with score exactly 1: ", ones);
  const Selection g = cuda->retrieve(c.inputs(), SelectRule::top_k_rule(100));
  const Selection r = select_chunks(sc.ensemble, 2, 3000, SelectRule::top_k_rule(100));
  CHECK(g.top_indices == r.top_indices);
}

TEST_CASE("cuda threshold selection stays right when the batch size changes between calls") {
  // The selection's per-row tickets live at the start of a scratch buffer that is reused while
  // it is large enough; a larger B must not find the previous call's partial sums there.
  // Reference: a fresh retriever for every call (same kernels, so bitwise the same scores),
  // and each row's count against its mask.
  auto weights = small_synthetic(128, 64, 8, 6);
  auto reused = make_retriever(Device::Cuda, weights);
  const SelectRule rule = SelectRule::threshold_rule(0.5f);
  for (const auto& [B, N] : {std::pair<int64_t, int64_t>{1, 20000}, {3, 50}, {1, 7}, {4, 300}}) {
    const Case c = random_case(B, N, 128, 40 + B);
    const Selection got = reused->retrieve(c.inputs(), rule);
    const Selection want = make_retriever(Device::Cuda, weights)->retrieve(c.inputs(), rule);
    CHECK(got.keep == want.keep);
    CHECK(got.kept_count == want.kept_count);
    for (int64_t b = 0; b < B; ++b)
      CHECK(got.kept_count[b] == std::count(got.keep.begin() + b * N, got.keep.begin() + (b + 1) * N, uint8_t{1}));
  }
}

TEST_CASE("cuda bad input: as the cpu, plus device memory") {
  auto weights = small_synthetic(128, 64, 4, 11);
  auto cuda = make_retriever(Device::Cuda, weights);
  auto cpu = make_retriever(Device::Cpu, weights);
  Case c = random_case(2, 50, 128, 3, false);
  auto message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  // An fp8 NaN byte (in each word of a row, in turn), then a non-finite scale: the same
  // message as the CPU backend, in both precisions (each has its own scoring kernel).
  RetrieverOptions fast_opt;
  fast_opt.precision = Precision::Fast;
  auto fast = make_retriever(Device::Cuda, weights, fast_opt);
  // Both NaN encodings (0x7F, 0xFF), in a row with a negative scale (the fast kernel flips the
  // sign bits of such a row before scoring).
  const float negative = -0.5f;
  std::memcpy(c.keys.data() + (1 * 50 + 7) * 132 + 128, &negative, 4);
  for (int byte = 1; byte < 128; byte += 9) {
    CAPTURE(byte);
    c.keys[(1 * 50 + 7) * 132 + byte] = byte % 2 ? 0x7F : 0xFF;
    const std::string want = message([&] { cpu->score(c.inputs()); });
    CHECK(!want.empty());
    CHECK(message([&] { cuda->score(c.inputs()); }) == want);
    CHECK(message([&] { fast->score(c.inputs()); }) == want);
    c.keys[(1 * 50 + 7) * 132 + byte] = 0x01;
  }
  const float inf = INFINITY;
  std::memcpy(c.keys.data() + (0 * 50 + 40) * 132 + 128, &inf, 4);
  const std::string g = message([&] { cuda->score(c.inputs()); });
  CHECK(g.find("chunk 40") != std::string::npos);
  CHECK(g == message([&] { cpu->score(c.inputs()); }));
  CHECK(message([&] { fast->score(c.inputs()); }) == g);
  // Shape and value errors from the shared validation.
  c = random_case(2, 50, 128, 3, false);
  c.hidden[5] = NAN;
  CHECK(message([&] { cuda->score(c.inputs()); }) == message([&] { cpu->score(c.inputs()); }));
  c = random_case(2, 50, 128, 3, false);
  c.positions = {1};
  CHECK(!message([&] { cuda->score(c.inputs()); }).empty());
  CHECK(!message([&] { cuda->retrieve(random_case(1, 5, 128, 1).inputs(), SelectRule::top_k_rule(0)); }).empty());
  // A request larger than the free device memory: a one-line Error naming the size.
  auto* dev = dynamic_cast<CudaRetriever*>(cuda.get());
  REQUIRE(dev != nullptr);
  void* keys = nullptr;
  void* hidden = nullptr;
  REQUIRE(cudaMalloc(&keys, 1024) == cudaSuccess);
  REQUIRE(cudaMalloc(&hidden, 128 * 4) == cudaSuccess);
  const std::vector<int64_t> pos = {0};
  CudaRetriever::DeviceInputs din{static_cast<const float*>(hidden), static_cast<const uint8_t*>(keys), 1,
                                  int64_t{1} << 40, pos};
  const std::string oom = message([&] { dev->score_device(din); });
  MESSAGE("oversized request: ", oom);
  CHECK(oom.find("bytes") != std::string::npos);
  CHECK(oom.find(std::to_string((int64_t{1} << 40) * 4)) != std::string::npos);
  CHECK(oom.find('\n') == std::string::npos);
  // The retriever still works afterwards.
  CHECK(cuda->score(random_case(1, 5, 128, 1).inputs()).ensemble.size() == 5);
  cudaFree(keys);
  cudaFree(hidden);
}

TEST_CASE("cuda device-pointer entry point scores resident keys without copies") {
  auto weights = small_synthetic(256, 128, 128, 21);
  auto cuda = make_retriever(Device::Cuda, weights);
  auto* dev = dynamic_cast<CudaRetriever*>(cuda.get());
  REQUIRE(dev != nullptr);
  const Case c = random_case(3, 5001, 256, 8);  // N odd: rows are not 16-byte aligned
  const DeviceCase on_device(c);
  const CudaRetriever::DeviceInputs& din = on_device.in;
  const size_t before = dev->device_bytes();
  const float* d_scores = dev->score_device(din);
  std::vector<float> got(c.B * c.N);
  REQUIRE(cudaMemcpy(got.data(), d_scores, got.size() * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  const Scores ref = cuda->score(c.inputs());  // the host path (copies) as the reference
  CHECK(got == ref.ensemble);                   // same kernels, same inputs: bitwise equal
  // Reruns are bitwise identical and allocate nothing new.
  dev->score_device(din);
  const size_t after_first = dev->device_bytes();
  for (int i = 0; i < 5; ++i) {
    const float* again = dev->score_device(din);
    std::vector<float> rerun(got.size());
    REQUIRE(cudaMemcpy(rerun.data(), again, rerun.size() * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(rerun == got);
  }
  CHECK(dev->device_bytes() == after_first);
  MESSAGE("device bytes before first call ", before, ", after ", after_first);
  // Scoring and selection in one graph (fast mode: the threshold fused into the scoring kernel):
  // the same results as the two calls (score_device, then the selection kernel), in both
  // precisions; the second shape gives every block of the fp8 kernel many units of a row.
  RetrieverOptions fast_opt;
  fast_opt.precision = Precision::Fast;
  auto fast = make_retriever(Device::Cuda, weights, fast_opt);
  const Case wide = random_case(3, 50001, 256, 9);
  const DeviceCase wide_on_device(wide);
  for (const CudaRetriever::DeviceInputs& in : {din, wide_on_device.in})
    for (CudaRetriever* r : {dev, dynamic_cast<CudaRetriever*>(fast.get())}) {
      for (const SelectRule& rule : {SelectRule::threshold_rule(0.5f), SelectRule::top_k_rule(77), SelectRule::threshold_rule(0.7f)}) {
        auto fetch = [&](const CudaRetriever::DeviceSelection& s, bool topk) {
          std::vector<uint8_t> keep(in.batch * in.chunks);
          std::vector<int64_t> count(in.batch), top(topk ? in.batch * 77 : 0);
          REQUIRE(cudaMemcpy(keep.data(), s.keep, keep.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
          REQUIRE(cudaMemcpy(count.data(), s.kept_count, count.size() * 8, cudaMemcpyDeviceToHost) == cudaSuccess);
          if (topk) REQUIRE(cudaMemcpy(top.data(), s.top_indices, top.size() * 8, cudaMemcpyDeviceToHost) == cudaSuccess);
          return std::make_tuple(keep, count, top);
        };
        const bool topk = rule.kind == SelectRule::Kind::TopK;
        r->score_device(in);
        const CudaRetriever::DeviceSelection sel = r->select_device(rule);
        r->synchronize();  // select_device returns without waiting; fetch copies on another stream
        const auto two_calls = fetch(sel, topk);
        if (rule.threshold == 0.5f) CHECK(std::get<1>(two_calls)[0] > 0);  // it keeps something: not vacuous
        for (int i = 0; i < 3; ++i) {  // the first call captures the graph, the others replay it
          const auto fused = fetch(r->score_select_device(in, rule), topk);
          CHECK(fused == two_calls);
        }
      }
    }
}

TEST_CASE("fused wq_b + query finish is bitwise the gemv + finish_queries chain") {
  // The B <= 4 path computes q inside project_finish_queries; the separate kernels are the
  // reference (the retriever's other tests see only the scores, to a tolerance).
  std::mt19937_64 rng(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<void*> owned;
  cudaStream_t stream = nullptr;  // a blocking stream: ordered with the cudaMemcpy calls here
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  auto device = [&](const void* host, size_t bytes) {
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, bytes) == cudaSuccess);
    owned.push_back(p);
    if (host) REQUIRE(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    else REQUIRE(cudaMemset(p, 0, bytes) == cudaSuccess);
    return p;
  };
  auto randoms = [&](size_t n, float mean) {
    std::vector<float> v(n);
    for (float& x : v) x = mean + normal(rng);
    return v;
  };
  const int L = 2;
  for (const auto& dims : {std::pair{520, 3}, std::pair{2048, 5}}) {  // K = 520: partial load batches
    const int K = dims.first, H = dims.second;
    const int64_t rows = int64_t{H} * kernels::kHeadDim, stride = K + H, P = L * stride;
    const std::vector<float> w = randoms(L * rows * K, 0.0f);
    std::vector<uint16_t> w_bf16(w.size());
    for (size_t i = 0; i < w.size(); ++i) w_bf16[i] = bf16_bits_from_float(w[i]);
    const void* w_f32_d = device(w.data(), w.size() * 4);
    const void* w_bf16_d = device(w_bf16.data(), w_bf16.size() * 2);
    const std::vector<float> q_norm = randoms(L * K, 1.0f);
    const float* q_norm_d = static_cast<const float*>(device(q_norm.data(), q_norm.size() * 4));
    for (int B : {1, 2, 4}) {
      const std::vector<float> proj = randoms(B * P, 0.0f);
      std::vector<float> angles(B * 64);
      for (size_t i = 0; i < angles.size(); i += 2) {
        const float t = 3.0f * normal(rng);
        angles[i] = std::cos(t);
        angles[i + 1] = std::sin(t);
      }
      const float* proj_d = static_cast<const float*>(device(proj.data(), proj.size() * 4));
      const float* angles_d = static_cast<const float*>(device(angles.data(), angles.size() * 4));
      float* a_d = static_cast<float*>(device(nullptr, int64_t{L} * B * K * 4));
      float* qraw_d = static_cast<float*>(device(nullptr, L * B * rows * 4));
      REQUIRE(kernels::rmsnorm_rows(proj_d, P, stride, q_norm_d, L, B, K, a_d, false, stream) == cudaSuccess);
      for (const bool bf16 : {false, true}) {
        const void* w_d = bf16 ? w_bf16_d : w_f32_d;
        REQUIRE(kernels::gemv(w_d, bf16, rows, K, rows * K, L, a_d, int64_t{B} * K, K, B, qraw_d, B * rows, rows, true,
                              stream) == cudaSuccess);
        for (const auto& precision : {std::pair{2, false}, std::pair{1, false}, std::pair{1, true}}) {
          const int terms = precision.first;
          const bool fp8 = precision.second;
          const int Hp = kernels::padded_heads(H);
          const size_t frag_bytes = B * L * kernels::query_fragment_bytes(H, terms, fp8), w_bytes = B * L * Hp * 4;
          auto finish = [&]() {
            kernels::QueryFinish f{proj_d, P, stride, K, angles_d, L, B, H, 0.0625f, terms, fp8,
                                   device(nullptr, frag_bytes), static_cast<float*>(device(nullptr, w_bytes))};
            return f;
          };
          auto fetch = [&](const kernels::QueryFinish& f) {
            std::vector<uint8_t> out(frag_bytes + w_bytes);
            REQUIRE(cudaMemcpy(out.data(), f.qfrag, frag_bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
            REQUIRE(cudaMemcpy(out.data() + frag_bytes, f.w_scaled, w_bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
            return out;
          };
          const kernels::QueryFinish ref = finish(), normed = finish(), prenormed = finish();
          REQUIRE(kernels::finish_queries(qraw_d, ref, stream) == cudaSuccess);
          REQUIRE(kernels::project_finish_queries(w_d, bf16, K, rows * K, proj_d, stride, P, q_norm_d, normed, stream) ==
                  cudaSuccess);
          REQUIRE(kernels::project_finish_queries(w_d, bf16, K, rows * K, a_d, int64_t{B} * K, K, nullptr, prenormed,
                                                  stream) == cudaSuccess);
          const std::vector<uint8_t> want = fetch(ref);
          CAPTURE(K);
          CAPTURE(B);
          CAPTURE(bf16);
          CAPTURE(terms);
          CAPTURE(fp8);
          CHECK(std::any_of(want.begin(), want.end(), [](uint8_t v) { return v != 0; }));
          CHECK(fetch(normed) == want);
          CHECK(fetch(prenormed) == want);
        }
      }
    }
  }
  cudaStreamDestroy(stream);
  for (void* p : owned) cudaFree(p);
}

#endif  // FLASHMEM_HAVE_CUDA

int main(int argc, char** argv) {
  std::string why;
  if (!flashmem::cuda_available(&why)) {
    std::printf("SKIP: cuda retriever tests need a CUDA device: %s\n", why.c_str());
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
