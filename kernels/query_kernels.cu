// Query side of the retriever on the device (SPEC 3), after the cuBLAS projections; the math
// of each step is in query_finish.cuh, shared with the B <= 4 path (gemv_kernel.cu).
// CPU reference: src/retriever/query.cpp (compute_queries, finish_head_query).
#include <cuda_bf16.h>
#include <algorithm>

#include "kernels/pdl.cuh"
#include "kernels/query_finish.cuh"
#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

// Contract: proj [B, P] row-major; layer l's wq_a output is proj[b, l*stride + r], r < R.
// out [L, B, R]: x * inv_rms * q_norm[l, r] (float or bf16). Grid (L, B), kRmsThreads threads.
__global__ void __launch_bounds__(kRmsThreads) rmsnorm_kernel(const float* __restrict__ proj, int64_t P,
                                                              int64_t stride, const float* __restrict__ q_norm,
                                                              int B, int R, void* out, bool out_bf16) {
  allow_dependents();
  grid_dependency_wait();  // proj is the previous kernel's output
  const int l = blockIdx.x, b = blockIdx.y;
  const float* x = proj + b * P + l * stride;
  __shared__ double partial[kRmsThreads / 32];
  const float inv = inv_rms(x, R, partial);
  const float* w = q_norm + static_cast<int64_t>(l) * R;
  const int64_t o = (static_cast<int64_t>(l) * B + b) * R;
  for (int r = threadIdx.x; r < R; r += kRmsThreads) {
    const float v = rms_scale(x[r], inv, w[r]);
    if (out_bf16) static_cast<__nv_bfloat16*>(out)[o + r] = __float2bfloat16_rn(v);
    else static_cast<float*>(out)[o + r] = v;
  }
}

__global__ void to_bf16_kernel(const float* __restrict__ in, __nv_bfloat16* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

// Contract: one warp per (head h, layer l, row b), finish_head_row on q_raw [L, B, H*128].
// Grid (H/8, L, B), 256 threads.
template <int TERMS, bool FP8>
__global__ void __launch_bounds__(256) finish_kernel(const float* __restrict__ q_raw, QueryFinish f) {
  allow_dependents();
  const int lane = threadIdx.x % 32, h = blockIdx.x * 8 + threadIdx.x / 32, l = blockIdx.y, b = blockIdx.z;
  if (h >= f.H) return;
  const float4 cs = rope_pairs(f.angles, b, lane);
  grid_dependency_wait();  // q_raw is the previous kernel's output
  const float4 q = *reinterpret_cast<const float4*>(q_raw + ((static_cast<int64_t>(l) * f.B + b) * f.H + h) * kHeadDim +
                                                    4 * lane);
  finish_head_row<TERMS, FP8>(q, cs, lane, h, l, b, f);
}

}  // namespace

cudaError_t rmsnorm_rows(const float* proj, int64_t P, int64_t stride, const float* q_norm, int L, int B, int R,
                         void* out, bool out_bf16, cudaStream_t stream) {
  return launch_chained(true, rmsnorm_kernel, dim3(L, B), dim3(kRmsThreads), 0, stream, proj, P, stride, q_norm, B, R,
                        out, out_bf16);
}

cudaError_t to_bf16(const float* in, void* out, int64_t n, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  to_bf16_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(in, static_cast<__nv_bfloat16*>(out), n);
  return cudaGetLastError();
}

cudaError_t finish_queries(const float* q_raw, const QueryFinish& f, cudaStream_t stream) {
  return with_finish_precision(f, [&](auto terms, auto fp8) {
    return launch_chained(true, finish_kernel<decltype(terms)::value, decltype(fp8)::value>,
                          dim3((f.H + 7) / 8, f.L, f.B), dim3(256), 0, stream, q_raw, f);
  });
}

}  // namespace flashmem::kernels
