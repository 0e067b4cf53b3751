// Small row and element-wise kernels of the toy decoder step (SPEC 5): embedding lookup,
// RMSNorm, GELU (erf form) and argmax. The projections are cuBLAS SGEMMs (toy_model/).
// CPU references: toy_model/cpu_decoder.cpp and src/numerics/rmsnorm.cpp.
#include <cuda_runtime.h>

#include <cmath>

#include "kernels/toy_decoder_kernels.hpp"

namespace flashmem::kernels::toy {

namespace {
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kRowThreads = 256;
static_assert(kRowThreads % 32 == 0 && kRowThreads / 32 <= 32, "row reductions: one warp combines the warp results");

// Contract: block b copies embed[tokens[b], 0..D) to x[b, 0..D).
__global__ void embed_kernel(const float* __restrict__ embed, const int64_t* __restrict__ tokens, int D, float* __restrict__ x) {
  const int b = blockIdx.x;
  const float* src = embed + static_cast<size_t>(tokens[b]) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) x[static_cast<size_t>(b) * D + d] = src[d];
}

// Contract: block b: out[b] = x[b] * (1 / sqrt(float(sum x^2 / D) + 1e-6)) * w, the sum in
// double (the CPU's order-independent choice), the rest float32 in the CPU's order.
__global__ void __launch_bounds__(kRowThreads) rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w, int D,
                                                              float* __restrict__ out) {
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* row = x + static_cast<size_t>(b) * D;
  double ss = 0.0;
  for (int d = threadIdx.x; d < D; d += kRowThreads) ss += static_cast<double>(row[d]) * row[d];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(kFull, ss, o);
  __shared__ double partial[kRowThreads / 32];
  __shared__ float inv_shared;
  if (lane == 0) partial[warp] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int i = 0; i < kRowThreads / 32; ++i) total += partial[i];
    const float mean = static_cast<float>(total / D);
    inv_shared = 1.0f / sqrtf(mean + 1e-6f);
  }
  __syncthreads();
  const float inv = inv_shared;
  for (int d = threadIdx.x; d < D; d += kRowThreads) out[static_cast<size_t>(b) * D + d] = __fmul_rn(__fmul_rn(row[d], inv), w[d]);
}

// Contract: u[i] = 0.5 u (1 + erf(u / sqrt 2)) for i < n.
__global__ void gelu_kernel(float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = u[i];
    u[i] = __fmul_rn(__fmul_rn(0.5f, x), 1.0f + erff(__fmul_rn(x, 0.70710678118654752440f)));
  }
}

// Contract: block b: next[b] = the lowest index of the maximum of logits[b, 0..V).
__global__ void __launch_bounds__(kRowThreads) argmax_kernel(const float* __restrict__ logits, int V, int64_t* next) {
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* row = logits + static_cast<size_t>(b) * V;
  float best = -INFINITY;
  int best_i = V;  // V: "none yet" (loses every tie)
  for (int i = threadIdx.x; i < V; i += kRowThreads)
    if (row[i] > best || best_i == V) best = row[i], best_i = i;  // ascending i: first maximum kept
  auto better = [](float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(kFull, best, o);
    const int i = __shfl_xor_sync(kFull, best_i, o);
    if (better(v, i, best, best_i)) best = v, best_i = i;
  }
  __shared__ float sv[kRowThreads / 32];
  __shared__ int si[kRowThreads / 32];
  if (lane == 0) sv[warp] = best, si[warp] = best_i;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kRowThreads / 32; ++w)
      if (better(sv[w], si[w], sv[0], si[0])) sv[0] = sv[w], si[0] = si[w];
    next[b] = si[0];
  }
}
// Contract: y[b, r] = sum_k W[r, k] x[b, k] + beta y[b, r] for r < out, b < B (row-major W
// [out, in], x [B, in], y [B, out]). One warp per weight row: the row is streamed once with
// float4 loads (in % 4 == 0), dotted with all B inputs (read through L1), reduced by shuffles.
template <int B>
__global__ void __launch_bounds__(kRowThreads) skinny_linear_kernel(const float* __restrict__ W, int out, int in,
                                                                     const float* __restrict__ x, float* __restrict__ y, float beta) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (kRowThreads / 32) + (threadIdx.x >> 5);
  if (r >= out) return;
  const float4* w4 = reinterpret_cast<const float4*>(W + static_cast<size_t>(r) * in);
  const int n4 = in / 4;
  float acc[B];
#pragma unroll
  for (int b = 0; b < B; ++b) acc[b] = 0.0f;
  // NOTES: 4 float4 loads per lane in flight (2 KB per warp) before any arithmetic.
  int k = lane;
  for (; k + 96 < n4; k += 128) {
    float4 wv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) wv[u] = __ldcs(w4 + k + 32 * u);  // streamed once: evict-first
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const float4 xv = __ldg(reinterpret_cast<const float4*>(x + static_cast<size_t>(b) * in) + k + 32 * u);
        acc[b] += wv[u].x * xv.x + wv[u].y * xv.y + wv[u].z * xv.z + wv[u].w * xv.w;
      }
  }
  for (; k < n4; k += 32) {
    const float4 wv = __ldcs(w4 + k);
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const float4 xv = __ldg(reinterpret_cast<const float4*>(x + static_cast<size_t>(b) * in) + k);
      acc[b] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
    }
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(kFull, acc[b], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      float* dst = y + static_cast<size_t>(b) * out + r;
      *dst = beta == 0.0f ? acc[b] : acc[b] + beta * *dst;
    }
  }
}
}  // namespace

cudaError_t skinny_linear(const float* W, int out, int in, const float* x, int B, float* y, float beta, cudaStream_t stream) {
  if (out <= 0 || in <= 0 || in % 4 != 0 || B < 1 || B > kSkinnyMaxRows) return cudaErrorInvalidValue;
  const int blocks = (out + kRowThreads / 32 - 1) / (kRowThreads / 32);
  switch (B) {
    case 1: skinny_linear_kernel<1><<<blocks, kRowThreads, 0, stream>>>(W, out, in, x, y, beta); break;
    case 2: skinny_linear_kernel<2><<<blocks, kRowThreads, 0, stream>>>(W, out, in, x, y, beta); break;
    case 3: skinny_linear_kernel<3><<<blocks, kRowThreads, 0, stream>>>(W, out, in, x, y, beta); break;
    default: skinny_linear_kernel<4><<<blocks, kRowThreads, 0, stream>>>(W, out, in, x, y, beta); break;
  }
  return cudaGetLastError();
}

cudaError_t embed_rows(const float* embed, const int64_t* tokens, int B, int D, float* x, cudaStream_t stream) {
  if (B <= 0 || D <= 0) return cudaErrorInvalidValue;
  embed_kernel<<<B, 256, 0, stream>>>(embed, tokens, D, x);
  return cudaGetLastError();
}

cudaError_t rmsnorm_rows(const float* x, const float* w, int B, int D, float* out, cudaStream_t stream) {
  if (B <= 0 || D <= 0) return cudaErrorInvalidValue;
  rmsnorm_kernel<<<B, kRowThreads, 0, stream>>>(x, w, D, out);
  return cudaGetLastError();
}

cudaError_t gelu_inplace(float* u, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaErrorInvalidValue;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  gelu_kernel<<<static_cast<int>(blocks), 256, 0, stream>>>(u, n);
  return cudaGetLastError();
}

cudaError_t argmax_rows(const float* logits, int B, int V, int64_t* next, cudaStream_t stream) {
  if (B <= 0 || V <= 0) return cudaErrorInvalidValue;
  argmax_kernel<<<B, kRowThreads, 0, stream>>>(logits, V, next);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::toy
