// Toy decoder step (SPEC 5), dense and with 10% of the chunks kept: median ms/step, the
// floor (bytes one step must read / a bandwidth measured here), ratio, and the reference's
// anchors (PyTorch toy loop on an H100: 1.78 ms/step at N 256, 11.44 ms/step at N 4096).
// Bytes per step: the projection weights (wq, wo, mlp_up, mlp_down per layer, lm_head) and
// the kept chunks' keys and values of both layers; the step() call includes the keep-mask
// upload and the result download, as the decode loop sees it.
//   usage: bench_decoder [cpu|cuda] [--hidden D] [--batch B] [--reps R] [--cublas] [N ...]
//   (--cublas: the CUDA projections through cuBLAS even at B <= 4, for comparison)
//   defaults: cuda: D 4096, B 1, R 50, N 256 4096 65536; cpu: D 4096, B 1, R 5, N 256 2048
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/bandwidth.hpp"
#include "src/common/parallel.hpp"
#include "src/retriever/synthetic.hpp"
#include "toy_model/decoder.hpp"

#ifdef FLASHMEM_TOY_CUDA
#include "bench/gpu_rates.hpp"
#include "src/common/cuda_support.hpp"
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#endif

using namespace flashmem;

namespace {

#ifdef FLASHMEM_TOY_CUDA

// One fp32 SGEMM with B columns over an [out, in] weight, as the decoder issues it: GB/s.
double probe_projection(int64_t out, int64_t in, int64_t batch) {
  float *w = nullptr, *x = nullptr, *y = nullptr;
  FM_CUDA(cudaMalloc(reinterpret_cast<void**>(&w), out * in * 4));
  FM_CUDA(cudaMalloc(reinterpret_cast<void**>(&x), in * batch * 4));
  FM_CUDA(cudaMalloc(reinterpret_cast<void**>(&y), out * batch * 4));
  FM_CUDA(cudaMemset(w, 0, out * in * 4));
  FM_CUDA(cudaMemset(x, 0, in * batch * 4));
  cublasHandle_t h;
  FM_CUBLAS(cublasCreate(&h));
  const float one = 1.0f, zero = 0.0f;
  cudaEvent_t e0, e1;
  FM_CUDA(cudaEventCreate(&e0));
  FM_CUDA(cudaEventCreate(&e1));
  const int reps = 50;
  FM_CUBLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, out, batch, in, &one, w, in, x, in, &zero, y, out));
  FM_CUDA(cudaEventRecord(e0));
  for (int i = 0; i < reps; ++i)
    FM_CUBLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, out, batch, in, &one, w, in, x, in, &zero, y, out));
  FM_CUDA(cudaEventRecord(e1));
  FM_CUDA(cudaEventSynchronize(e1));
  float ms = 0;
  FM_CUDA(cudaEventElapsedTime(&ms, e0, e1));
  cublasDestroy(h);
  cudaFree(w);
  cudaFree(x);
  cudaFree(y);
  return out * in * 4.0 / (ms / reps * 1e-3);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Device device = Device::Cpu;
  int64_t hidden = 4096, batch = 1, reps = -1;
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "cpu") device = Device::Cpu;
    else if (a == "cuda") device = Device::Cuda;
    else if (a == "--hidden" && i + 1 < argc) hidden = std::atoll(argv[++i]);
    else if (a == "--batch" && i + 1 < argc) batch = std::atoll(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::atoll(argv[++i]);
    else if (a == "--cublas") setenv("FLASHMEM_TOY_GEMM", "cublas", 1);  // projections through cuBLAS only
    else sizes.push_back(std::atoll(a.c_str()));
  }
  const bool cuda = device == Device::Cuda;
  if (sizes.empty()) sizes = cuda ? std::vector<int64_t>{256, 4096, 65536} : std::vector<int64_t>{256, 2048};
  if (reps < 0) reps = cuda ? 50 : 5;

  double bandwidth = 0;
  const char* bw_what = "";
  if (cuda) {
#ifdef FLASHMEM_TOY_CUDA
    bandwidth = bench::measure_device_copy_bandwidth();
    bw_what = "device-to-device copy, read + write";
#else
    std::fprintf(stderr, "this build has no CUDA toy decoder\n");
    return 1;
#endif
  } else {
    bandwidth = bench::measure_host_read_bandwidth();
    bw_what = "host read";
  }
  const char* gemm = std::getenv("FLASHMEM_TOY_GEMM");
  if (cuda) std::printf("projections: %s\n", gemm && std::strcmp(gemm, "cublas") == 0 ? "cuBLAS SGEMM" : "skinny GEMV kernel at B <= 4, else cuBLAS");
  std::printf("toy decoder step, %s, D %lld, 8 heads, 2 layers, vocab 512, B %lld, median of %lld, %s bandwidth %.1f GB/s",
              device_name(device), (long long)hidden, (long long)batch, (long long)reps, bw_what, bandwidth / 1e9);
  if (!cuda) std::printf(", %d threads", worker_count());
  std::printf("\n");
#ifdef FLASHMEM_TOY_CUDA
  if (cuda) {
    std::printf("cuBLAS SGEMM probe at B %lld: [4096,4096] %.0f GB/s, [8192,4096] %.0f GB/s, [4096,8192] %.0f GB/s\n",
                (long long)batch, probe_projection(hidden, hidden, batch) / 1e9, probe_projection(2 * hidden, hidden, batch) / 1e9,
                probe_projection(hidden, 2 * hidden, batch) / 1e9);
  }
#endif
  std::printf("| N | kept | median ms/step | floor ms | ratio | sparse/dense | anchor (reference) |\n");
  std::printf("|---|------|----------------|----------|-------|--------------|--------------------|\n");

  ToyDecoderShape shape;
  shape.hidden = hidden;
  shape.chunks = 1;
  auto weights = std::make_shared<ToyDecoderWeights>(synthetic_toy_decoder(1, shape));
  const int64_t D = hidden, V = weights->vocab, L = static_cast<int64_t>(weights->layers.size());
  const double weight_bytes = (L * 6.0 * D * D + V * D) * 4.0;  // wq, wo (D^2), mlp_up, mlp_down (2 D^2), lm_head
  for (const int64_t N : sizes) {
    weights->chunks = N;
    weights->memory = synthetic_toy_memory(1, N, D);
    auto decoder = make_decoder(device, weights);
    std::vector<int64_t> tokens(batch);
    for (int64_t b = 0; b < batch; ++b) tokens[b] = (17 * b + 3) % V;
    // 10% kept, scattered: chunk n kept when a hash of n falls in the lowest tenth.
    std::vector<uint8_t> sparse(batch * N);
    int64_t kept = 0;
    for (int64_t n = 0; n < N; ++n) {
      const bool k = splitmix64(static_cast<uint64_t>(n) * 7919 + 1) % 10 == 0;
      kept += k;
      for (int64_t b = 0; b < batch; ++b) sparse[b * N + n] = k;
    }
    double dense_ms = 0;
    for (const bool dense : {true, false}) {
      const std::span<const uint8_t> keep = dense ? std::span<const uint8_t>{} : std::span<const uint8_t>(sparse);
      std::vector<double> times;
      for (int64_t r = 0; r < reps + 2; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const DecoderStep s = decoder->step(tokens, keep, false);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (s.next_token.empty()) return 1;
        if (r >= 2) times.push_back(ms);  // two warm-up steps
      }
      std::sort(times.begin(), times.end());
      const double median = times[times.size() / 2];
      const int64_t chunks_read = dense ? N : kept;
      const double floor_ms = (weight_bytes + chunks_read * D * 2.0 * L * 4.0) / bandwidth * 1e3;
      if (dense) dense_ms = median;
      const char* anchor = !dense ? "" : N == 256 ? "1.78" : N == 4096 ? "11.44" : "";
      char ratio[32] = "";
      if (!dense) std::snprintf(ratio, sizeof ratio, "%.2f", median / dense_ms);
      std::printf("| %lld | %s | %.3f | %.3f | %.2f | %s | %s |\n", (long long)N, dense ? "100%" : "10%", median, floor_ms,
                  median / floor_ms, ratio, anchor);
      std::fflush(stdout);
    }
  }
  return 0;
}
