// Masked memory attention of the toy decoder (SPEC 5), flash-decoding style:
//   1. compact_keep: per row, the kept chunk indices in ascending order and their count;
//   2. attend: one block per (split, head, row) walks its slice of the compacted list with an
//      online softmax per warp, so only kept chunks' keys and values are read;
//   3. combine: per (head, row), the splits' partial results are rescaled to the common max
//      and normalised; 4. (when asked) the raw logits written in step 2 become probabilities.
// CPU reference: memory_attention in toy_model/cpu_decoder.cpp.
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "kernels/toy_decoder_kernels.hpp"

namespace flashmem::kernels::toy {

namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kCompactThreads = 1024;
constexpr int kCompactPerThread = 16;  // consecutive keep bytes per thread (one uint4)
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kCombineThreads = 256;
constexpr int kCombineBatch = 2048;    // split weights held in shared memory at a time
constexpr int kMaxHeadSize = 1024;
constexpr int kCombineDims = kMaxHeadSize / kCombineThreads;  // head dims per combine thread
static_assert(kCompactThreads % 32 == 0 && kCompactThreads / 32 <= 32, "compact: the warp totals are scanned by one warp");
static_assert(kCompactPerThread <= 32, "compact: a thread's keep flags fit one 32-bit mask");
static_assert(kMaxHeadSize % kCombineThreads == 0, "combine: head dims split evenly over the threads");

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// keep [B, N] -> idx [B, N] (first count[b] valid), count [B]. Block = one row; each thread
// takes 16 consecutive flags of a 16384-chunk tile; a block scan gives each thread its offset.
__global__ void __launch_bounds__(kCompactThreads) compact_kernel(const uint8_t* keep, int N, int32_t* idx, int32_t* count) {
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint8_t* row = keep + static_cast<size_t>(b) * N;
  int32_t* out = idx + static_cast<size_t>(b) * N;
  __shared__ int warp_offset[kCompactThreads / 32];
  __shared__ int tile_total;
  const bool vec = N % 16 == 0;  // rows then start 16-byte aligned (cudaMalloc'd base)
  int base = 0;
  for (int t0 = 0; t0 < N; t0 += kCompactThreads * kCompactPerThread) {
    const int first = t0 + threadIdx.x * kCompactPerThread;
    unsigned bits = 0;  // bit i: chunk first + i is kept
    if (vec && first + kCompactPerThread <= N) {
      const uint4 w = *reinterpret_cast<const uint4*>(row + first);
      const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 16; ++i) bits |= ((words[i / 4] >> (8 * (i % 4))) & 0xFFu) ? (1u << i) : 0u;
    } else {
      for (int i = 0; i < kCompactPerThread && first + i < N; ++i) bits |= row[first + i] ? (1u << i) : 0u;
    }
    const int c = __popc(bits);
    const int incl = warp_inclusive_scan(c, lane);
    if (lane == 31) warp_offset[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int v = lane < kCompactThreads / 32 ? warp_offset[lane] : 0;
      const int s = warp_inclusive_scan(v, lane);
      if (lane < kCompactThreads / 32) warp_offset[lane] = s - v;
      if (lane == 31) tile_total = s;
    }
    __syncthreads();
    int pos = base + warp_offset[warp] + incl - c;
    while (bits) {
      out[pos++] = first + __ffs(bits) - 1;
      bits &= bits - 1;
    }
    base += tile_total;
    __syncthreads();  // warp_offset and tile_total are rewritten by the next tile
  }
  if (threadIdx.x == 0) count[b] = base;
}

// E floats of a head row per lane. VEC4: float4 loads, lane covers dims 4*(i*32+lane)..+3 of
// chunk i (head_size == 32*E); else scalar dims i*32 + lane, guarded by head_size.
template <int E, bool VEC4>
__device__ __forceinline__ void load_head(const float* __restrict__ row, int hs, int lane, float (&r)[E]) {
  if constexpr (VEC4) {
    static_assert(E % 4 == 0, "float4 path: 4 floats per load");
#pragma unroll
    for (int i = 0; i < E / 4; ++i) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(row) + i * 32 + lane);
      r[4 * i] = v.x, r[4 * i + 1] = v.y, r[4 * i + 2] = v.z, r[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int d = i * 32 + lane;
      r[i] = d < hs ? __ldg(row + d) : 0.0f;
    }
  }
}

// The head dim held in register slot i of a lane (inverse of load_head's layout).
template <int E, bool VEC4>
__device__ __forceinline__ int head_dim_of(int i, int lane) {
  if constexpr (VEC4) return (i / 4 * 32 + lane) * 4 + i % 4;
  else return i * 32 + lane;
}

__device__ __forceinline__ size_t partial_offset(const MemAttnParams& p, int b, int h, int split) {
  return ((static_cast<size_t>(b) * p.heads + h) * p.plan.max_splits + split) * (p.head_size + 2);
}

// Contract: block (split, h, b) covers compacted positions [split*L, min((split+1)*L, cnt)) of
// row b; writes partial (m, l, acc[hs]) = (max logit, sum exp(s - m), sum exp(s - m) v) at
// partial_offset; nothing when the split is past cnt. probs (optional): raw logit s at [b,h,n].
template <int E, bool VEC4>
__global__ void __launch_bounds__(kAttnThreads) attend_kernel(const MemAttnParams p) {
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hs = p.head_size, D = p.heads * hs;
  const int cnt = p.count ? p.count[b] : p.N;
  const int begin = split * p.plan.split_len;
  if (begin >= cnt) return;
  const int end = min(begin + p.plan.split_len, cnt);
  const int32_t* idx = p.idx ? p.idx + static_cast<size_t>(b) * p.N : nullptr;
  const float scale_div = sqrtf(static_cast<float>(hs));  // logits q.k / sqrt(hs), divided as the CPU does

  float q[E], acc[E];
  load_head<E, VEC4>(p.q + static_cast<size_t>(b) * D + h * hs, hs, lane, q);
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int j = begin + warp; j < end; j += kAttnWarps) {
    const int n = idx ? idx[j] : j;
    float k[E], v[E];
    // NOTES: key and value loads are issued together so each warp has both rows in flight.
    load_head<E, VEC4>(p.keys + static_cast<size_t>(n) * D + h * hs, hs, lane, k);
    load_head<E, VEC4>(p.values + static_cast<size_t>(n) * D + h * hs, hs, lane, v);
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) dot += q[i] * k[i];
    const float s = warp_sum(dot) / scale_div;
    if (p.probs && lane == 0) p.probs[(static_cast<size_t>(b) * p.heads + h) * p.N + n] = s;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    const float e = expf(s - m_new);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < E; ++i) acc[i] = acc[i] * corr + e * v[i];
    m = m_new;
  }

  // Merge the warps: rescale each to the block max (warps that saw no chunk have m = -inf).
  __shared__ float sm_m[kAttnWarps], sm_l[kAttnWarps];
  __shared__ float sm_acc[kAttnWarps][32 * E];
#pragma unroll
  for (int i = 0; i < E; ++i) sm_acc[warp][head_dim_of<E, VEC4>(i, lane)] = acc[i];
  if (lane == 0) sm_m[warp] = m, sm_l[warp] = l;
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, sm_m[w]);
  float scale[kAttnWarps];
  float L = 0.0f;
  for (int w = 0; w < kAttnWarps; ++w) {
    scale[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - M);
    L += sm_l[w] * scale[w];
  }
  float* part = p.workspace + partial_offset(p, b, h, split);
  for (int d = threadIdx.x; d < hs; d += kAttnThreads) {
    float a = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) a += sm_acc[w][d] * scale[w];
    part[2 + d] = a;
  }
  if (threadIdx.x == 0) part[0] = M, part[1] = L;
}

__device__ float block_reduce(float v, bool is_max, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float t = __shfl_xor_sync(kFull, v, o);
    v = is_max ? fmaxf(v, t) : v + t;
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kCombineThreads / 32 ? scratch[lane] : (is_max ? -INFINITY : 0.0f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float t = __shfl_xor_sync(kFull, v, o);
      v = is_max ? fmaxf(v, t) : v + t;
    }
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  const float r = scratch[32];
  __syncthreads();  // scratch is reused by the next reduction
  return r;
}

// Contract: block (h, b): out[b, h*hs + d] = sum_s acc_s[d] e^(m_s - M) / sum_s l_s e^(m_s - M)
// over the row's active splits (0 when nothing is kept); stats[b, h] = (M, L).
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const MemAttnParams p, float* stats) {
  const int h = blockIdx.x, b = blockIdx.y, hs = p.head_size;
  const int cnt = p.count ? p.count[b] : p.N;
  float* out = p.out + static_cast<size_t>(b) * p.heads * hs + h * hs;
  float* st = stats + (static_cast<size_t>(b) * p.heads + h) * 2;
  if (cnt == 0) {  // SPEC 5: an empty kept set contributes zero
    for (int d = threadIdx.x; d < hs; d += kCombineThreads) out[d] = 0.0f;
    if (threadIdx.x == 0) st[0] = -INFINITY, st[1] = 0.0f;
    return;
  }
  const int active = (cnt + p.plan.split_len - 1) / p.plan.split_len;
  const float* part0 = p.workspace + partial_offset(p, b, h, 0);
  const size_t stride = hs + 2;
  __shared__ float scratch[33];
  __shared__ float weight[kCombineBatch];

  float M = -INFINITY;
  for (int s = threadIdx.x; s < active; s += kCombineThreads) M = fmaxf(M, part0[s * stride]);
  M = block_reduce(M, true, scratch);
  float L = 0.0f;
  for (int s = threadIdx.x; s < active; s += kCombineThreads) L += part0[s * stride + 1] * expf(part0[s * stride] - M);
  L = block_reduce(L, false, scratch);

  float a[kCombineDims];
#pragma unroll
  for (int i = 0; i < kCombineDims; ++i) a[i] = 0.0f;
  for (int s0 = 0; s0 < active; s0 += kCombineBatch) {
    const int s1 = min(active, s0 + kCombineBatch);
    for (int s = s0 + threadIdx.x; s < s1; s += kCombineThreads) weight[s - s0] = expf(part0[s * stride] - M);
    __syncthreads();
    for (int s = s0; s < s1; ++s) {
      const float w = weight[s - s0];
      const float* acc = part0 + s * stride + 2;
#pragma unroll
      for (int i = 0; i < kCombineDims; ++i) {
        const int d = threadIdx.x + i * kCombineThreads;
        if (d < hs) a[i] += acc[d] * w;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kCombineDims; ++i) {
    const int d = threadIdx.x + i * kCombineThreads;
    if (d < hs) out[d] = a[i] / L;
  }
  if (threadIdx.x == 0) st[0] = M, st[1] = L;
}

// Contract: block (h, b): probs[b, h, n] = exp(s - M) / L for the row's kept n (s = the raw
// logit attend_kernel wrote there); masked entries keep the caller's zeros.
__global__ void normalise_probs_kernel(const MemAttnParams p, const float* stats) {
  const int h = blockIdx.x, b = blockIdx.y;
  const int cnt = p.count ? p.count[b] : p.N;
  const float M = stats[(static_cast<size_t>(b) * p.heads + h) * 2], L = stats[(static_cast<size_t>(b) * p.heads + h) * 2 + 1];
  float* row = p.probs + (static_cast<size_t>(b) * p.heads + h) * p.N;
  const int32_t* idx = p.idx ? p.idx + static_cast<size_t>(b) * p.N : nullptr;
  for (int j = threadIdx.x; j < cnt; j += blockDim.x) {
    const int n = idx ? idx[j] : j;
    row[n] = expf(row[n] - M) / L;
  }
}

template <int E, bool VEC4>
void launch_attend(const MemAttnParams& p, cudaStream_t stream) {
  const dim3 grid(p.plan.max_splits, p.heads, p.B);
  attend_kernel<E, VEC4><<<grid, kAttnThreads, 0, stream>>>(p);
}

}  // namespace

cudaError_t compact_keep(const uint8_t* keep, int B, int N, int32_t* idx, int32_t* count, cudaStream_t stream) {
  if (B <= 0 || N <= 0) return cudaErrorInvalidValue;
  compact_kernel<<<B, kCompactThreads, 0, stream>>>(keep, N, idx, count);
  return cudaGetLastError();
}

MemAttnPlan memattn_plan(int N) {
  // Splits of 32..256 chunks, at most ~1024 per (row, head): a dense row at N 65536 gives
  // 1024 x heads blocks, a 10%-kept row still ~100 x heads (enough to fill 132 SMs).
  MemAttnPlan plan;
  plan.split_len = 32;
  while (plan.split_len < 256 && (N + plan.split_len - 1) / plan.split_len > 1024) plan.split_len *= 2;
  plan.max_splits = (N + plan.split_len - 1) / plan.split_len;
  return plan;
}

size_t memattn_workspace_floats(const MemAttnPlan& plan, int B, int heads, int head_size) {
  return static_cast<size_t>(B) * heads * plan.max_splits * (head_size + 2) + static_cast<size_t>(B) * heads * 2;
}

cudaError_t memattn(const MemAttnParams& p, cudaStream_t stream) {
  if (p.B <= 0 || p.N <= 0 || p.heads <= 0 || p.head_size <= 0 || p.head_size > kMaxHeadSize) return cudaErrorInvalidValue;
  if ((p.idx == nullptr) != (p.count == nullptr) || p.plan.split_len <= 0 ||
      static_cast<int64_t>(p.plan.max_splits) * p.plan.split_len < p.N)
    return cudaErrorInvalidValue;
  // One dispatch switch: float4 rows when the head size is 128, 256, 512 or 1024; scalar
  // loads (E = head dims per lane, rounded up to a power of two) otherwise.
  const int hs = p.head_size;
  switch (hs) {
    case 128: launch_attend<4, true>(p, stream); break;
    case 256: launch_attend<8, true>(p, stream); break;
    case 512: launch_attend<16, true>(p, stream); break;
    case 1024: launch_attend<32, true>(p, stream); break;
    default:
      if (hs <= 32) launch_attend<1, false>(p, stream);
      else if (hs <= 64) launch_attend<2, false>(p, stream);
      else if (hs <= 128) launch_attend<4, false>(p, stream);
      else if (hs <= 256) launch_attend<8, false>(p, stream);
      else if (hs <= 512) launch_attend<16, false>(p, stream);
      else launch_attend<32, false>(p, stream);
  }
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  float* stats = p.workspace + static_cast<size_t>(p.B) * p.heads * p.plan.max_splits * (hs + 2);
  combine_kernel<<<dim3(p.heads, p.B), kCombineThreads, 0, stream>>>(p, stats);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (p.probs) normalise_probs_kernel<<<dim3(p.heads, p.B), 256, 0, stream>>>(p, stats);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::toy
