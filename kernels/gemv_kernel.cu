// Small-batch projection y[b, r] = sum_k W[r, k] * x[b, k] for B <= 4 rows, fp32 or bf16
// weights, fp32 inputs and accumulation. At B = 1 the retriever's query side is a read of
// all weights (510 MB fp32 / 255 MB bf16), so this is a pure weight stream: one warp per
// output row, 16-byte streaming loads of W (no L1 allocation), x from L1. The second
// projection (wq_b) runs as project_finish_kernel: the same row sums, with the rmsnorm before
// and the query finish after them in the same kernel.
// CPU reference: linear() in src/retriever/query.cpp (Eigen); cuBLAS is the B > 4 path.
#include <cuda_bf16.h>

#include <type_traits>

#include "kernels/pdl.cuh"
#include "kernels/query_finish.cuh"
#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

constexpr int kGemvWarps = 8;
constexpr int kLoadsInFlight = 8;  // per lane: 128 bytes, 4 KB per warp
// The fused kernel's warps, 16 rows of a head each. 16 warps of 8 rows (4 loads in flight)
// must fit 40 registers for 3 blocks an SM: they spill, and measured slower on the H100.
constexpr int kFusedWarps = 8;

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

// A lane's batch of 16-byte loads of row w: k0 + u*32*V for u < LOADS (those < K), all issued
// before the first is used (Little's law: each SM needs tens of KB in flight to stream at full
// HBM bandwidth).
template <typename WT, int LOADS>
__device__ __forceinline__ void load_batch(uint4 (&raw)[LOADS], const WT* w, int k0, int K) {
  constexpr int V = 16 / sizeof(WT);
#pragma unroll
  for (int u = 0; u < LOADS; ++u)
    if (k0 + u * 32 * V < K) raw[u] = load_stream(w + k0 + u * 32 * V);
}

// acc[b] = this lane's part of row w . x[b*xb ..]: k = lane*V + 32*V*i + j in increasing k, one
// FMA chain per b. Both kernels sum every row through this (then warp_sum), so the fused
// kernel's q is bitwise the q_raw of gemv_kernel. raw holds the row's first batch already: the
// callers issue it early (before their grid wait for the first row: W is no kernel's output).
template <typename WT, int NB, int LOADS>
__device__ __forceinline__ void lane_dot(uint4 (&raw)[LOADS], const WT* w, int K, const float* x, int64_t xb,
                                         float (&acc)[NB]) {
  constexpr int V = 16 / sizeof(WT);
  static_assert(V == 4 || V == 8, "16-byte loads of fp32 or bf16");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.0f;
  for (int k0 = lane * V; k0 < K; k0 += 32 * V * LOADS) {
    if (k0 != lane * V) load_batch(raw, w, k0, K);
#pragma unroll
    for (int u = 0; u < LOADS; ++u) {
      const int k = k0 + u * 32 * V;
      if (k >= K) break;
      float wv[V];
      widen<WT>(raw[u], wv);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          const float4 xv = *reinterpret_cast<const float4*>(x + b * xb + k + j);
          acc[b] += wv[j] * xv.x + wv[j + 1] * xv.y + wv[j + 2] * xv.z + wv[j + 3] * xv.w;
        }
      }
    }
  }
}

// The lanes' parts summed by a butterfly: every lane ends with the same value.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Contract: for z = blockIdx.y (a batch of independent matrices, e.g. layers), rows r of
// W_z = W + z*w_lstride ([rows, K] row-major, rows 16-byte aligned), x_z[b] = x + z*x_lstride
// + b*x_bstride, y_z[b][r] = y[z*y_lstride + b*y_bstride + r]. Grid (ceil(rows/8), Z), 256
// threads, one warp per row; K % (16 / sizeof(WT)) == 0. Chained launch (pdl.cuh): the first
// weight loads are issued before waiting for the kernel that writes x.
template <typename WT, int NB>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const WT* __restrict__ W, int64_t rows, int K,
                                                               int64_t w_lstride, const float* __restrict__ x,
                                                               int64_t x_lstride, int64_t x_bstride,
                                                               float* __restrict__ y, int64_t y_lstride,
                                                               int64_t y_bstride, unsigned* rows_done,
                                                               int64_t rows_per_count) {
  constexpr int V = 16 / sizeof(WT);
  allow_dependents();
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t z = blockIdx.y;
  const WT* w = W + z * w_lstride + min(r, rows - 1) * K;
  uint4 raw[kLoadsInFlight];
  load_batch(raw, w, lane * V, K);
  grid_dependency_wait();  // x is the previous kernel's output
  if (r >= rows) return;
  float acc[NB];
  lane_dot(raw, w, K, x + z * x_lstride, x_bstride, acc);
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const float v = warp_sum(acc[b]);
    if (lane == b) y[z * y_lstride + b * y_bstride + r] = v;
  }
  if (rows_done) {  // release: the row's values, then its count
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicAdd(rows_done + r / rows_per_count, 1u);
  }
}

// Spins until ready[l] >= count (acquire), for a block that starts before the kernel writing
// its input ends; the last block to get past (ticket ready[gridDim.y]) re-arms the counters.
__device__ __forceinline__ void wait_rows_ready(unsigned* ready, unsigned count, int l) {
  if (threadIdx.x == 0) {
    unsigned seen;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(ready + l) : "memory");
      if (seen >= count) break;
      __nanosleep(32);
    }
    __threadfence();
    if (atomicAdd(ready + gridDim.y, 1u) == gridDim.x * gridDim.y - 1) {
      for (unsigned i = 0; i <= gridDim.y; ++i) ready[i] = 0;  // every block is past its wait
    }
  }
  __syncthreads();
}

// Contract: block (h, l) = head h of layer l: rows h*128 .. h*128+127 of W_l = W + l*w_lstride
// ([H*128, K] row-major, rows 16-byte aligned), x_l[b] = x + l*x_lstride + b*x_bstride; f.B = NB.
// Warp w sums rows w, w + kFusedWarps, ... as gemv_kernel sums a row, into shared memory; then
// warp b < NB finishes row b of the head (query_finish.cuh) from there. q_raw never leaves the
// block: one kernel of the chain fewer than gemv + finish_queries. Each warp has one batch of
// its row in flight at a time, which 24 warps an SM make ~96 KB: on the H100 neither
// contiguous rows per warp nor loading the next row's batch during a row's sums (which
// spills) measured faster.
// x_norm (optional, [L, K]): x_l[b] is RMS-normalised first (x * inv_rms * x_norm[l], as
// rmsnorm_kernel does), into dynamic shared memory (NB * K floats).
// Grid (H, L), kFusedWarps * 32 threads: 3 blocks per SM keep all 3 * 128 blocks of the released
// dimensions resident at once on 132 SMs (one wave, no tail of late blocks).
template <typename WT, int NB, int TERMS, bool FP8>
__global__ void __launch_bounds__(kFusedWarps * 32, 3)
    project_finish_kernel(const WT* __restrict__ W, int K, int64_t w_lstride, const float* x,
                          int64_t x_lstride, int64_t x_bstride, const float* __restrict__ x_norm, QueryFinish f,
                          unsigned* x_ready, unsigned x_ready_count) {
  constexpr int V = 16 / sizeof(WT);
  static_assert(NB <= kFusedWarps, "a warp per batch row finishes the head");
  allow_dependents();
  extern __shared__ float4 xs_raw[];
  __shared__ float4 q[NB][kHeadDim / 4];
  __shared__ double partial[kRmsThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, h = blockIdx.x, l = blockIdx.y;
  const WT* w0 = W + l * w_lstride + (static_cast<int64_t>(h) * kHeadDim + warp) * K;
  uint4 raw[kLoadsInFlight];
  load_batch(raw, w0, lane * V, K);
  const float4 cs = warp < NB ? rope_pairs(f.angles, warp, lane) : float4{};
  if (x_ready) wait_rows_ready(x_ready, x_ready_count, l);  // x and f.proj: the running gemv's rows
  else grid_dependency_wait();  // x and f.proj are the previous kernel's output
  const float* xl = x + l * x_lstride;
  int64_t xb = x_bstride;
  if (x_norm) {
    float* xs = reinterpret_cast<float*>(xs_raw);
    const float* nl = x_norm + static_cast<int64_t>(l) * K;
    for (int b = 0; b < NB; ++b) {
      const float* xr = xl + b * x_bstride;
      const float inv = inv_rms(xr, K, partial);
      for (int k = threadIdx.x; k < K; k += kFusedWarps * 32) xs[b * K + k] = rms_scale(__ldcg(xr + k), inv, nl[k]);
      __syncthreads();
    }
    xl = xs;
    xb = K;
  }
  for (int d = warp; d < kHeadDim; d += kFusedWarps) {
    const WT* w = w0 + static_cast<int64_t>(d - warp) * K;
    if (d != warp) load_batch(raw, w, lane * V, K);
    float acc[NB];
    lane_dot(raw, w, K, xl, xb, acc);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const float v = warp_sum(acc[b]);
      if (lane == 0) reinterpret_cast<float*>(q[b])[d] = v;
    }
  }
  __syncthreads();
  if (warp < NB) finish_head_row<TERMS, FP8>(q[warp][lane], cs, lane, h, l, warp, f);
}

// Calls fn(std::integral_constant<int, NB>{}) for NB = B, 1 <= B <= kGemvMaxBatch.
template <typename Fn>
cudaError_t with_batch(int B, Fn&& fn) {
  switch (B) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename WT>
cudaError_t launch_gemv(const WT* W, int64_t rows, int K, int64_t w_lstride, int Z, const float* x, int64_t x_lstride,
                        int64_t x_bstride, int B, float* y, int64_t y_lstride, int64_t y_bstride, bool chained,
                        cudaStream_t stream, unsigned* rows_done, int64_t rows_per_count) {
  const dim3 grid(static_cast<unsigned>((rows + kGemvWarps - 1) / kGemvWarps), Z);
  return with_batch(B, [&](auto nb) {
    return launch_chained(chained, gemv_kernel<WT, decltype(nb)::value>, grid, dim3(kGemvWarps * 32), 0, stream, W,
                          rows, K, w_lstride, x, x_lstride, x_bstride, y, y_lstride, y_bstride, rows_done,
                          rows_per_count);
  });
}

template <typename WT>
cudaError_t launch_project_finish(const WT* W, int K, int64_t w_lstride, const float* x, int64_t x_lstride,
                                  int64_t x_bstride, const float* x_norm, const QueryFinish& f, cudaStream_t stream,
                                  unsigned* x_ready, unsigned x_ready_count) {
  const size_t smem = x_norm ? static_cast<size_t>(f.B) * K * 4 : 0;
  return with_batch(f.B, [&](auto nb) {
    return with_finish_precision(f, [&](auto terms, auto fp8) {
      return launch_chained(true, project_finish_kernel<WT, decltype(nb)::value, decltype(terms)::value, decltype(fp8)::value>,
                            dim3(f.H, f.L), dim3(kFusedWarps * 32), smem, stream, W, K, w_lstride, x, x_lstride,
                            x_bstride, x_norm, f, x_ready, x_ready_count);
    });
  });
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool gemv_supported(int B, int K, bool bf16_weights) {
  const int V = bf16_weights ? 8 : 4;
  return B >= 1 && B <= kGemvMaxBatch && K % V == 0;
}

cudaError_t gemv(const void* W, bool bf16_weights, int64_t rows, int K, int64_t w_lstride, int Z, const float* x,
                 int64_t x_lstride, int64_t x_bstride, int B, float* y, int64_t y_lstride, int64_t y_bstride,
                 bool chained, cudaStream_t stream, unsigned* rows_done, int64_t rows_per_count) {
  if (!gemv_supported(B, K, bf16_weights) || !aligned16(W) || !aligned16(x)) return cudaErrorInvalidValue;
  if (rows_done && (rows_per_count <= 0 || Z != 1)) return cudaErrorInvalidValue;
  if (bf16_weights)
    return launch_gemv(static_cast<const __nv_bfloat16*>(W), rows, K, w_lstride, Z, x, x_lstride, x_bstride, B, y,
                       y_lstride, y_bstride, chained, stream, rows_done, rows_per_count);
  return launch_gemv(static_cast<const float*>(W), rows, K, w_lstride, Z, x, x_lstride, x_bstride, B, y, y_lstride,
                     y_bstride, chained, stream, rows_done, rows_per_count);
}

// The rows go to dynamic shared memory within the default 48 KB (no opt-in attribute).
bool project_finish_normalises(int B, int K) { return static_cast<int64_t>(B) * K * 4 <= 48 * 1024; }

cudaError_t project_finish_queries(const void* W, bool bf16_weights, int K, int64_t w_lstride, const float* x,
                                   int64_t x_lstride, int64_t x_bstride, const float* x_norm, const QueryFinish& f,
                                   cudaStream_t stream, unsigned* x_ready, unsigned x_ready_count) {
  if (!gemv_supported(f.B, K, bf16_weights) || !aligned16(W) || (!x_norm && !aligned16(x))) return cudaErrorInvalidValue;
  if (x_norm && !project_finish_normalises(f.B, K)) return cudaErrorInvalidValue;
  if (x_ready && !x_norm) return cudaErrorInvalidValue;  // x is read only while normalising
  if (bf16_weights)
    return launch_project_finish(static_cast<const __nv_bfloat16*>(W), K, w_lstride, x, x_lstride, x_bstride, x_norm, f,
                                 stream, x_ready, x_ready_count);
  return launch_project_finish(static_cast<const float*>(W), K, w_lstride, x, x_lstride, x_bstride, x_norm, f, stream,
                               x_ready, x_ready_count);
}

}  // namespace flashmem::kernels
