#include "src/numerics/rope.hpp"

#include <algorithm>
#include <cmath>

namespace flashmem {

namespace {
constexpr int kRopeDim = 64;
constexpr double kBase = 160000.0, kFactor = 16.0, kOriginalLength = 65536.0;
constexpr double kBetaFast = 32.0, kBetaSlow = 1.0;

// The rotary dimension at which `rotations` full turns happen over the original length.
double correction_dim(double rotations) {
  return kRopeDim * std::log(kOriginalLength / (rotations * 2.0 * M_PI)) / (2.0 * std::log(kBase));
}
}  // namespace

const std::array<float, kRopePairs>& yarn_frequencies() {
  static const std::array<float, kRopePairs> freqs = [] {
    const int low = std::max(static_cast<int>(std::floor(correction_dim(kBetaFast))), 0);
    const int high = std::min(static_cast<int>(std::ceil(correction_dim(kBetaSlow))), kRopePairs - 1);
    const float span = static_cast<float>(std::max(high - low, 1));
    std::array<float, kRopePairs> out{};
    for (int i = 0; i < kRopePairs; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(kRopeDim);
      const float freq = 1.0f / std::pow(static_cast<float>(kBase), exponent);
      const float ramp = std::clamp((static_cast<float>(i) - static_cast<float>(low)) / span, 0.0f, 1.0f);
      out[i] = freq * (1.0f - ramp) + (freq / static_cast<float>(kFactor)) * ramp;
    }
    return out;
  }();
  return freqs;
}

RopeAngles rope_at(int64_t position, int64_t max_position) {
  const int64_t t = std::clamp<int64_t>(position, 0, max_position - 1);
  const auto& freqs = yarn_frequencies();
  RopeAngles angles;
  for (int i = 0; i < kRopePairs; ++i) {
    const float angle = static_cast<float>(t) * freqs[i];
    angles.cos[i] = std::cos(angle);
    angles.sin[i] = std::sin(angle);
  }
  return angles;
}

void apply_rope(std::span<float, 2 * kRopePairs> x, const RopeAngles& angles) {
  for (int i = 0; i < kRopePairs; ++i) {
    const float re = x[2 * i], im = x[2 * i + 1];
    x[2 * i] = re * angles.cos[i] - im * angles.sin[i];
    x[2 * i + 1] = re * angles.sin[i] + im * angles.cos[i];
  }
}

}  // namespace flashmem
