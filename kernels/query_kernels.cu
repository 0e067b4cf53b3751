// Query side of the retriever on the device (SPEC 3), after the cuBLAS projections.
// CPU reference: src/retriever/query.cpp (compute_queries, finish_head_query).
// Every float32 step that the CPU rounds separately is written with explicit _rn
// intrinsics, so nvcc cannot fuse it into an FMA: the bf16 roundings amplify any difference.
#include <cuda_bf16.h>
#include <algorithm>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/pdl.cuh"
#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

constexpr int kRmsThreads = 256;

// Contract: proj [B, P] row-major; layer l's wq_a output is proj[b, l*stride + r], r < R.
// out [L, B, R]: x * inv_rms * q_norm[l, r] (float or bf16). Grid (L, B), 256 threads.
// The sum of squares is accumulated in double, as the CPU does (src/numerics/rmsnorm.cpp).
__global__ void __launch_bounds__(kRmsThreads) rmsnorm_kernel(const float* __restrict__ proj, int64_t P,
                                                              int64_t stride, const float* __restrict__ q_norm,
                                                              int B, int R, void* out, bool out_bf16) {
  allow_dependents();
  grid_dependency_wait();  // proj is the previous kernel's output
  const int l = blockIdx.x, b = blockIdx.y;
  const float* x = proj + b * P + l * stride;
  double sum = 0.0;
  for (int r = threadIdx.x; r < R; r += kRmsThreads) sum += static_cast<double>(x[r]) * static_cast<double>(x[r]);
  __shared__ double partial[kRmsThreads / 32];
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kRmsThreads / 32; ++w) total += partial[w];
  const float mean = static_cast<float>(total / static_cast<double>(R));
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, 1e-6f)));
  const float* w = q_norm + static_cast<int64_t>(l) * R;
  const int64_t o = (static_cast<int64_t>(l) * B + b) * R;
  for (int r = threadIdx.x; r < R; r += kRmsThreads) {
    const float v = __fmul_rn(__fmul_rn(x[r], inv), w[r]);
    if (out_bf16) static_cast<__nv_bfloat16*>(out)[o + r] = __float2bfloat16_rn(v);
    else static_cast<float*>(out)[o + r] = v;
  }
}

__global__ void to_bf16_kernel(const float* __restrict__ in, __nv_bfloat16* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(in[i]);
}

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Contract: one warp per (head h, layer l, row b); lane holds dims 4*lane .. 4*lane+3.
// q_raw [L, B, H*128] (wq_b output), proj [B, P] (fused weights at l*stride + R + h),
// angles [B, 32, 2]. Steps: bf16 round; RoPE on dims 64..127 then bf16 round; Hadamard
// (butterflies of stride 1..64, (a, b) -> (a+b, a-b)), / sqrt(128); then the fp16 split (or the e4m3 rounding)
// for the tensor cores (see retriever_kernels.hpp) and w_scaled = fused * head_scale * 2^-e.
// Grid (H/8, L, B), 256 threads.
template <int TERMS, bool FP8>
__global__ void __launch_bounds__(256) finish_kernel(const float* __restrict__ q_raw, const float* __restrict__ proj,
                                                     int64_t P, int64_t stride, int64_t R,
                                                     const float* __restrict__ angles, int L, int B, int H,
                                                     float head_scale, void* __restrict__ qfrag_out,
                                                     float* __restrict__ w_scaled) {
  static_assert(TERMS == 1 || TERMS == 2, "one fp16 term (fast) or a hi/lo pair (exact)");
  allow_dependents();
  const int lane = threadIdx.x % 32, h = blockIdx.x * 8 + threadIdx.x / 32, l = blockIdx.y, b = blockIdx.z;
  if (h >= H) return;
  // (cos, sin) of RoPE pairs 2*lane - 32 and the next one, for lanes 16..31, in one 16-byte load
  // issued before the wait: the angles are the host's (pinned memory, read over the bus), not
  // the previous kernel's, so their latency hides under that kernel's tail.
  const float4 cs = lane >= 16 ? *reinterpret_cast<const float4*>(angles + (b * 32 + 2 * lane - 32) * 2) : float4{};
  grid_dependency_wait();  // q_raw is the previous kernel's output
  const float4 v4 = *reinterpret_cast<const float4*>(q_raw + ((static_cast<int64_t>(l) * B + b) * H + h) * kHeadDim +
                                                     4 * lane);
  float x[4] = {bf16_round(v4.x), bf16_round(v4.y), bf16_round(v4.z), bf16_round(v4.w)};
  // RoPE on the last 64 dims: pairs (x[2i'], x[2i'+1]) with i = 2*lane - 32 + i'.
  if (lane >= 16) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float c = p ? cs.z : cs.x, s = p ? cs.w : cs.y;
      const float re = x[2 * p], im = x[2 * p + 1];
      x[2 * p] = bf16_round(__fsub_rn(__fmul_rn(re, c), __fmul_rn(im, s)));
      x[2 * p + 1] = bf16_round(__fadd_rn(__fmul_rn(re, s), __fmul_rn(im, c)));
    }
  }
  // Hadamard: strides 1 and 2 inside the lane, 4..64 across lanes (lane xor stride/4).
  {
    const float a0 = __fadd_rn(x[0], x[1]), a1 = __fsub_rn(x[0], x[1]);
    const float a2 = __fadd_rn(x[2], x[3]), a3 = __fsub_rn(x[2], x[3]);
    x[0] = __fadd_rn(a0, a2); x[2] = __fsub_rn(a0, a2);
    x[1] = __fadd_rn(a1, a3); x[3] = __fsub_rn(a1, a3);
  }
#pragma unroll
  for (int m = 1; m < 32; m *= 2) {
    const bool upper = lane & m;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float other = __shfl_xor_sync(0xffffffffu, x[j], m);
      x[j] = upper ? __fsub_rn(other, x[j]) : __fadd_rn(x[j], other);
    }
  }
  const float norm = __fsqrt_rn(128.0f);
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[j] = __fdiv_rn(x[j], norm);
    amax = fmaxf(amax, fabsf(x[j]));
  }
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  // Power-of-two head scale: max |q * 2^e| in [2^14, 2^15), inside fp16's range; e4m3:
  // in [2^7, 2^8), below its largest finite value 448.
  int e = 0;
  if (amax > 0.0f) {
    int ex;
    frexpf(amax, &ex);
    e = min((FP8 ? 8 : 15) - ex, 100);
  }
  const int Hp = padded_heads(H);
  if constexpr (FP8) {
    // Dims 4*lane .. +3: 16-byte chunk lane / 4 at position chunk ^ (h % 8), bytes (lane % 4) * 4.
    uint8_t* dst = static_cast<uint8_t*>(qfrag_out) + (static_cast<int64_t>(b) * L + l) * (static_cast<int64_t>(Hp) * kHeadDim) +
                   static_cast<int64_t>(h) * kHeadDim + (((lane / 4) ^ (h % 8)) * 16) + (lane % 4) * 4;
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      packed |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(ldexpf(x[j], e), __NV_SATFINITE, __NV_E4M3)) << (8 * j);
    *reinterpret_cast<uint32_t*>(dst) = packed;
  } else {
  __half* qfrag = static_cast<__half*>(qfrag_out);
  // Dims 4*lane .. +3: K block lane / 16, 16-byte chunk (lane % 16) / 2 at position
  // chunk ^ (h % 8), half (lane % 2) of it (the swizzled image of retriever_kernels.hpp).
  const int kb = lane / 16, chunk = (lane % 16) / 2;
  __half* dst = qfrag + (static_cast<int64_t>(b) * L + l) * (static_cast<int64_t>(Hp) * kHeadDim * TERMS) +
                (static_cast<int64_t>(kb) * Hp + h) * 64 + ((chunk ^ (h % 8)) * 8) + (lane % 2) * 4;
  const int64_t lo_offset = static_cast<int64_t>(Hp) * kHeadDim;  // the lo term's image follows hi's
  __half hi[4], lo[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float s = ldexpf(x[j], e);
    hi[j] = __float2half_rn(s);
    lo[j] = __float2half_rn(s - __half2float(hi[j]));
  }
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(hi);
  if (TERMS == 2) *reinterpret_cast<uint2*>(dst + lo_offset) = *reinterpret_cast<const uint2*>(lo);
  }
  if (lane == 0) {
    const float fused = __fmul_rn(proj[b * P + l * stride + R + h], head_scale);
    w_scaled[(static_cast<int64_t>(b) * L + l) * Hp + h] = ldexpf(fused, -e);
  }
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

cudaError_t finish_queries(const float* q_raw, const float* proj, int64_t P, int64_t stride, int64_t R,
                           const float* angles, int L, int B, int H, float head_scale, int terms, bool fp8,
                           void* qfrag, float* w_scaled, cudaStream_t stream) {
  if ((terms != 1 && terms != 2) || (fp8 && terms != 1)) return cudaErrorInvalidValue;
  const dim3 grid((H + 7) / 8, L, B);
  const auto kernel = fp8 ? finish_kernel<1, true> : terms == 2 ? finish_kernel<2, false> : finish_kernel<1, false>;
  return launch_chained(true, kernel, grid, dim3(256), 0, stream, q_raw, proj, P, stride, R, angles, L, B, H,
                        head_scale, qfrag, w_scaled);
}

}  // namespace flashmem::kernels
