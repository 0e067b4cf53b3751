// The retriever's query side (SPEC 3) as pure functions: hidden state and position in,
// Hadamard-rotated bf16-rounded query [H, 128] and fused head weights [H] out.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "src/retriever/weights.hpp"

namespace flashmem {

struct LayerQueries {
  int64_t batch = 0, heads = 0;
  std::vector<float> q;        // [batch, heads, 128]
  std::vector<float> fused_w;  // [batch, heads], already times 128^-0.5 * H^-0.5
};

// hidden [batch, D], positions [batch] (clamped to [0, max_position - 1]).
LayerQueries compute_queries(const RetrieverWeights& weights, size_t layer, std::span<const float> hidden,
                             std::span<const int64_t> positions, int64_t max_position);

// Steps 3.4-3.6 on one head's projected query (in place): bf16 round, RoPE on the last 64
// dims then bf16 round again, Hadamard. Shared by every backend's reference path.
struct RopeAngles;
void finish_head_query(std::span<float, 128> q, const RopeAngles& angles);

}  // namespace flashmem
