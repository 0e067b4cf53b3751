// Small-batch projection y[b, r] = sum_k W[r, k] * x[b, k] for B <= 4 rows, fp32 or bf16
// weights, fp32 inputs and accumulation. At B = 1 the retriever's query side is a read of
// all weights (510 MB fp32 / 255 MB bf16), so this is a pure weight stream: one warp per
// output row, 16-byte streaming loads of W (no L1 allocation), x from L1.
// CPU reference: linear() in src/retriever/query.cpp (Eigen); cuBLAS is the B > 4 path.
#include <cuda_bf16.h>

#include "kernels/pdl.cuh"
#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

constexpr int kGemvWarps = 8;
constexpr int kLoadsInFlight = 8;  // per lane: 128 bytes, 4 KB per warp

__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename WT>
__device__ __forceinline__ void widen(const uint4& v, float (&out)[16 / sizeof(WT)]) {
  if constexpr (sizeof(WT) == 4) {
    out[0] = __uint_as_float(v.x); out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z); out[3] = __uint_as_float(v.w);
  } else {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
}

// Contract: for z = blockIdx.y (a batch of independent matrices, e.g. layers), rows r of
// W_z = W + z*w_lstride ([rows, K] row-major, rows 16-byte aligned), x_z[b] = x + z*x_lstride
// + b*x_bstride, y_z[b][r] = y[z*y_lstride + b*y_bstride + r]. Grid (ceil(rows/8), Z), 256
// threads; K % (16 / sizeof(WT)) == 0. Chained launch (pdl.cuh): the first weight loads are
// issued before waiting for the kernel that writes x.
// x_norm (optional, [Z, K]): x_z[b] is RMS-normalised first (x * inv_rms * x_norm[z], the
// rmsnorm of query_kernels.cu, same order and roundings), into shared memory.
template <typename WT, int NB>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const WT* __restrict__ W, int64_t rows, int K,
                                                               int64_t w_lstride, const float* __restrict__ x,
                                                               int64_t x_lstride, int64_t x_bstride,
                                                               const float* __restrict__ x_norm,
                                                               float* __restrict__ y, int64_t y_lstride,
                                                               int64_t y_bstride) {
  constexpr int V = 16 / sizeof(WT);
  static_assert(V == 4 || V == 8, "16-byte loads of fp32 or bf16");
  allow_dependents();
  extern __shared__ float4 xs_raw[];
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t z = blockIdx.y;
  const WT* w = W + z * w_lstride + min(r, rows - 1) * K;
  const float* xz = x + z * x_lstride;
  int64_t xb = x_bstride;
  // kLoadsInFlight 16-byte loads are issued before the first is used (Little's law: each SM
  // needs tens of KB in flight to stream at full HBM bandwidth); the first batch before waiting
  // for the kernel that writes x.
  uint4 raw[kLoadsInFlight];
  auto load_batch = [&](int k0) {
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u)
      if (k0 + u * 32 * V < K) raw[u] = load_stream(w + k0 + u * 32 * V);
  };
  load_batch(lane * V);
  grid_dependency_wait();  // x is the previous kernel's output
  if (x_norm) {  // normalised rows into shared memory (every thread of the block takes part)
    float* xs = reinterpret_cast<float*>(xs_raw);
    const float* nz = x_norm + z * K;
    __shared__ double partial[kGemvWarps];
    for (int b = 0; b < NB; ++b) {
      const float* xr = xz + b * x_bstride;
      double sum = 0.0;
      for (int k = threadIdx.x; k < K; k += kGemvWarps * 32) sum += static_cast<double>(xr[k]) * static_cast<double>(xr[k]);
      for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) partial[threadIdx.x / 32] = sum;
      __syncthreads();
      double total = 0.0;
      for (int i = 0; i < kGemvWarps; ++i) total += partial[i];
      const float mean = static_cast<float>(total / static_cast<double>(K));
      const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, 1e-6f)));
      for (int k = threadIdx.x; k < K; k += kGemvWarps * 32) xs[b * K + k] = __fmul_rn(__fmul_rn(xr[k], inv), nz[k]);
      __syncthreads();
    }
    xz = xs;
    xb = K;
  }
  if (r >= rows) return;
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.0f;
  for (int k0 = lane * V; k0 < K; k0 += 32 * V * kLoadsInFlight) {
    if (k0 != lane * V) load_batch(k0);
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int k = k0 + u * 32 * V;
      if (k >= K) break;
      float wv[V];
      widen<WT>(raw[u], wv);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          const float4 xv = *reinterpret_cast<const float4*>(xz + b * xb + k + j);
          acc[b] += wv[j] * xv.x + wv[j + 1] * xv.y + wv[j + 2] * xv.z + wv[j + 3] * xv.w;
        }
      }
    }
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float v = acc[b];
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == b) y[z * y_lstride + b * y_bstride + r] = v;
  }
}

template <typename WT>
cudaError_t launch(const WT* W, int64_t rows, int K, int64_t w_lstride, int Z, const float* x, int64_t x_lstride,
                   int64_t x_bstride, const float* x_norm, int B, float* y, int64_t y_lstride, int64_t y_bstride,
                   bool chained, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + kGemvWarps - 1) / kGemvWarps), Z);
  const int threads = kGemvWarps * 32;
  const size_t smem = x_norm ? static_cast<size_t>(B) * K * 4 : 0;
#define FM_GEMV_CASE(NB)                                                                                          \
  case NB:                                                                                                        \
    err = launch_chained(chained, gemv_kernel<WT, NB>, grid, dim3(threads), smem, stream, W, rows, K, w_lstride,   \
                         x, x_lstride, x_bstride, x_norm, y, y_lstride, y_bstride);                               \
    break;
  cudaError_t err = cudaSuccess;
  switch (B) {
    FM_GEMV_CASE(1)
    FM_GEMV_CASE(2)
    FM_GEMV_CASE(3)
    FM_GEMV_CASE(4)
    default: return cudaErrorInvalidValue;
  }
#undef FM_GEMV_CASE
  return err;
}

}  // namespace

bool gemv_supported(int B, int K, bool bf16_weights) {
  const int V = bf16_weights ? 8 : 4;
  return B >= 1 && B <= kGemvMaxBatch && K % V == 0;
}

cudaError_t gemv(const void* W, bool bf16_weights, int64_t rows, int K, int64_t w_lstride, int Z, const float* x,
                 int64_t x_lstride, int64_t x_bstride, int B, float* y, int64_t y_lstride, int64_t y_bstride,
                 bool chained, cudaStream_t stream, const float* x_norm) {
  if (!gemv_supported(B, K, bf16_weights) || reinterpret_cast<uintptr_t>(W) % 16 || reinterpret_cast<uintptr_t>(x) % 16)
    return cudaErrorInvalidValue;
  if (x_norm && static_cast<int64_t>(B) * K * 4 > 48 * 1024) return cudaErrorInvalidValue;
  if (bf16_weights)
    return launch(static_cast<const __nv_bfloat16*>(W), rows, K, w_lstride, Z, x, x_lstride, x_bstride, x_norm, B, y,
                  y_lstride, y_bstride, chained, stream);
  return launch(static_cast<const float*>(W), rows, K, w_lstride, Z, x, x_lstride, x_bstride, x_norm, B, y, y_lstride,
                y_bstride, chained, stream);
}

}  // namespace flashmem::kernels
