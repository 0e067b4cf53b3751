#include "src/retriever/synthetic.hpp"

#include <cmath>

#include "src/common/error.hpp"
#include "src/common/parallel.hpp"
#include "src/numerics/hadamard.hpp"

namespace flashmem {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  uint64_t z = x;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

float pm1(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t m = splitmix64(((seed << 32) | (stream << 28)) + index) >> 40;
  return static_cast<float>(static_cast<int64_t>(m) - (int64_t{1} << 23)) / static_cast<float>(1 << 23);
}

namespace {
// values[i] = pm1(seed, stream, i) * amplitude + offset, filled in parallel.
std::vector<float> generate(uint64_t seed, uint64_t stream, int64_t count, float amplitude, float offset) {
  std::vector<float> values(count);
  parallel_for(count, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) values[i] = pm1(seed, stream, i) * amplitude + offset;
  });
  return values;
}
}  // namespace

RetrieverWeights synthetic_retriever(uint64_t seed, const SyntheticShape& shape) {
  if (shape.hidden <= 0 || shape.rank <= 0 || shape.heads <= 0 || shape.layers.empty())
    fail("synthetic checkpoint: hidden, rank, heads and layers must be positive");
  const int64_t D = shape.hidden, R = shape.rank, H = shape.heads;
  RetrieverWeights weights{D, R, H, {}};
  for (size_t j = 0; j < shape.layers.size(); ++j) {
    const uint64_t s = 4 * j;
    RetrieverLayer layer;
    layer.name = shape.layers[j];
    // "+ 0.0f" adds nothing: x * a + 0 == x * a exactly for these finite values.
    layer.wq_a = generate(seed, s + 0, R * D, static_cast<float>(std::sqrt(3.0 / D)), 0.0f);
    layer.wq_b = generate(seed, s + 1, H * kHeadDim * R, static_cast<float>(std::sqrt(3.0 / R)), 0.0f);
    layer.q_norm = generate(seed, s + 2, R, 0.1f, 1.0f);
    layer.weights_proj = generate(seed, s + 3, H * D, static_cast<float>(64.0 * std::sqrt(3.0 / D)), 0.0f);
    weights.layers.push_back(std::move(layer));
  }
  return weights;
}

}  // namespace flashmem
