#include "bench/bandwidth.hpp"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "src/common/parallel.hpp"

namespace flashmem::bench {

double measure_host_read_bandwidth() {
  const int64_t floats = int64_t{1} << 28;  // 1 GiB
  std::vector<float> buffer(floats, 1.0f);
  double best = 0;
  volatile float sink = 0;
  for (int pass = 0; pass < 4; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<float> partial(worker_count() + 1, 0.0f);
    parallel_for(floats / 8, [&](int64_t begin, int64_t end) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = begin; i < end; ++i) acc = _mm256_add_ps(acc, _mm256_loadu_ps(buffer.data() + i * 8));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      partial[begin * worker_count() / (floats / 8)] += lanes[0];
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + partial[0];
    best = std::max(best, floats * 4.0 / s);
  }
  return best;
}

}  // namespace flashmem::bench
