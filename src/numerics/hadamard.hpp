// Normalised Walsh-Hadamard transform over 128 values (SPEC 3.6): Sylvester order,
// butterflies with stride 1, 2, ..., 64, then a division by sqrt(128).
#pragma once
#include <span>

namespace flashmem {

constexpr int kHeadDim = 128;

void hadamard_128(std::span<float, kHeadDim> x);

}  // namespace flashmem
