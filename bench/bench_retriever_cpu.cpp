// CPU retriever at the released dimensions (D 4096, R 2048, H 128, 3 layers), B = 1.
// Floor: the weights (510 MB of float32) and the keys must be read once, at the host read
// bandwidth this benchmark measures itself. Target (issue 3): within 2x of the floor at N 4096.
//   usage: bench_retriever_cpu [N ...]     (default 4096 65536)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "bench/bandwidth.hpp"
#include "src/common/parallel.hpp"
#include "src/retriever/retriever.hpp"
#include "src/retriever/score_inputs.hpp"
#include "src/retriever/synthetic.hpp"

using namespace flashmem;

int main(int argc, char** argv) {
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) sizes = {4096, 65536};

  const double bandwidth = bench::measure_host_read_bandwidth();
  auto weights = std::make_shared<RetrieverWeights>(synthetic_retriever(1));
  auto retriever = make_retriever(Device::Cpu, weights);
  std::printf("CPU retriever, D %lld R %lld H %lld, %zu layers, %d threads, measured read bandwidth %.1f GB/s\n",
              (long long)weights->hidden, (long long)weights->rank, (long long)weights->heads, weights->layers.size(),
              worker_count(), bandwidth / 1e9);
  std::printf("%4s %9s %12s %12s %8s %s\n", "B", "N", "median ms", "floor ms", "ratio", "target");
  for (int64_t N : sizes) {
    const OwnedScoreInputs in = mock_score_inputs(1, N, weights->hidden, 3);
    std::vector<double> times;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      const Scores s = retriever->score(in.view());
      times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      if (s.ensemble.empty()) return 1;
    }
    std::sort(times.begin(), times.end());
    const double floor_ms = (weights->parameter_bytes() + in.keys.size()) / bandwidth * 1e3;
    std::printf("%4d %9lld %12.2f %12.2f %8.2f %s\n", 1, (long long)N, times[times.size() / 2], floor_ms,
                times[times.size() / 2] / floor_ms, N == 4096 ? "<= 2x floor" : "-");
  }
  return 0;
}
