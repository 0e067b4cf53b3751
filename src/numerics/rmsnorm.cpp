#include "src/numerics/rmsnorm.hpp"

#include <cmath>

namespace flashmem {

void rmsnorm(std::span<const float> x, std::span<const float> weight, std::span<float> out) {
  double sum = 0.0;
  for (float v : x) sum += static_cast<double>(v) * v;
  const float mean = static_cast<float>(sum / static_cast<double>(x.size()));
  const float inv = 1.0f / std::sqrt(mean + kRmsEps);
  for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * inv * weight[i];
}

}  // namespace flashmem
