// The seeded synthetic checkpoint of SPEC 8, so every demo runs without the 510 MB release.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "src/retriever/weights.hpp"

namespace flashmem {

uint64_t splitmix64(uint64_t x);
// Uniform in [-1, 1): float32(m - 2^23) / 2^23 with m the top 24 bits of splitmix64.
float pm1(uint64_t seed, uint64_t stream, uint64_t index);

struct SyntheticShape {
  int64_t hidden = 4096, rank = 2048, heads = 128;
  std::vector<std::string> layers = {"l10", "l12", "l20"};
};

// Layer j of shape.layers uses streams 4j..4j+3 (SPEC 8), whatever its name.
RetrieverWeights synthetic_retriever(uint64_t seed, const SyntheticShape& shape = {});

}  // namespace flashmem
