// The CPU retriever against the reference's golden tensors: cases A, B, C of
// retriever_cases (intermediates included) and realdim_public (generator probes first).
//
// Tolerances, and why:
// - k_float: exact. One float32 multiply of an exactly decoded fp8 value, as the reference.
// - freqs at positions: 2e-6 absolute. Same float32 angle; cos/sin of it differ by at most
//   an ulp or two between libm implementations.
// - fused_w: 2e-5 relative to the row's largest weight. A float32 GEMV whose summation order
//   differs from PyTorch's (D = 128 terms).
// - q: the reference rounds q to bf16 twice. A float32 GEMV that differs in the last bit can
//   land on the other side of a bf16 rounding boundary, which moves that element by one bf16
//   ulp (2^-8 relative) before the Hadamard spreads it over the head. So per head we allow
//   |dq| <= 1e-5 * max|q_head| (summation noise) for almost all entries, and count the
//   entries off by up to one bf16 ulp of the head's largest pre-Hadamard value; there must
//   be few of them (the count is printed).
// - logits: 1e-4 absolute + 1e-3 relative (q errors above, summed over 4 heads x 128 dims).
// - masks: identical, except entries whose reference score lies within the score tolerance
//   of the boundary (the threshold, or for top-k the k-th score): only there can a score
//   that is within tolerance land on the other side. Those are counted and printed; on
//   these fixtures there are none (0 for every mask of A, B, C and realdim_public).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "src/formats/safetensors.hpp"
#include "src/retriever/query.hpp"
#include "src/retriever/retriever.hpp"
#include "src/retriever/synthetic.hpp"
#include "src/numerics/rope.hpp"
#include "tests/fixtures.hpp"

using namespace flashmem;

namespace {

struct Case {
  std::string prefix, checkpoint;
  std::vector<std::string> layers;
};

const Case kCases[] = {
    {"A.", "retriever_small.safetensors", {"l10", "l12", "l20"}},
    {"B.", "retriever_small.safetensors", {"l10", "l12", "l20"}},
    {"C.", "retriever_small_bf16.safetensors", {"l20", "l10"}},
};

struct Loaded {
  SafetensorsFile file;
  std::shared_ptr<RetrieverWeights> weights;
  std::vector<float> hidden;
  std::vector<uint8_t> keys;
  std::vector<int64_t> positions;
  int64_t B, N, max_position;
  ScoreInputs inputs() const { return {hidden, CompressedKeysView{keys.data(), B, N}, positions}; }
};

Loaded load_case(const std::string& cases_file, const std::string& prefix, const std::string& ckpt,
                 const std::vector<std::string>& layers) {
  Loaded c{SafetensorsFile::open(testing::fixture(cases_file)), nullptr, {}, {}, {}, 0, 0, 0};
  c.weights = std::make_shared<RetrieverWeights>(ckpt.empty() ? synthetic_retriever(1) : load_retriever(testing::fixture(ckpt), layers));
  const auto& k = c.file.tensor(prefix + "compressed_k");
  c.B = k.shape[0];
  c.N = k.shape[1];
  c.keys.assign(k.as<uint8_t>().begin(), k.as<uint8_t>().end());
  c.hidden = c.file.read_f32(prefix + "hidden");
  c.positions = c.file.read_i64(prefix + "positions");
  c.max_position = c.file.contains(prefix + "max_position") ? c.file.read_i64(prefix + "max_position")[0] : kDefaultMaxPosition;
  return c;
}

// Checks a mask; differences allowed only where the reference score is within the band of
// `boundary` (the threshold, or per row the k-th largest score). Returns the near count.
int check_mask(const std::vector<uint8_t>& ours, std::span<const uint8_t> ref, std::span<const float> ref_scores,
               const std::vector<float>& boundary, int64_t N, double band, const std::string& what) {
  int near = 0, bad = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    if (ours[i] == ref[i]) continue;
    if (std::fabs(ref_scores[i] - boundary[i / N]) <= band) ++near;
    else ++bad;
  }
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " mask entries differ away from the boundary");
  MESSAGE(what, ": ", near, " differing entries within ", band, " of the boundary");
  return near;
}

std::vector<float> kth_scores(std::span<const float> scores, int64_t B, int64_t N, int64_t k) {
  std::vector<float> out(B);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> row(scores.begin() + b * N, scores.begin() + (b + 1) * N);
    std::nth_element(row.begin(), row.begin() + (k - 1), row.end(), std::greater<>());
    out[b] = row[k - 1];
  }
  return out;
}

void check_close(std::span<const float> ours, std::span<const float> ref, double abs_tol, double rel_tol, const std::string& what) {
  REQUIRE(ours.size() == ref.size());
  double worst = 0;
  int bad = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    worst = std::max(worst, std::fabs(double(ours[i]) - ref[i]));
    bad += !testing::close(ours[i], ref[i], abs_tol, rel_tol);
  }
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " of ", ours.size(), " outside tolerance; worst |diff| ", worst);
}

}  // namespace

TEST_CASE("retriever_cases A, B, C: intermediates and outputs match the reference") {
  for (const Case& spec : kCases) {
    CAPTURE(spec.prefix);
    Loaded c = load_case("retriever_cases.safetensors", spec.prefix, spec.checkpoint, spec.layers);
    const std::string& p = spec.prefix;

    // k_float: exact
    const auto k_ref = c.file.tensor(p + "k_float").as<float>();
    std::vector<float> k(128);
    int k_mismatch = 0;
    for (int64_t i = 0; i < c.B * c.N; ++i) {
      dequantize_chunk(c.keys.data() + i * kChunkBytes, k.data());
      k_mismatch += std::memcmp(k.data(), k_ref.data() + i * 128, 128 * sizeof(float)) != 0;
    }
    CHECK(k_mismatch == 0);

    // RoPE at the clamped positions
    const auto freqs = c.file.tensor(p + "freqs_cis_at_positions").as<float>();
    for (int64_t b = 0; b < c.B; ++b) {
      const RopeAngles a = rope_at(c.positions[b], c.max_position);
      for (int i = 0; i < kRopePairs; ++i) {
        CHECK(testing::close(a.cos[i], freqs[(b * kRopePairs + i) * 2], 2e-6, 0));
        CHECK(testing::close(a.sin[i], freqs[(b * kRopePairs + i) * 2 + 1], 2e-6, 0));
      }
    }

    // Query side per layer
    for (size_t l = 0; l < spec.layers.size(); ++l) {
      const std::string lp = p + spec.layers[l] + ".";
      const LayerQueries q = compute_queries(*c.weights, l, c.hidden, c.positions, c.max_position);
      const auto fw_ref = c.file.tensor(lp + "fused_w").as<float>();
      const auto q_ref = c.file.tensor(lp + "q").as<float>();
      const int64_t H = c.weights->heads;
      for (int64_t b = 0; b < c.B; ++b) {
        float fw_max = 0;
        for (int64_t h = 0; h < H; ++h) fw_max = std::max(fw_max, std::fabs(fw_ref[b * H + h]));
        for (int64_t h = 0; h < H; ++h) CHECK(testing::close(q.fused_w[b * H + h], fw_ref[b * H + h], 2e-5 * fw_max, 0));
      }
      int tight_miss = 0, bad = 0;
      for (int64_t bh = 0; bh < c.B * H; ++bh) {
        float head_max = 0;
        for (int d = 0; d < 128; ++d) head_max = std::max(head_max, std::fabs(q_ref[bh * 128 + d]));
        for (int d = 0; d < 128; ++d) {
          const double diff = std::fabs(double(q.q[bh * 128 + d]) - q_ref[bh * 128 + d]);
          if (diff <= 1e-5 * head_max) continue;
          ++tight_miss;
          // one bf16 ulp of a pre-Hadamard value is at most 2^-8 * sqrt(128) * head_max
          bad += diff > std::ldexp(1.0, -8) * std::sqrt(128.0) * head_max;
        }
      }
      CHECK_MESSAGE(bad == 0, lp, "q: ", bad, " values off by more than a bf16 step");
      CHECK_MESSAGE(tight_miss <= c.B * H * 128 / 20, lp, "q: ", tight_miss, " values beyond summation noise");
      MESSAGE(lp, "q: ", tight_miss, " of ", c.B * H * 128, " values differ by a bf16 rounding flip");
    }

    // Logits, sigmoid, ensembles, masks
    for (Ensemble ens : {Ensemble::Max, Ensemble::Mean}) {
      RetrieverOptions opt;
      opt.max_position = c.max_position;
      opt.ensemble = ens;
      auto retriever = make_retriever(Device::Cpu, c.weights, opt);
      const Scores s = retriever->score(c.inputs(), true);
      const std::string tag = ensemble_name(ens);
      for (size_t l = 0; l < spec.layers.size(); ++l) {
        const std::string lp = p + spec.layers[l] + ".";
        check_close(s.layer_logits[l], c.file.tensor(lp + "logits").as<float>(), 1e-4, 1e-3, lp + "logits");
        std::vector<float> sig(s.layer_logits[l].size());
        std::transform(s.layer_logits[l].begin(), s.layer_logits[l].end(), sig.begin(), sigmoid);
        check_close(sig, c.file.tensor(lp + "sigmoid").as<float>(), 1e-5, 0, lp + "sigmoid");
        const std::vector<float> alone = retriever->layer_logits(l, c.inputs());
        check_close(alone, c.file.tensor(lp + "logits").as<float>(), 1e-4, 1e-3, lp + "logits (per-layer entry)");
      }
      const auto ref_scores = c.file.tensor(p + "ensemble_" + tag).as<float>();
      check_close(s.ensemble, ref_scores, 1e-5, 0, p + "ensemble_" + tag);

      const Selection thr = retriever->retrieve(c.inputs(), SelectRule::threshold_rule(0.5f));
      check_mask(thr.keep, c.file.tensor(p + "keep_thr0.5_" + tag).as<uint8_t>(), ref_scores,
                 std::vector<float>(c.B, 0.5f), c.N, 1e-5, p + "keep_thr0.5_" + tag);
      if (ens == Ensemble::Max) {
        const Selection top = retriever->retrieve(c.inputs(), SelectRule::top_k_rule(10));
        for (int64_t b = 0; b < c.B; ++b) CHECK(top.kept_count[b] == 10);
        check_mask(top.keep, c.file.tensor(p + "keep_top10_max").as<uint8_t>(), ref_scores,
                   kth_scores(ref_scores, c.B, c.N, 10), c.N, 1e-5, p + "keep_top10_max");
      }
    }
  }
}

TEST_CASE("realdim_public: generator probes are bit-exact") {
  const auto file = SafetensorsFile::open(testing::fixture("realdim_public.safetensors"));
  REQUIRE(file.read_i64("seed")[0] == 1);
  const RetrieverWeights w = synthetic_retriever(1);
  REQUIRE(w.hidden == 4096);
  REQUIRE(w.rank == 2048);
  REQUIRE(w.heads == 128);
  for (const auto& [layer, index] : {std::pair{"l10", 0}, std::pair{"l20", 2}}) {
    const RetrieverLayer& L = w.layers[index];
    const std::pair<const char*, const std::vector<float>*> tensors[] = {
        {"wq_a.weight", &L.wq_a}, {"wq_b.weight", &L.wq_b}, {"q_norm_weight", &L.q_norm}, {"weights_proj.weight", &L.weights_proj}};
    for (const auto& [name, values] : tensors) {
      const auto head = file.tensor(std::string("probe.") + layer + "." + name).as<float>();
      const auto tail = file.tensor(std::string("probe_tail.") + layer + "." + name).as<float>();
      for (int i = 0; i < 16; ++i) {
        CHECK_MESSAGE(std::memcmp(&head[i], &(*values)[i], 4) == 0, layer, ".", name, "[", i, "]");
        CHECK_MESSAGE(std::memcmp(&tail[i], &(*values)[values->size() - 16 + i], 4) == 0, layer, ".", name, " tail ", i);
      }
    }
  }
}

TEST_CASE("realdim_public: logits, ensembles and masks at the released dimensions") {
  Loaded c = load_case("realdim_public.safetensors", "", "", {});
  for (Ensemble ens : {Ensemble::Max, Ensemble::Mean}) {
    RetrieverOptions opt;
    opt.ensemble = ens;
    auto retriever = make_retriever(Device::Cpu, c.weights, opt);
    const Scores s = retriever->score(c.inputs(), true);
    for (size_t l = 0; l < c.weights->layers.size(); ++l) {
      const std::string name = c.weights->layers[l].name + ".logits";
      // D = 4096 and R = 2048 terms per GEMV and 128 heads per logit: relative 1e-3 as above,
      // absolute 2e-3 for logits that nearly cancel across heads.
      check_close(s.layer_logits[l], c.file.tensor(name).as<float>(), 2e-3, 1e-3, name);
    }
    const std::string tag = ensemble_name(ens);
    const auto ref_scores = c.file.tensor("ensemble_" + tag).as<float>();
    // sigmoid's slope is at most 1/4, so the 2e-3 logit tolerance allows 5e-4 on scores.
    check_close(s.ensemble, ref_scores, 5e-4, 0, "ensemble_" + tag);
    if (ens == Ensemble::Max) {
      const Selection thr = retriever->retrieve(c.inputs(), SelectRule::threshold_rule(0.5f));
      check_mask(thr.keep, c.file.tensor("keep_thr0.5_max").as<uint8_t>(), ref_scores, std::vector<float>(c.B, 0.5f), c.N,
                 5e-4, "keep_thr0.5_max");
      const Selection top = retriever->retrieve(c.inputs(), SelectRule::top_k_rule(64));
      check_mask(top.keep, c.file.tensor("keep_top64_max").as<uint8_t>(), ref_scores, kth_scores(ref_scores, c.B, c.N, 64),
                 c.N, 5e-4, "keep_top64_max");
    }
  }
}
