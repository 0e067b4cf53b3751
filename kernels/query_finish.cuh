// Device pieces of the query side (SPEC 3.2, 3.4-3.7) shared by the kernels that run them:
// rmsnorm_kernel and finish_kernel (query_kernels.cu, after cuBLAS projections) and the fused
// second projection (gemv_kernel.cu, B <= 4). One copy of each step, so the paths agree bit for
// bit. Every float32 step that the CPU (src/retriever/query.cpp) rounds separately is written
// with explicit _rn intrinsics, so nvcc cannot fuse it into an FMA: the bf16 roundings amplify
// any difference.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

// The sums of squares are split over this many threads in this order whatever the block size,
// so every kernel that normalises a row gets the same double sum.
constexpr int kRmsThreads = 256;

// 1 / sqrt(mean(x^2) + 1e-6) of x[0, n), the sum of squares in double as the CPU accumulates it
// (src/numerics/rmsnorm.cpp). Called by every thread of a block of at least kRmsThreads
// threads (it holds a barrier); partial: kRmsThreads / 32 doubles of shared memory, free to
// reuse after the block's next barrier.
__device__ __forceinline__ float inv_rms(const float* x, int n, double* partial) {
  const int t = threadIdx.x;
  double sum = 0.0;
  if (t < kRmsThreads)
    for (int k = t; k < n; k += kRmsThreads) {
      const double v = __ldcg(x + k);  // L2, not the non-coherent path: x may be a running kernel's output
      sum += v * v;
    }
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (t < kRmsThreads && t % 32 == 0) partial[t / 32] = sum;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kRmsThreads / 32; ++w) total += partial[w];
  const float mean = static_cast<float>(total / static_cast<double>(n));
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, 1e-6f)));
}

// One normalised value: x * inv_rms * q_norm, rounded after each product.
__device__ __forceinline__ float rms_scale(float x, float inv, float q_norm) {
  return __fmul_rn(__fmul_rn(x, inv), q_norm);
}

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// The (cos, sin) pairs that finish_head_row's lane needs (RoPE pairs 2*lane - 32 and the next,
// for lanes 16..31; zero elsewhere), in one 16-byte load. The angles are the host's (pinned
// memory, read over the bus), not the previous kernel's: callers issue this before their grid
// wait so the latency hides under that kernel's tail.
__device__ __forceinline__ float4 rope_pairs(const float* __restrict__ angles, int b, int lane) {
  return lane >= 16 ? *reinterpret_cast<const float4*>(angles + (b * 32 + 2 * lane - 32) * 2) : float4{};
}

// Steps 3.4-3.7 for head h of layer l, batch row b, by one warp (all 32 lanes): q holds the raw
// dims 4*lane .. 4*lane+3 of the head (wq_b's output), cs = rope_pairs(angles, b, lane).
// bf16 round; RoPE on dims 64..127 then bf16 round; Hadamard (butterflies of stride 1..64,
// (a, b) -> (a+b, a-b)), / sqrt(128); then the fp16 split (or the e4m3 rounding) for the tensor
// cores (retriever_kernels.hpp) and w_scaled = fused * head_scale * 2^-e.
template <int TERMS, bool FP8>
__device__ __forceinline__ void finish_head_row(float4 q, float4 cs, int lane, int h, int l, int b,
                                                const QueryFinish& f) {
  static_assert(TERMS == 1 || TERMS == 2, "one fp16 term (fast) or a hi/lo pair (exact)");
  static_assert(!FP8 || TERMS == 1, "e4m3 is a single term");
  float x[4] = {bf16_round(q.x), bf16_round(q.y), bf16_round(q.z), bf16_round(q.w)};
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
  float size = 0.0f;  // max |x| (fp16), sum |x| (e4m3)
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    x[j] = __fdiv_rn(x[j], norm);
    size = FP8 ? size + fabsf(x[j]) : fmaxf(size, fabsf(x[j]));
  }
  for (int o = 16; o > 0; o /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, size, o);
    size = FP8 ? size + other : fmaxf(size, other);
  }
  // Power-of-two head scale. fp16: max |q * 2^e| in [2^14, 2^15), inside fp16's range. e4m3:
  // sum |q * 2^e| in [4, 8), so every dot product with e4m3 keys (|k| <= 448) stays below
  // 448 * 8 * 17/16 < 2^12 in the fp8 kernel's f16 accumulators (17/16: the e4m3 rounding),
  // and max |q * 2^e| < 8 below e4m3's largest finite value.
  int e = 0;
  if (size > 0.0f) {
    int ex;
    frexpf(size, &ex);
    e = min((FP8 ? 3 : 15) - ex, 100);
  }
  const int Hp = padded_heads(f.H);
  if constexpr (FP8) {
    // Dims 4*lane .. +3 (key word `lane`) go to word k = 8 ((lane % 8) / 2) + 4 (lane % 2) + lane / 8
    // of the matmul's K order (score_fp8_kernel.cu: thread tq of a quad feeds key words
    // 8 tq .. 8 tq + 7 to k-steps 0..3): 16-byte chunk k / 4 at position chunk ^ (h % 8).
    const int k = 8 * ((lane % 8) / 2) + 4 * (lane % 2) + lane / 8;
    uint8_t* dst = static_cast<uint8_t*>(f.qfrag) + (static_cast<int64_t>(b) * f.L + l) * (static_cast<int64_t>(Hp) * kHeadDim) +
                   static_cast<int64_t>(h) * kHeadDim + (((k / 4) ^ (h % 8)) * 16) + (k % 4) * 4;
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      packed |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(ldexpf(x[j], e), __NV_SATFINITE, __NV_E4M3)) << (8 * j);
    *reinterpret_cast<uint32_t*>(dst) = packed;
  } else {
    // Dims 4*lane .. +3: K block lane / 16, 16-byte chunk (lane % 16) / 2 at position
    // chunk ^ (h % 8), half (lane % 2) of it (the swizzled image of retriever_kernels.hpp).
    const int kb = lane / 16, chunk = (lane % 16) / 2;
    __half* dst = static_cast<__half*>(f.qfrag) + (static_cast<int64_t>(b) * f.L + l) * (static_cast<int64_t>(Hp) * kHeadDim * TERMS) +
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
    const float fused = __fmul_rn(__ldcg(f.proj + b * f.P + l * f.stride + f.R + h), f.head_scale);
    f.w_scaled[(static_cast<int64_t>(b) * f.L + l) * Hp + h] = ldexpf(fused, -e);
  }
}

// Host side: calls fn(std::integral_constant<int, TERMS>{}, std::bool_constant<FP8>{}) for f's
// precision, so a launcher picks its finish_head_row instantiation in one place.
template <typename Fn>
cudaError_t with_finish_precision(const QueryFinish& f, Fn&& fn) {
  if (f.fp8) return f.terms == 1 ? fn(std::integral_constant<int, 1>{}, std::true_type{}) : cudaErrorInvalidValue;
  if (f.terms == 1) return fn(std::integral_constant<int, 1>{}, std::false_type{});
  if (f.terms == 2) return fn(std::integral_constant<int, 2>{}, std::false_type{});
  return cudaErrorInvalidValue;
}

}  // namespace flashmem::kernels
