// YaRN rotary embedding of the retriever query (SPEC 3.5 and the table in SPEC 3):
// rope_dim 64 (32 complex pairs), base 160000, factor 16, original length 65536,
// beta_fast 32, beta_slow 1. Angles are computed on demand for one position, so a 1M-token
// table is never materialised.
#pragma once
#include <array>
#include <cstdint>
#include <span>

namespace flashmem {

constexpr int kRopePairs = 32;
constexpr int64_t kDefaultMaxPosition = 524288;

// The 32 YaRN-mixed inverse frequencies (float32, as the reference computes them).
const std::array<float, kRopePairs>& yarn_frequencies();

struct RopeAngles {
  std::array<float, kRopePairs> cos, sin;
};

// cos/sin of float32(t) * freq[i] at t = clamp(position, 0, max_position - 1).
RopeAngles rope_at(int64_t position, int64_t max_position);

// Rotates pairs (x[2i], x[2i+1]) of a 64-value slice by the angles, in float32.
void apply_rope(std::span<float, 2 * kRopePairs> x, const RopeAngles& angles);

}  // namespace flashmem
