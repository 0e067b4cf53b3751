// Scoring tile kernel (SPEC 4): [B, N, 132] fp8 keys x per-layer queries [H, 128] -> [B, N]
// ensembled sigmoid scores. CPU reference: the CPU backend's score_tiles
// (src/retriever/cpu_retriever.cpp).
//
//   logit[l, b, n] = sum_h relu(s_bn * (q[b, l, h, :] . k8[b, n, :])) * w[b, l, h]
//
// Layout of the matmul: chunks are M, heads N, the 128 key dims K; Hopper warpgroup MMA
// (wgmma m64n128k16, sm_90a; fast mode m64n128k32 e4m3) with both operands in shared memory,
// f32 accumulators. A block (4 warpgroups) owns tiles of 256 chunks: each warpgroup copies its 64
// rows of 132 bytes into shared memory (cp.async), copies them (exact mode: converted to f16,
// fp8 -> f16 is exact) into a 128-byte-swizzled K-major A tile, and scores them against every
// layer's query (all heads, staged once per batch row in the same swizzled layout by
// the query finish) with 4 wgmma per layer and 128-head tile (16 in exact mode). relu, the
// head weights, the head sum, the scale, sigmoid and the max/mean ensemble stay in
// registers; only [B, N] scores (and per-layer logits on request) reach device memory.
//
// NOTES:
// - Swizzle: row r of a 64-wide K block (128 bytes) holds its 16-byte chunk c at position
//   c ^ (r % 8), the hardware's 128B pattern; a k-step of 16 advances the descriptor's start
//   address by 32 bytes inside the block (the swizzle is applied to the final address).
// - Exact mode: q' = q * 2^e_h is split into fp16 hi + lo (22 significant bits); keys are exact
//   in fp16; products are exact and sums are f32 (two wgmma per k-step into one accumulator).
//   Fast mode (FP8): q * 2^e_h rounded to e4m3 (max |value| of a head in [2^7, 2^8)), wgmma
//   m64n128k32 e4m3 x e4m3 -> f32; the keys' e4m3 bytes are copied into a one-K-block A tile
//   as they are. (fp16 hi only, 11 bits, remains as TERMS 1 without FP8.)
// - The chunk scale is applied after the dot product: relu(s*d) = |s| * relu(sign(s)*d), and
//   sign(s)*d is obtained by flipping the fp8 sign bits of chunks with a negative scale.
// - Per-head 2^-e_h is folded into w (exact power-of-two scaling).
// - Warpgroups run decoupled: each owns the 64-chunk sub-tile wg of every 256-chunk tile of its
//   block, with its own ring of kStages raw sub-tiles (cp.async, one group a sub-tile) and only
//   its own named barrier (bar.sync wg + 1, 128) between copy, conversion and wgmma, so one
//   warpgroup's conversion and relu/weight epilogue run under another's wgmma. The block meets
//   (__syncthreads) only where the batch row changes, to load that row's queries. Measured
//   (H100, B 1, device time of the score graph, N 1M): lock-step (one raw 256-chunk tile,
//   two __syncthreads a tile) fast 0.294 / exact 0.688 ms, decoupled 0.273 / 0.608 ms; fast
//   with 3 sub-tiles in flight instead of 2: the same (0.274). Before (lock-step): 2 / 3 / 4
//   warpgroups 0.410 / 0.367 / 0.349 ms (fp16 fast scoring).
// - Head sum: exact mode does relu * w and the sum on the fp32 pipes; fast mode packs relu(d)
//   to bf16 (cvt.rn.relu.bf16x2, 2 values an instruction) and multiplies it on the tensor cores
//   (wgmma m64n8k16, A from registers) by a [128 heads x 8] tile holding, for up to 4 layers,
//   each weight as bf16 hi + lo columns; that head sum is issued together with the next item's
//   scoring. (It took fast B 1 N 1M from 0.273 to 0.258 ms device time on its own.)
// - One accumulator set per warpgroup (128 registers a thread at 512 threads leave no room
//   for two). A ping-pong of two 64-head halves (m64n64k32, next half in flight under this
//   half's head sum) made ptxas serialize the wgmma when written as a loop (C7514) and was
//   slower even as straight-line code (bench/RESULTS.md), so it was dropped.
// - Exact mode's two query terms take 64 KB a layer: one layer per pass (3 passes over the keys).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>

#include "kernels/pdl.cuh"
#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

constexpr int kWarpGroups = 4, kThreads = kWarpGroups * 128;  // 128 registers a thread at most
constexpr int kGroupRows = 64;  // wgmma M
constexpr int kTileChunks = kWarpGroups * kGroupRows;
static_assert(kTileChunks == 256 && kThreads == 512, "a tile is 4 warpgroups x 64 chunks");
constexpr int kStages = 2;  // raw 64-chunk sub-tiles in flight per warpgroup (see NOTES)
static_assert(kHeadTile == 128, "wgmma m64n128: 64 f32 accumulators per thread");
static_assert(kHeadDim == 2 * 64, "two 128-byte swizzle blocks of 64 f16 per row");
constexpr int kSwizzleBlock = 128;                                   // bytes of one row of a K block
// One warpgroup's A tile: 64 rows x 128 dims, f16 (two K blocks) or e4m3 (one K block).
__host__ __device__ constexpr int a_tile_bytes(bool fp8) { return (fp8 ? 1 : 2) * kGroupRows * kSwizzleBlock; }
// One warpgroup's raw sub-tile buffer: 64 rows of 132 bytes, +16: it starts at src % 16.
constexpr int kSubTileBytes = (kGroupRows * kChunkBytes + 16 + 15) / 16 * 16;
static_assert((kGroupRows * kChunkBytes) % 16 == 0, "sub-tiles of a row start 16-byte apart");
constexpr int kSmemLimit = 232448;  // sm_90 opt-in dynamic shared memory per block

// Bytes of shared memory for the queries of one layer: terms x 2 K blocks x Hp rows x 128
// (f16), or one K block x Hp rows x 128 (e4m3, one term).
__host__ __device__ constexpr int query_layer_bytes(int Hp, int terms, bool fp8) {
  return fp8 ? Hp * kSwizzleBlock : terms * 2 * Hp * kSwizzleBlock;
}

struct SmemLayout {
  int q, a, w, scale, tile, total;  // offsets from the 1024-aligned base; total includes the slack
};
__host__ __device__ constexpr SmemLayout smem_layout(int Hp, int layers, int terms, bool fp8) {
  SmemLayout s{};
  s.q = 0;
  s.a = layers * query_layer_bytes(Hp, terms, fp8);  // a multiple of 1024 (Hp % 128 == 0)
  s.w = s.a + kWarpGroups * a_tile_bytes(fp8);
  s.scale = s.w + (fp8 ? (layers + 3) / 4 * Hp * 16 : (layers * Hp * 4 + 15) / 16 * 16);  // fp8: head-sum B tiles
  s.tile = s.scale + kTileChunks * 4;
  s.total = s.tile + kWarpGroups * kStages * kSubTileBytes + 1024;  // +1024: the base is aligned up to 1024
  return s;
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
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async) visible to wgmma.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// One warpgroup (thread wt of 128) copies `bytes` (a multiple of 4) from src (4-byte aligned)
// to tile + src % 16: 16-byte copies for the aligned body, 4-byte ones for the ragged ends.
__device__ __forceinline__ void load_tile(uint8_t* tile, const uint8_t* src, int bytes, int wt) {
  const uintptr_t s = reinterpret_cast<uintptr_t>(src);
  uint8_t* dst = tile + (s & 15);
  const int head = min(bytes, static_cast<int>(((s + 15) & ~uintptr_t{15}) - s));
  const int body_end = max(head, static_cast<int>(((s + bytes) & ~uintptr_t{15}) - s));
  for (int i = wt * 4; i < head; i += 128 * 4) cp_async4(dst + i, src + i);
  for (int i = head + wt * 16; i < body_end; i += 128 * 16) cp_async16(dst + i, src + i);
  for (int i = body_end + wt * 4; i < bytes; i += 128 * 4) cp_async4(dst + i, src + i);
}

// Barrier of one warpgroup's 128 threads (ids 1..4; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1) : "memory"); }

__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// True when one of the 4 bytes is an e4m3fn NaN (0x7F or 0xFF).
__device__ __forceinline__ bool has_fp8_nan(uint32_t w) {
  const uint32_t t = (w & 0x7F7F7F7Fu) ^ 0x7F7F7F7Fu;  // a NaN byte becomes 0
  return ((t - 0x01010101u) & ~t & 0x80808080u) != 0;
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(p));
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the async MMA boundaries.
__device__ __forceinline__ void fence_operands(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The 64 f32 accumulators of an m64n128 wgmma: the register list of its PTX and the asm
// operands %0 .. %63 that bind it to d[0 .. 63].
#define FM_WGMMA_D64                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "    \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FM_WGMMA_D64_OPERANDS(d)                                                                               \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),   \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),    \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),   \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),   \
      "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),   \
      "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),   \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),   \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d (+)= A[64 x 16] * B[16 x 128]^T, both from shared memory; accumulate = false overwrites d.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FM_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : FM_WGMMA_D64_OPERANDS(d)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}

// d (+)= A[64 x 32] * B[32 x 128]^T, e4m3 x e4m3 -> f32, both K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " FM_WGMMA_D64 ", %64, %65, p, 1, 1;\n}\n"
      : FM_WGMMA_D64_OPERANDS(d)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}

__device__ __forceinline__ float sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }
// Fast mode: ex2.approx and rcp.approx (a few ulp, far below the e4m3 rounding of its queries).
__device__ __forceinline__ float sigmoid_approx(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// A descriptor of p + bytes from p's (bytes % 16 == 0): the start address is its low 14 bits in
// 16-byte units and shared memory ends below 2^18, so the sum never carries out of the field.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, int bytes) { return desc + (bytes >> 4); }

// Issues (without waiting) the wgmma of one (layer, head tile) item: 8 k-steps x TERMS.
// a: this warpgroup's A tile; q: the layer's query image; Hp: padded heads (rows of a K block).
// FP8: 4 k-steps of 32 e4m3 (32 bytes each) inside the single 128-byte K block.
template <int TERMS, bool FP8>
__device__ __forceinline__ void issue_item(float (&d)[64], const uint8_t* a, const uint8_t* q, int Hp, int nt) {
  // FP8: issued while the head sum runs; a fence here would count as redefining the
  // accumulator mid-pipeline (ptxas C7515 serializes); the volatile cvts order the reads.
  if constexpr (!FP8) fence_operands(d);
  wgmma_fence();
  const uint64_t da = smem_desc(a), dq = smem_desc(q + nt * kHeadTile * kSwizzleBlock);
  if constexpr (FP8) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k32_e4m3(d, desc_add(da, kk * 32), desc_add(dq, kk * 32), kk > 0);
  } else {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const int kb = kk / 4, koff = (kk % 4) * 32;  // K block, byte offset inside the 128-byte row
#pragma unroll
      for (int t = 0; t < TERMS; ++t)
        wgmma_m64n128k16(d, desc_add(da, kb * kGroupRows * kSwizzleBlock + koff),
                         desc_add(dq, (t * 2 + kb) * Hp * kSwizzleBlock + koff), kk > 0 || t > 0);
    }
  }
  wgmma_commit();
}

// Adds relu(d) * w into part[half] (this thread's partial head sum for rows g and g + 8):
// d[4j + {0,1}] is row g, heads 8j + 2tq + {0,1}; d[4j + {2,3}] the same heads of row g + 8.
__device__ __forceinline__ void head_sum(float (&d)[64], const float* wl, int tq, float (&part)[2]) {
  fence_operands(d);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float2 w = reinterpret_cast<const float2*>(wl + 8 * j)[tq];
    part[0] += fmaxf(d[4 * j], 0.0f) * w.x + fmaxf(d[4 * j + 1], 0.0f) * w.y;
    part[1] += fmaxf(d[4 * j + 2], 0.0f) * w.x + fmaxf(d[4 * j + 3], 0.0f) * w.y;
  }
}

// Fast mode's head sum on the tensor cores: d (+)= A[64 x 16] * B[16 x 8]^T, bf16 x bf16 -> f32,
// A from registers (the accumulator fragment layout of the scoring wgmma), B K-major in
// shared memory without swizzle (8-row x 16-byte core matrices, 128 bytes apart along K).
__device__ __forceinline__ void wgmma_m64n8k16_bf16_rs(float (&d)[4], const uint32_t (&a)[4], uint64_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(static_cast<int>(accumulate)));
}
// {relu(lo), relu(hi)} rounded to bf16, lo in the low half.
__device__ __forceinline__ uint32_t relu_bf16x2(float lo, float hi) {
  uint32_t r;
  asm volatile("cvt.rn.relu.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ uint64_t smem_desc_plain(const void* p) {
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(p));
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{128 >> 4} << 16) | (uint64_t{256 >> 4} << 32);
}
// Fast mode: issues (without waiting) hs (+)= relu(d) x wt, wt: the [128 heads x 8] bf16 B tile
// of this item (kHeadSumTileBytes): 8 k-steps of 16 heads; the scoring wgmma must be complete.
constexpr int kHeadSumTileBytes = kHeadTile * 8 * 2;
__device__ __forceinline__ void head_sum_mma(float (&d)[64], const uint8_t* wt, float (&hs)[4], bool accumulate) {
  uint32_t a[8][4];
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[s][i] = relu_bf16x2(d[8 * s + 2 * i], d[8 * s + 2 * i + 1]);
  wgmma_fence();
  const uint64_t dw = smem_desc_plain(wt);
#pragma unroll
  for (int s = 0; s < 8; ++s) wgmma_m64n8k16_bf16_rs(hs, a[s], desc_add(dw, s * 2 * 128), accumulate || s > 0);
  wgmma_commit();
}

// Contract: see ScoreParams. Grid: persistent, at most one block per SM; block k owns the
// contiguous units [k*U/G, (k+1)*U/G) of U = B * ceil(N/256) tiles (row-major), so its
// query is reloaded only when its row changes. 512 threads (4 warpgroups), 1 block/SM.
template <int TERMS, bool FP8>
__global__ void __launch_bounds__(kThreads, 1) score_kernel(const ScoreParams p, int64_t tiles_per_row, int64_t units) {
  static_assert(TERMS == 1 || TERMS == 2, "fp16 hi (fast) or hi + lo (exact)");
  static_assert(!FP8 || TERMS == 1, "e4m3 queries: one term");
  allow_dependents();
  extern __shared__ uint8_t smem_raw[];
  // Aligned up to 1024 by pointer arithmetic on smem_raw (not an integer round trip), so the
  // compiler still knows every access below is to shared memory (LDS/STS, 32-bit addresses).
  uint8_t* smem = smem_raw + ((1024 - (static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  const int Hp = padded_heads(p.heads), NT = Hp / kHeadTile, LC = p.layer_count;
  const SmemLayout L = smem_layout(Hp, LC, TERMS, FP8);
  const int q_bytes = L.a;
  float* sw = reinterpret_cast<float*>(smem + L.w);
  float* sscale = reinterpret_cast<float*>(smem + L.scale);
  constexpr int S = kStages;
  const int wg = threadIdx.x / 128, wt = threadIdx.x % 128;  // warpgroup, thread in it
  uint8_t* stile = smem + L.tile + wg * S * kSubTileBytes;   // this warpgroup's raw sub-tile ring
  const int warp = wt / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  uint8_t* atile = smem + L.a + wg * a_tile_bytes(FP8);
  const int64_t N = p.chunks;
  const int64_t u_begin = blockIdx.x * units / gridDim.x, u_end = (blockIdx.x + 1) * units / gridDim.x;

  // Tile u = (row b, tile t of the row): chunks n0 = t * 256 .. n0 + cnt. Walked in order by two
  // cursors (the prefetch runs S tiles ahead), so no 64-bit division per tile.
  struct Cursor {
    int64_t b, t;
  };
  const auto start = [&] { return Cursor{u_begin / tiles_per_row, u_begin % tiles_per_row}; };
  const auto advance = [&](Cursor& c) {
    if (++c.t == tiles_per_row) c = Cursor{c.b + 1, 0};
  };
  const auto chunks_of = [&](const Cursor& c) {  // cnt of tile c
    const int64_t n0 = c.t * kTileChunks;
    return static_cast<int>(N - n0 < kTileChunks ? N - n0 : kTileChunks);
  };
  // this warpgroup's 64-chunk sub-tile of tile c
  const auto src_of = [&](const Cursor& c) { return p.keys + (c.b * N + c.t * kTileChunks + wg * kGroupRows) * kChunkBytes; };
  Cursor pre = start();
  int slot = 0;  // (u - u_begin) % S of the next prefetch
  const auto prefetch = [&](int64_t u) {  // tile u (the next in order): one cp.async group (empty past the end)
    if (u < u_end) {
      const int rows = max(0, min(kGroupRows, chunks_of(pre) - wg * kGroupRows));
      load_tile(stile + slot * kSubTileBytes, src_of(pre), rows * kChunkBytes, wt);
      advance(pre);
      slot = slot + 1 == S ? 0 : slot + 1;
    }
    cp_async_commit();
  };
  for (int s = 0; s < S; ++s) prefetch(u_begin + s);
  // The first key tile is in flight (keys are the caller's); everything below reads or writes
  // what the kernels ahead of this one produce (queries, earlier passes' scores, the flag).
  grid_dependency_wait();
  int64_t cur_b = -1;
  int cur_slot = 0;
  for (Cursor c = start(); c.b * tiles_per_row + c.t < u_end; advance(c), cur_slot = cur_slot + 1 == S ? 0 : cur_slot + 1) {
    const int64_t u = c.b * tiles_per_row + c.t, b = c.b, n0 = c.t * kTileChunks;
    const int cnt = chunks_of(c);
    const uint8_t* src = src_of(c);
    if (b != cur_b) {  // this row's query images and head weights into shared memory
      // Every warpgroup walks the same tiles, so all of them meet here, done with the last row.
      __syncthreads();
      const uint4* gq = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p.qfrag) +
                                                       (b * p.total_layers + p.layer0) *
                                                           static_cast<int64_t>(query_layer_bytes(Hp, TERMS, FP8)));
      for (int i = threadIdx.x; i < q_bytes / 16; i += kThreads) cp_async16(smem + 16 * i, gq + i);
      cp_async_commit();  // all in flight at once; waited for with the key tile below
      const float* gw = p.w_scaled + (b * p.total_layers + p.layer0) * static_cast<int64_t>(Hp);
      if constexpr (FP8) {
        // Head-sum B tiles (head_sum_mma), one per (group of 4 layers, head tile): column
        // 2 (l % 4) holds layer l's weights rounded to bf16, column 2 (l % 4) + 1 the remainder.
        __nv_bfloat16* wb = reinterpret_cast<__nv_bfloat16*>(smem + L.w);
        for (int i = threadIdx.x; i < (LC + 3) / 4 * NT * kHeadSumTileBytes / 2; i += kThreads) {
          const int tile = i / (kHeadSumTileBytes / 2), e = i % (kHeadSumTileBytes / 2);
          const int n = e % 64 / 8, l = tile / NT * 4 + n / 2, h = tile % NT * kHeadTile + e / 64 * 8 + e % 8;
          const float w = l < LC ? gw[l * Hp + h] : 0.0f;
          const __nv_bfloat16 hi = __float2bfloat16_rn(w);
          wb[i] = n % 2 == 0 ? hi : __float2bfloat16_rn(w - __bfloat162float(hi));
        }
      } else {
        for (int i = threadIdx.x; i < LC * Hp; i += kThreads) sw[i] = gw[i];
      }
      cur_b = b;
      cp_async_wait_all();
      fence_async_shared();  // the queries, for every warpgroup's wgmma
      __syncthreads();
    } else {
      cp_async_wait_group<S - 1>();  // sub-tile u; later ones may stay in flight
      warpgroup_sync(wg);            // every thread's copies of it have landed
    }

    // Step 1: this warpgroup's 64 rows into the swizzled A tile (thread: half a row), the sign
    // of the scale folded in, |scale| to shared memory, NaN check. FP8: the e4m3 bytes as they
    // are (one 128-byte K block a row); else f16 (one K block a thread).
    if constexpr (FP8) {
      const int r = wt / 2, hf = wt % 2, row = wg * kGroupRows + r;
      const uint8_t* t = stile + cur_slot * kSubTileBytes + (reinterpret_cast<uintptr_t>(src) & 15) +
                         r * kChunkBytes;
      const float scale = *reinterpret_cast<const float*>(t + kHeadDim);
      const bool valid = row < cnt;
      const uint32_t flip = scale < 0.0f ? 0x80808080u : 0u;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(t);
      uint8_t* dst = atile + r * kSwizzleBlock;
      bool bad = !isfinite(scale);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = hf * 4 + (i ^ hf);  // 16-byte chunk c of the row (halves staggered for banks)
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[j] = valid ? words[4 * c + j] : 0u;
          bad |= has_fp8_nan(w[j]);
          w[j] ^= flip;
        }
        *reinterpret_cast<uint4*>(dst + ((c ^ (r % 8)) * 16)) = make_uint4(w[0], w[1], w[2], w[3]);
      }
      if (valid && bad) atomicMin(p.bad_chunk, static_cast<unsigned long long>(b * N + n0 + row));
      if (hf == 0) sscale[row] = valid ? fabsf(scale) : 0.0f;
    } else {
      const int r = wt / 2, kb = wt % 2, row = wg * kGroupRows + r;
      const uint8_t* t = stile + cur_slot * kSubTileBytes + (reinterpret_cast<uintptr_t>(src) & 15) +
                         r * kChunkBytes;
      const float scale = *reinterpret_cast<const float*>(t + kHeadDim);
      const bool valid = row < cnt;
      const uint32_t flip = scale < 0.0f ? 0x80808080u : 0u;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(t + 64 * kb);
      uint8_t* dst = atile + kb * kGroupRows * kSwizzleBlock + r * kSwizzleBlock;
      bool bad = !isfinite(scale);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = i ^ (kb << 2);  // the two K-block halves of a row hit different banks
        const uint32_t w0 = valid ? words[2 * c] : 0u, w1 = valid ? words[2 * c + 1] : 0u;
        bad |= has_fp8_nan(w0) | has_fp8_nan(w1);
        const uint4 v = make_uint4(fp8x2_to_f16x2((w0 ^ flip) & 0xFFFFu), fp8x2_to_f16x2((w0 ^ flip) >> 16),
                                   fp8x2_to_f16x2((w1 ^ flip) & 0xFFFFu), fp8x2_to_f16x2((w1 ^ flip) >> 16));
        *reinterpret_cast<uint4*>(dst + ((c ^ (r % 8)) * 16)) = v;
      }
      if (valid && bad) atomicMin(p.bad_chunk, static_cast<unsigned long long>(b * N + n0 + row));
      if (kb == 0) sscale[row] = valid ? fabsf(scale) : 0.0f;
    }
    fence_async_shared();  // the A tile and the cp.async'd queries, for wgmma
    warpgroup_sync(wg);    // the A tile is complete and the raw slot free: prefetch behind the math
    prefetch(u + S);

    // Step 2: every (layer, head tile) item against the A tile; a layer's logit, sigmoid and
    // ensemble after its last head tile.
    const int r0 = wg * kGroupRows + warp * 16 + g;  // this thread's rows r0, r0 + 8
    float ens[2], part[2] = {0.0f, 0.0f};
    const float sc[2] = {sscale[r0], sscale[r0 + 8]};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r0 + 8 * half;
      ens[half] = (!p.first_pass && r < cnt) ? p.scores[b * N + n0 + r] : 0.0f;
    }
    auto finish_layer = [&](int l, const float (&v)[2]) {  // v: layer l's head sums of rows r0, r0 + 8
      const bool first_layer = p.first_pass && l == 0;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float logit = v[half] * sc[half];
        const float s = FP8 ? sigmoid_approx(logit) : sigmoid(logit);
        if (first_layer) ens[half] = s;
        else if (p.ensemble_mean) ens[half] = __fadd_rn(ens[half], s);
        else ens[half] = fmaxf(ens[half], s);
        const int r = r0 + 8 * half;
        if (p.layer_logits && tq == 0 && r < cnt)
          p.layer_logits[(static_cast<int64_t>(p.layer0 + l) * p.batch + b) * N + n0 + r] = logit;
      }
    };
    float acc[64], hs[4];
    const auto copy_hs = [&](float (&t)[4]) {  // volatile reads: they stay after the wait before them
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("mov.b32 %0, %1;\n" : "=f"(t[i]) : "f"(hs[i]));
    };
    // FP8: layer l's head sums t (a copy of hs): its columns (hi, lo) are held by the thread
    // tq = l % 4 of each row's quad.
    auto finish_hs = [&](int l, const float (&t)[4]) {
      const int src = (lane & ~3) | (l % 4);
      const float v[2] = {__shfl_sync(0xffffffffu, t[0] + t[1], src), __shfl_sync(0xffffffffu, t[2] + t[3], src)};
      finish_layer(l, v);
    };
    if constexpr (FP8) issue_item<1, true>(acc, atile, smem, Hp, 0);
    struct Item {  // (layer, head tile), walked in order without a division by NT
      int l, nt;
    };
    const auto next = [&](Item i) { return i.nt + 1 == NT ? Item{i.l + 1, 0} : Item{i.l, i.nt + 1}; };
    for (Item it{0, 0}; it.l < LC; it = next(it)) {
      const int l = it.l, nt = it.nt;
      const Item nx = next(it);
      const bool has_next = nx.l < LC;
      if constexpr (FP8) {
        // The scoring wgmma of this item was issued by the previous one (or before the loop);
        // the head sum and the next item's scoring then run while the layer is finished.
        wgmma_wait<0>();  // this item's scoring, and the previous item's head sum
        float t[4];
        copy_hs(t);
        head_sum_mma(acc, smem + L.w + (l / 4 * NT + nt) * kHeadSumTileBytes, hs, nt > 0);
        if (has_next) issue_item<1, true>(acc, atile, smem + nx.l * query_layer_bytes(Hp, 1, true), Hp, nx.nt);
        if (l > 0 && nt == 0) finish_hs(l - 1, t);
        if (has_next) continue;
        wgmma_wait<0>();
        copy_hs(t);
        finish_hs(l, t);
      } else {
        issue_item<TERMS, FP8>(acc, atile, smem + l * query_layer_bytes(Hp, TERMS, FP8), Hp, nt);
        wgmma_wait<0>();
        head_sum(acc, sw + l * Hp + nt * kHeadTile, tq, part);
        if (nt != NT - 1) continue;
        float v[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          v[half] = part[half];
          v[half] += __shfl_xor_sync(0xffffffffu, v[half], 1);
          v[half] += __shfl_xor_sync(0xffffffffu, v[half], 2);
          part[half] = 0.0f;
        }
        finish_layer(l, v);
      }
    }
    if (tq == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = r0 + 8 * half;
        if (r >= cnt) continue;
        float v = ens[half];
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

int score_max_layers_per_pass(int H, int terms, bool fp8) {
  const int Hp = padded_heads(H);
  int layers = 0;
  while (smem_layout(Hp, layers + 1, terms, fp8).total <= kSmemLimit) ++layers;
  return layers;
}

cudaError_t score_chunks(const ScoreParams& p, int sm_count, cudaStream_t stream) {
  if ((p.terms != 1 && p.terms != 2) || (p.fp8 && p.terms != 1)) return cudaErrorInvalidValue;
  if (p.layer_count <= 0 || p.layer_count > score_max_layers_per_pass(p.heads, p.terms, p.fp8))
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.keys) % 4 != 0) return cudaErrorMisalignedAddress;
  if (!p.bad_chunk || (p.last_pass && (!p.bad_chunk_out || !p.blocks_done))) return cudaErrorInvalidValue;
  const int64_t tiles_per_row = (p.chunks + kTileChunks - 1) / kTileChunks;
  const int64_t units = p.batch * tiles_per_row;
  const int grid = static_cast<int>(std::min<int64_t>(units, sm_count));
  const int smem = smem_layout(padded_heads(p.heads), p.layer_count, p.terms, p.fp8).total;
  const auto kernel = p.fp8 ? score_kernel<1, true> : p.terms == 2 ? score_kernel<2, false> : score_kernel<1, false>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  return launch_chained(true, kernel, dim3(grid), dim3(kThreads), smem, stream, p, tiles_per_row, units);
}

}  // namespace flashmem::kernels
