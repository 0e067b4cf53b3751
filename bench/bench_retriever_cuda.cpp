// CUDA retriever benchmark at the released dimensions (D 4096, R 2048, H 128, 3 layers; the
// seeded synthetic checkpoint of SPEC 8). Inputs resident on the device (keys [B, N, 132],
// hidden [B, D]); one call = score_select_device: query side + scoring + threshold selection as
// one CUDA graph launch, then the key check, which waits for the result; host wall clock,
// median. A line per mode also times the two-call form (score_device + select_device + sync).
// Floor = max(bytes / measured copy bandwidth, FLOPs / tensor rate), bytes = weights (fp32
// exact, bf16 fast) + keys + scores + mask, FLOPs = B*N*L*H*128*2 (one term). Rate: the measured
// bf16 GEMM rate for exact (fp16 wgmma), twice it for fast (fp8 wgmma: the H100's spec ratio,
// 1979 / 989 dense TFLOP/s; no fp8 GEMM is measured here).
// Anchors: the public PyTorch reference on the same H100 (shared/DEVICE.md).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "bench/gpu_rates.hpp"
#include "src/common/cuda_support.hpp"
#include "src/common/error.hpp"
#include "src/retriever/cuda_retriever.hpp"
#include "src/retriever/synthetic.hpp"

using namespace flashmem;

namespace {


double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}


struct Anchor {
  double eager = 0, compiled = 0;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string why;
    if (!cuda_device_present(&why)) {
      std::printf("SKIP: %s\n", why.c_str());
      return 77;
    }
    // Usage: bench_retriever_cuda [REPS [VARIANT]]: VARIANT (exact, fast, exact-c, ...) runs that one alone.
    const int reps = argc > 1 ? std::atoi(argv[1]) : 30;
    const std::string only = argc > 2 ? argv[2] : "";
    cudaDeviceProp prop;
    FM_CUDA(cudaGetDeviceProperties(&prop, 0));
    const double bw = bench::measure_device_copy_bandwidth(), rate = bench::measure_bf16_gemm_rate();
    std::printf("device: %s, %d SMs; measured copy bandwidth %.0f GB/s, bf16 GEMM %.0f TFLOP/s (fp8 floor rate: 2x, "
                "%.0f TFLOP/s)\n", prop.name, prop.multiProcessorCount, bw / 1e9, rate / 1e12, 2 * rate / 1e12);

    const std::map<std::pair<int, int64_t>, Anchor> anchors = {
        {{1, 16384}, {2.877, 0}},  {{1, 65536}, {2.856, 0.739}}, {{1, 262144}, {3.114, 1.481}},
        {{1, 1048576}, {7.777, 0}}, {{8, 65536}, {4.585, 0}},     {{8, 262144}, {14.611, 8.457}}};

    double t0 = now_ms();
    auto weights = std::make_shared<const RetrieverWeights>(synthetic_retriever(1));
    std::printf("synthetic checkpoint (seed 1) in %.0f ms, %.1f MB float32\n", now_ms() - t0,
                weights->parameter_bytes() / 1e6);
    const int L = static_cast<int>(weights->layers.size());
    const int64_t D = weights->hidden, H = weights->heads;

    // Keys: one row of 1M mock chunks, repeated for the 8 rows of the largest case.
    const int64_t max_n = 1048576, max_b = 8;
    const std::vector<uint8_t> row = mock_compressed_keys(1, max_n, 42);
    size_t free0, total0;
    FM_CUDA(cudaMemGetInfo(&free0, &total0));
    uint8_t* d_keys;
    FM_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_keys), row.size() * max_b));
    for (int b = 0; b < max_b; ++b) FM_CUDA(cudaMemcpy(d_keys + b * row.size(), row.data(), row.size(), cudaMemcpyHostToDevice));
    std::vector<float> hidden(max_b * D);
    for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = pm1(77, 0, i) * 1.7f;
    float* d_hidden;
    FM_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_hidden), hidden.size() * 4));
    FM_CUDA(cudaMemcpy(d_hidden, hidden.data(), hidden.size() * 4, cudaMemcpyHostToDevice));

    std::printf("\n%-7s %2s %8s %10s %10s %7s %10s %10s %9s\n", "mode", "B", "N", "ours ms", "floor ms", "ratio",
                "ref eager", "ref comp.", "kept");
    struct Variant {
      const char* name;
      Precision precision;
      const char* gemv;
      const char* scoring = "fp8";  // fast mode's scoring (FLASHMEM_CUDA_FAST_SCORING)
    };
    for (const Variant& v : {Variant{"exact", Precision::Exact, "custom"}, Variant{"fast", Precision::Fast, "custom"},
                             Variant{"exact-c", Precision::Exact, "cublas"}, Variant{"exact-v", Precision::Exact, "sgemv"},
                             Variant{"fast-c", Precision::Fast, "cublas"},
                             Variant{"fast-h", Precision::Fast, "custom", "fp16"}}) {
      if (!only.empty() && only != v.name) continue;
      const bool main_variant = std::string(v.gemv) == "custom" && std::string(v.scoring) == "fp8";
      const bool fp8_scoring = v.precision == Precision::Fast && std::string(v.scoring) == "fp8";
      setenv("FLASHMEM_CUDA_GEMV", v.gemv, 1);
      setenv("FLASHMEM_CUDA_FAST_SCORING", v.scoring, 1);
      RetrieverOptions opt;
      opt.precision = v.precision;
      opt.max_position = 1048576;
      size_t free_before, total;
      FM_CUDA(cudaMemGetInfo(&free_before, &total));
      auto base = make_cuda_retriever(weights, opt);
      auto* r = dynamic_cast<CudaRetriever*>(base.get());
      const double weight_bytes = weights->parameter_bytes() / (v.precision == Precision::Fast ? 2.0 : 1.0);
      for (int B : {1, 8})
        for (int64_t N : {int64_t{16384}, int64_t{65536}, int64_t{262144}, max_n}) {
          if (!main_variant && !(N == 262144 || (N == max_n && B == 1))) continue;  // the variants: two sizes
          std::vector<int64_t> pos(B);
          for (int b = 0; b < B; ++b) pos[b] = 4095 + 100000 * b;
          CudaRetriever::DeviceInputs in{d_hidden, d_keys, B, N, pos};
          const SelectRule rule = SelectRule::threshold_rule(0.5f);
          for (int i = 0; i < 3; ++i) r->score_select_device(in, rule);
          std::vector<double> times;
          for (int i = 0; i < reps; ++i) {
            const double s = now_ms();
            r->score_select_device(in, rule);
            times.push_back(now_ms() - s);
          }
          long long kept = 0;
          FM_CUDA(cudaMemcpy(&kept, r->score_select_device(in, rule).kept_count, 8, cudaMemcpyDeviceToHost));
          const double bytes = weight_bytes + B * N * (132.0 + 4.0 + 1.0);
          const double flops = static_cast<double>(B) * N * L * H * 128 * 2;
          const double floor = std::max(bytes / bw, flops / (fp8_scoring ? 2 * rate : rate)) * 1e3;
          const double ours = median(times);
          const auto a = anchors.find({B, N});
          char eager[32] = "-", comp[32] = "-";
          if (a != anchors.end() && a->second.eager > 0) std::snprintf(eager, sizeof eager, "%.3f", a->second.eager);
          if (a != anchors.end() && a->second.compiled > 0) std::snprintf(comp, sizeof comp, "%.3f", a->second.compiled);
          std::printf("%-7s %2d %8lld %10.3f %10.3f %7.2f %10s %10s %9.4f\n", v.name, B, static_cast<long long>(N), ours,
                      floor, ours / floor, eager, comp, static_cast<double>(kept) / N);
          std::fflush(stdout);
          if (B == 1 && N == max_n && main_variant) {
            size_t free_after;
            FM_CUDA(cudaMemGetInfo(&free_after, &total));
            const double keys = 132.0 * N, budget = weight_bytes + 1.2 * keys + 64.0 * 1024 * 1024;
            std::printf("  peak memory B=1 N=1M: retriever holds %.1f MB (+ caller's keys %.1f MB) = %.1f MB; "
                        "cudaMemGetInfo delta incl. cuBLAS/context %.1f MB + keys; budget weights + 1.2 keys + 64 MiB "
                        "= %.1f MB\n",
                        r->device_bytes() / 1e6, keys / 1e6, (r->device_bytes() + keys) / 1e6,
                        (free_before - free_after) / 1e6, budget / 1e6);
          }
        }
      if (main_variant) {  // the query side alone (N = 1) and top-k at one size
        std::vector<int64_t> pos = {4095};
        CudaRetriever::DeviceInputs in{d_hidden, d_keys, 1, 1, pos};
        std::vector<double> times;
        for (int i = 0; i < reps + 3; ++i) {
          const double s = now_ms();
          r->score_device(in);
          r->synchronize();
          if (i >= 3) times.push_back(now_ms() - s);
        }
        std::printf("%-6s  1        1 %10.3f   (query side + launch overhead: N = 1)\n", v.name, median(times));
        in.chunks = 262144;
        times.clear();
        for (int i = 0; i < reps + 3; ++i) {
          const double s = now_ms();
          r->score_select_device(in, SelectRule::top_k_rule(512));
          if (i >= 3) times.push_back(now_ms() - s);
        }
        std::printf("%-6s  1   262144 %10.3f   (top-512 selection instead of threshold)\n", v.name, median(times));
        times.clear();
        for (int i = 0; i < reps + 3; ++i) {
          const double s = now_ms();
          r->score_device(in);
          r->select_device(SelectRule::threshold_rule(0.5f));
          r->synchronize();
          if (i >= 3) times.push_back(now_ms() - s);
        }
        std::printf("%-6s  1   262144 %10.3f   (two calls: score_device, then select_device: two launches, two waits)\n",
                    v.name, median(times));
        // Device time alone (CUDA events around the score graph, no key check, no selection):
        // what is left of the wall clock above is host work, the sync and the selection.
        cudaEvent_t e0, e1;
        FM_CUDA(cudaEventCreate(&e0));
        FM_CUDA(cudaEventCreate(&e1));
        for (int64_t N : {int64_t{1}, int64_t{262144}, max_n}) {
          in.chunks = N;
          std::vector<double> dev;
          for (int i = 0; i < reps + 3; ++i) {
            r->synchronize();
            FM_CUDA(cudaEventRecord(e0, static_cast<cudaStream_t>(r->stream())));
            r->score_device(in, false, false);
            FM_CUDA(cudaEventRecord(e1, static_cast<cudaStream_t>(r->stream())));
            FM_CUDA(cudaEventSynchronize(e1));
            float ms;
            FM_CUDA(cudaEventElapsedTime(&ms, e0, e1));
            if (i >= 3) dev.push_back(ms);
          }
          std::printf("%-6s  1 %8lld %10.3f   (device time of the score graph, CUDA events)\n", v.name,
                      static_cast<long long>(N), median(dev));
        }
        FM_CUDA(cudaEventDestroy(e0));
        FM_CUDA(cudaEventDestroy(e1));
      }
    }
    std::printf("exact/fast: projections by our GEMV at B <= 4 (cuBLAS above); -c: cuBLAS GEMM (sgemm / bf16 GemmEx) "
                "at every B; -v: cuBLAS sgemv at B = 1; fast: fp8 scoring, -h: fp16 single-term scoring\n");
    FM_CUDA(cudaFree(d_keys));
    FM_CUDA(cudaFree(d_hidden));
    (void)free0;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
