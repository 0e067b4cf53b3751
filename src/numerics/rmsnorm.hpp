// RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, eps = 1e-6 (retriever and toy decoder).
#pragma once
#include <span>

namespace flashmem {

constexpr float kRmsEps = 1e-6f;

// out may alias x. The mean of squares is accumulated in double (closer to the exact value
// than any float32 summation order, so it is the order-independent choice).
void rmsnorm(std::span<const float> x, std::span<const float> weight, std::span<float> out);

}  // namespace flashmem
