#include "bench/gpu_rates.hpp"

#include <algorithm>
#include <functional>

#include "src/common/cuda_support.hpp"

namespace flashmem::bench {

namespace {
// Milliseconds of the fastest of 5 timed runs of `work` (a first, untimed run warms up).
float best_ms(const std::function<void()>& work) {
  cudaEvent_t e0, e1;
  FM_CUDA(cudaEventCreate(&e0));
  FM_CUDA(cudaEventCreate(&e1));
  float best = 1e30f;
  for (int i = 0; i < 6; ++i) {
    FM_CUDA(cudaEventRecord(e0));
    work();
    FM_CUDA(cudaEventRecord(e1));
    FM_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    FM_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i > 0) best = std::min(best, ms);
  }
  FM_CUDA(cudaEventDestroy(e0));
  FM_CUDA(cudaEventDestroy(e1));
  return best;
}
}  // namespace

double measure_device_copy_bandwidth() {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer<> a, b;
  FM_CUDA(cudaMemset(a.reserve(bytes, "bandwidth probe"), 1, bytes));
  b.reserve(bytes, "bandwidth probe");
  const float ms = best_ms([&] { FM_CUDA(cudaMemcpy(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice)); });
  return 2.0 * bytes / (ms * 1e-3);
}

double measure_bf16_gemm_rate() {
  const int n = 8192;
  const size_t elems = size_t{1} * n * n;
  DeviceBuffer<> a, b, c;
  FM_CUDA(cudaMemset(a.reserve(2 * elems, "gemm probe"), 0x3c, 2 * elems));  // not zeros: bf16 0x3c3c ~ 0.0115
  FM_CUDA(cudaMemset(b.reserve(2 * elems, "gemm probe"), 0x3c, 2 * elems));
  c.reserve(4 * elems, "gemm probe");
  cublasHandle_t h;
  FM_CUBLAS(cublasCreate(&h));
  const float one = 1, zero = 0;
  const float ms = best_ms([&] {
    FM_CUBLAS(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a.get(), CUDA_R_16BF, n, b.get(), CUDA_R_16BF, n,
                           &zero, c.get(), CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  FM_CUBLAS(cublasDestroy(h));
  return 2.0 * n * n * n / (ms * 1e-3);
}

}  // namespace flashmem::bench
