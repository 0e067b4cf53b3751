#include "src/numerics/hadamard.hpp"

#include <cmath>

namespace flashmem {

void hadamard_128(std::span<float, kHeadDim> x) {
  for (int stride = 1; stride < kHeadDim; stride *= 2)
    for (int block = 0; block < kHeadDim; block += 2 * stride)
      for (int j = block; j < block + stride; ++j) {
        const float a = x[j], b = x[j + stride];
        x[j] = a + b;
        x[j + stride] = a - b;
      }
  const float norm = std::sqrt(static_cast<float>(kHeadDim));
  for (float& v : x) v /= norm;
}

}  // namespace flashmem
