// Turning scores into a keep-set (SPEC 4): threshold (score > t, strict) or top-k
// (min(k, N) highest; ties to the lower chunk index).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace flashmem {

enum class Ensemble { Max, Mean };
const char* ensemble_name(Ensemble e);
Ensemble parse_ensemble(const std::string& text, const std::string& field);

struct SelectRule {
  enum class Kind { Threshold, TopK } kind = Kind::Threshold;
  float threshold = 0.5f;  // in [0, 1]
  int64_t top_k = 0;       // > 0
  static SelectRule threshold_rule(float t);
  static SelectRule top_k_rule(int64_t k);
  void validate() const;  // throws naming the field
};

struct Selection {
  int64_t batch = 0, chunks = 0;
  std::vector<uint8_t> keep;        // [batch, chunks], 1 = kept
  std::vector<int64_t> kept_count;  // [batch]
  // Top-k only: [batch, min(k, N)] chunk indices, highest score first (ties: lower index).
  std::vector<int64_t> top_indices;
};

Selection select_chunks(std::span<const float> scores, int64_t batch, int64_t chunks, const SelectRule& rule);

}  // namespace flashmem

namespace flashmem {

// sigmoid(logit), in float32 as the reference.
float sigmoid(float logit);

// Ensembled sigmoid scores [B*N] from per-layer logits (each [B*N]), layers in order.
std::vector<float> ensemble_from_logits(const std::vector<std::vector<float>>& layer_logits, Ensemble ensemble);

}  // namespace flashmem
