#include "src/retriever/selection.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "src/common/error.hpp"

namespace flashmem {

const char* ensemble_name(Ensemble e) { return e == Ensemble::Max ? "max" : "mean"; }

Ensemble parse_ensemble(const std::string& text, const std::string& field) {
  if (text == "max") return Ensemble::Max;
  if (text == "mean") return Ensemble::Mean;
  fail(field, ": '", text, "' is not an ensemble, expected max or mean");
}

SelectRule SelectRule::threshold_rule(float t) { return {Kind::Threshold, t, 0}; }
SelectRule SelectRule::top_k_rule(int64_t k) { return {Kind::TopK, 0.5f, k}; }

void SelectRule::validate() const {
  if (kind == Kind::Threshold && !(threshold >= 0.0f && threshold <= 1.0f))
    fail("threshold: ", threshold, " is outside [0, 1] (scores are sigmoids)");
  if (kind == Kind::TopK && top_k <= 0) fail("top_k: ", top_k, " must be a positive number of chunks");
}

Selection select_chunks(std::span<const float> scores, int64_t batch, int64_t chunks, const SelectRule& rule) {
  rule.validate();
  Selection out{batch, chunks, std::vector<uint8_t>(batch * chunks, 0), std::vector<int64_t>(batch, 0), {}};
  if (rule.kind == SelectRule::Kind::Threshold) {
    for (int64_t i = 0; i < batch * chunks; ++i) out.keep[i] = scores[i] > rule.threshold;
  } else {
    const int64_t k = std::min(rule.top_k, chunks);
    out.top_indices.resize(batch * k);
    std::vector<int64_t> order(chunks);
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = scores.data() + b * chunks;
      std::iota(order.begin(), order.end(), 0);
      // Higher score first; equal scores keep the lower index first.
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t x, int64_t y) {
        return row[x] > row[y] || (row[x] == row[y] && x < y);
      });
      std::copy_n(order.begin(), k, out.top_indices.begin() + b * k);
      for (int64_t i = 0; i < k; ++i) out.keep[b * chunks + order[i]] = 1;
    }
  }
  for (int64_t b = 0; b < batch; ++b)
    out.kept_count[b] = std::count(out.keep.begin() + b * chunks, out.keep.begin() + (b + 1) * chunks, 1);
  return out;
}

}  // namespace flashmem

namespace flashmem {

float sigmoid(float logit) { return 1.0f / (1.0f + std::exp(-logit)); }

std::vector<float> ensemble_from_logits(const std::vector<std::vector<float>>& layer_logits, Ensemble ensemble) {
  if (layer_logits.empty()) fail("ensemble: no layers");
  std::vector<float> out(layer_logits[0].size());
  for (size_t i = 0; i < out.size(); ++i) {
    float acc = sigmoid(layer_logits[0][i]);
    for (size_t l = 1; l < layer_logits.size(); ++l) {
      const float s = sigmoid(layer_logits[l][i]);
      acc = ensemble == Ensemble::Max ? std::max(acc, s) : acc + s;
    }
    out[i] = ensemble == Ensemble::Max ? acc : acc / static_cast<float>(layer_logits.size());
  }
  return out;
}

}  // namespace flashmem
