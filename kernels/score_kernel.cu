// Scoring tile kernel (SPEC 4): [B, N, 132] fp8 keys x per-layer queries [H, 128] -> [B, N]
// ensembled sigmoid scores. CPU reference: the CPU backend's score_tiles
// (src/retriever/cpu_retriever.cpp).
//
//   logit[l, b, n] = sum_h relu(s_bn * (q[b, l, h, :] . k8[b, n, :])) * w[b, l, h]
//
// Layout of the matmul: chunks are M, heads N, the 128 key dims K; mma.sync m16n8k16 f16
// inputs, f32 accumulators. A block (8 warps) owns a tile of 256 chunks: it copies the tile's
// 132-byte rows once into shared memory (cp.async), each warp turns its 32 rows into
// A fragments held in registers (fp8 -> f16 is exact), and scores them against every layer's
// query (all heads) from shared memory. relu, the head weights, the head sum, the scale,
// sigmoid and the max/mean ensemble stay in registers; only [B, N] scores (and per-layer
// logits on request) reach device memory.
//
// NOTES:
// - K order: mma's logical k (2tq, 2tq+1 | 2tq+8, 2tq+9) of k-step kk maps to physical key dims
//   (32tq + 4kk + {0,1} | {2,3}); one 4-byte shared load per row gives a thread both pairs,
//   and the query fragments are written in the same order (query_kernels.cu). The 132-byte
//   row stride (33 words) makes these loads bank-conflict free.
// - Exact mode: q' = q * 2^e_h is split into fp16 hi + lo (22 significant bits); keys are exact
//   in fp16; products are exact and sums are f32. Fast mode: hi only (11 bits).
// - The chunk scale is applied after the dot product: relu(s*d) = |s| * relu(sign(s)*d), and
//   sign(s)*d is obtained by flipping the fp8 sign bits of chunks with a negative scale.
// - Per-head 2^-e_h is folded into w (exact power-of-two scaling).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "kernels/pdl.cuh"
#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kWarpChunks = 32;  // two m16 tiles per warp: each B fragment feeds two mma
static_assert(kWarps * kWarpChunks == kScoreTileChunks, "a tile is 8 warps x 32 chunks");
constexpr int kTileBytes = kScoreTileChunks * kChunkBytes + 16;  // +16: the tile starts at src % 16
static_assert((kScoreTileChunks * kChunkBytes) % 16 == 0, "tiles of a row start 16-byte apart");
static_assert(kHeadDim == 8 * 16, "8 k-steps of 16");
constexpr int kSmemLimit = 232448;  // sm_90 opt-in dynamic shared memory per block
constexpr int kGroupsInFlight = 4;  // head groups per pass of the mma loop (see head_groups)
static_assert(kGroupsInFlight >= 1 && kGroupsInFlight <= 4, "accumulators: 8 registers per head group");

// Bytes of shared memory for the queries of one layer: HG head groups x 8 k-steps x 32 lanes
// x terms x 8 bytes.
__host__ __device__ constexpr int query_layer_bytes(int HG, int terms) { return HG * 8 * 32 * terms * 8; }

int smem_bytes(int HG, int layers, int terms) {
  return layers * query_layer_bytes(HG, terms) + (layers * HG * 8 * 4 + 15) / 16 * 16 + kTileBytes;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Copies `bytes` (a multiple of 4) from src (4-byte aligned) to tile + src % 16: 16-byte
// copies for the aligned body, 4-byte ones for the ragged head and tail.
__device__ __forceinline__ void load_tile(uint8_t* tile, const uint8_t* src, int bytes) {
  const uintptr_t s = reinterpret_cast<uintptr_t>(src);
  uint8_t* dst = tile + (s & 15);
  const int head = static_cast<int>(((s + 15) & ~uintptr_t{15}) - s);
  const int body_end = static_cast<int>(((s + bytes) & ~uintptr_t{15}) - s);
  for (int i = threadIdx.x * 4; i < head; i += kThreads * 4) cp_async4(dst + i, src + i);
  for (int i = head + threadIdx.x * 16; i < body_end; i += kThreads * 16) cp_async16(dst + i, src + i);
  for (int i = body_end + threadIdx.x * 4; i < bytes; i += kThreads * 4) cp_async4(dst + i, src + i);
}

__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// True when one of the 4 bytes is an e4m3fn NaN (0x7F or 0xFF).
__device__ __forceinline__ bool has_fp8_nan(uint32_t w) {
  const uint32_t t = (w & 0x7F7F7F7Fu) ^ 0x7F7F7F7Fu;  // a NaN byte becomes 0
  return ((t - 0x01010101u) & ~t & 0x80808080u) != 0;
}

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }

// NG head groups [hg0, hg0 + NG) of one layer against the warp's two m16 tiles, each group
// with its own accumulators: 2 * NG independent mma chains per warp (one block of 8 warps per
// SM leaves 2 warps per scheduler, too few to hide the mma latency with 2 chains each).
// Adds relu(acc) * w into part[mt][half] (this thread's partial head sum).
template <int TERMS, int NG, typename QVec>
__device__ __forceinline__ void head_groups(const uint32_t (&A)[2][8][4], const QVec* ql, const float* wl, int hg0,
                                            int lane, int tq, float (&part)[2][2]) {
  float acc[NG][2][4];
#pragma unroll
  for (int g = 0; g < NG; ++g)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[g][mt][i] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const QVec v = ql[((hg0 + g) * 8 + kk) * 32 + lane];
      mma16816(acc[g][0], A[0][kk], v.x, v.y);
      mma16816(acc[g][1], A[1][kk], v.x, v.y);
      if constexpr (TERMS == 2) {
        mma16816(acc[g][0], A[0][kk], v.z, v.w);
        mma16816(acc[g][1], A[1][kk], v.z, v.w);
      }
    }
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const float2 w = reinterpret_cast<const float2*>(wl + (hg0 + g) * 8)[tq];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      part[mt][0] += fmaxf(acc[g][mt][0], 0.0f) * w.x + fmaxf(acc[g][mt][1], 0.0f) * w.y;
      part[mt][1] += fmaxf(acc[g][mt][2], 0.0f) * w.x + fmaxf(acc[g][mt][3], 0.0f) * w.y;
    }
  }
}

// Contract: see ScoreParams. Grid: persistent, at most one block per SM; block k owns the
// contiguous units [k*U/G, (k+1)*U/G) of U = B * ceil(N/256) tiles (row-major), so its
// query is reloaded only when its row changes. 256 threads, 1 block/SM (shared memory).
template <int TERMS>
__global__ void __launch_bounds__(kThreads, 1) score_kernel(const ScoreParams p, int64_t tiles_per_row, int64_t units) {
  static_assert(TERMS == 1 || TERMS == 2, "fp16 hi (fast) or hi + lo (exact)");
  allow_dependents();
  using QVec = typename std::conditional<TERMS == 2, uint4, uint2>::type;  // one lane's B fragments
  extern __shared__ __align__(16) uint8_t smem[];
  const int HG = (p.heads + 7) / 8, Hp = HG * 8, LC = p.layer_count;
  const int q_bytes = LC * query_layer_bytes(HG, TERMS);
  const QVec* sq = reinterpret_cast<const QVec*>(smem);
  float* sw = reinterpret_cast<float*>(smem + q_bytes);
  uint8_t* stile = smem + q_bytes + (LC * Hp * 4 + 15) / 16 * 16;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int64_t N = p.chunks;
  const int64_t u_begin = blockIdx.x * units / gridDim.x, u_end = (blockIdx.x + 1) * units / gridDim.x;

  auto src_of = [&](int64_t u, int64_t& b, int64_t& n0, int& cnt) {
    b = u / tiles_per_row;
    n0 = (u % tiles_per_row) * kScoreTileChunks;
    cnt = static_cast<int>(N - n0 < kScoreTileChunks ? N - n0 : kScoreTileChunks);
    return p.keys + (b * N + n0) * kChunkBytes;
  };
  if (u_begin < u_end) {  // every block has a unit when grid <= units; guarded all the same
    int64_t b, n0;
    int cnt;
    const uint8_t* src = src_of(u_begin, b, n0, cnt);
    load_tile(stile, src, cnt * kChunkBytes);
    cp_async_commit();
  }
  // The first key tile is in flight (keys are the caller's); everything below reads or writes
  // what the kernels ahead of this one produce (queries, earlier passes' scores, the flag).
  grid_dependency_wait();
  int64_t cur_b = -1;
  for (int64_t u = u_begin; u < u_end; ++u) {
    int64_t b, n0;
    int cnt;
    const uint8_t* src = src_of(u, b, n0, cnt);
    if (b != cur_b) {  // this row's queries and head weights into shared memory
      __syncthreads();
      const uint4* gq = reinterpret_cast<const uint4*>(static_cast<const __half*>(p.qfrag) +
                                                       (b * p.total_layers + p.layer0) * static_cast<int64_t>(Hp) *
                                                           kHeadDim * TERMS);
      for (int i = threadIdx.x; i < q_bytes / 16; i += kThreads) cp_async16(smem + 16 * i, gq + i);
      cp_async_commit();  // all in flight at once; waited for with the key tile below
      const float* gw = p.w_scaled + (b * p.total_layers + p.layer0) * static_cast<int64_t>(Hp);
      for (int i = threadIdx.x; i < LC * Hp; i += kThreads) sw[i] = gw[i];
      cur_b = b;
    }
    cp_async_wait_all();
    __syncthreads();

    // Step 1: A fragments of this warp's 32 rows, with the sign of the scale folded in.
    const uint8_t* t = stile + (reinterpret_cast<uintptr_t>(src) & 15);
    uint32_t A[2][8][4];
    float sc[2][2];
    int bad_row = INT_MAX;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp * kWarpChunks + mt * 16 + g + 8 * half;
        const uint8_t* row = t + r * kChunkBytes;
        const float scale = *reinterpret_cast<const float*>(row + kHeadDim);
        const bool valid = r < cnt;
        bool bad = !isfinite(scale);
        sc[mt][half] = fabsf(scale);
        const uint32_t flip = scale < 0.0f ? 0x80808080u : 0u;
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(row + 32 * tq + 4 * kk);
          bad |= has_fp8_nan(w);
          A[mt][kk][half] = fp8x2_to_f16x2((w ^ flip) & 0xFFFFu);
          A[mt][kk][2 + half] = fp8x2_to_f16x2((w ^ flip) >> 16);
        }
        if (valid && bad) bad_row = min(bad_row, r);
      }
    if (bad_row != INT_MAX) atomicMin(p.bad_chunk, static_cast<unsigned long long>(b * N + n0 + bad_row));
    __syncthreads();  // the tile buffer is free: prefetch the next tile behind the math
    if (u + 1 < u_end) {
      int64_t b1, n1;
      int cnt1;
      const uint8_t* src1 = src_of(u + 1, b1, n1, cnt1);
      load_tile(stile, src1, cnt1 * kChunkBytes);
      cp_async_commit();
    }

    // Step 2: every layer (all heads) against the fragments; ensemble in registers.
    float ens[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp * kWarpChunks + mt * 16 + g + 8 * half;
        ens[mt][half] = (!p.first_pass && r < cnt) ? p.scores[b * N + n0 + r] : 0.0f;
      }
    for (int l = 0; l < LC; ++l) {
      const QVec* ql = sq + l * (HG * 8 * 32);
      const float* wl = sw + l * Hp;
      float part[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
      int hg = 0;
      for (; hg + kGroupsInFlight <= HG; hg += kGroupsInFlight)
        head_groups<TERMS, kGroupsInFlight>(A, ql, wl, hg, lane, tq, part);
      for (; hg < HG; ++hg) head_groups<TERMS, 1>(A, ql, wl, hg, lane, tq, part);
      const bool first_layer = p.first_pass && l == 0;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float v = part[mt][half];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          const float logit = v * sc[mt][half];
          const float s = sigmoid(logit);
          if (first_layer) ens[mt][half] = s;
          else if (p.ensemble_mean) ens[mt][half] = __fadd_rn(ens[mt][half], s);
          else ens[mt][half] = fmaxf(ens[mt][half], s);
          const int r = warp * kWarpChunks + mt * 16 + g + 8 * half;
          if (p.layer_logits && tq == 0 && r < cnt)
            p.layer_logits[(static_cast<int64_t>(p.layer0 + l) * p.batch + b) * N + n0 + r] = logit;
        }
    }
    if (tq == 0) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = warp * kWarpChunks + mt * 16 + g + 8 * half;
          if (r >= cnt) continue;
          float v = ens[mt][half];
          if (p.last_pass && p.ensemble_mean) v = __fdiv_rn(v, static_cast<float>(p.total_layers));
          p.scores[b * N + n0 + r] = v;
        }
    }
  }

  // Step 3 (last pass): the last block to finish publishes the bad-chunk flag to the host and
  // re-arms it for the next call.
  if (!p.last_pass) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.blocks_done, 1u) == gridDim.x - 1) {
      __threadfence();
      *p.bad_chunk_out = atomicExch(p.bad_chunk, ~0ull);
      *p.blocks_done = 0;
      __threadfence_system();
    }
  }
}

}  // namespace

int score_max_layers_per_pass(int H, int terms) {
  const int HG = (H + 7) / 8;
  int layers = 0;
  while (smem_bytes(HG, layers + 1, terms) <= kSmemLimit) ++layers;
  return layers;
}

cudaError_t score_chunks(const ScoreParams& p, int sm_count, cudaStream_t stream) {
  if (p.terms != 1 && p.terms != 2) return cudaErrorInvalidValue;
  if (p.layer_count <= 0 || p.layer_count > score_max_layers_per_pass(p.heads, p.terms)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.keys) % 4 != 0) return cudaErrorMisalignedAddress;
  if (!p.bad_chunk || (p.last_pass && (!p.bad_chunk_out || !p.blocks_done))) return cudaErrorInvalidValue;
  const int64_t tiles_per_row = (p.chunks + kScoreTileChunks - 1) / kScoreTileChunks;
  const int64_t units = p.batch * tiles_per_row;
  const int grid = static_cast<int>(std::min<int64_t>(units, sm_count));
  const int smem = smem_bytes((p.heads + 7) / 8, p.layer_count, p.terms);
  const auto kernel = p.terms == 2 ? score_kernel<2> : score_kernel<1>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  return launch_chained(true, kernel, dim3(grid), dim3(kThreads), smem, stream, p, tiles_per_row, units);
}

}  // namespace flashmem::kernels
