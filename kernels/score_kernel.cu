// Scoring tile kernel (SPEC 4) of exact mode (and of fast mode's fp16 scoring,
// FLASHMEM_CUDA_FAST_SCORING=fp16): [B, N, 132] fp8 keys x per-layer queries [H, 128] -> [B, N]
// ensembled sigmoid scores. Fast mode's fp8 scoring is score_fp8_kernel.cu. CPU reference: the
// CPU backend's score_tiles (src/retriever/cpu_retriever.cpp).
//
//   logit[l, b, n] = sum_h relu(s_bn * (q[b, l, h, :] . k8[b, n, :])) * w[b, l, h]
//
// Layout of the matmul: chunks are M, heads N, the 128 key dims K; Hopper warpgroup MMA
// (wgmma m64n128k16, sm_90a) with both operands in shared memory, f32 accumulators. A block
// (4 warpgroups) owns tiles of 256 chunks: each warpgroup copies its 64 rows of 132 bytes into
// shared memory (cp.async), converts them (fp8 -> f16 is exact) into a 128-byte-swizzled
// K-major A tile, and scores them against every layer's query (all heads, staged once per
// batch row in the same swizzled layout by the query finish) with 16 wgmma per layer and
// 128-head tile (8 with one term). relu, the head weights, the head sum, the scale, sigmoid
// and the max/mean ensemble stay in registers; only [B, N] scores (and per-layer logits on
// request) reach device memory.
//
// NOTES:
// - Swizzle: row r of a 64-wide K block (128 bytes) holds its 16-byte chunk c at position
//   c ^ (r % 8), the hardware's 128B pattern; a k-step of 16 advances the descriptor's start
//   address by 32 bytes inside the block (the swizzle is applied to the final address).
// - Exact mode: q' = q * 2^e_h is split into fp16 hi + lo (22 significant bits); keys are exact
//   in fp16; products are exact and sums are f32 (two wgmma per k-step into one accumulator).
//   TERMS 1 (fp16 hi only, 11 bits) is the fp16 fast scoring kept for comparison.
// - The chunk scale is applied after the dot product: relu(s*d) = |s| * relu(sign(s)*d), and
//   sign(s)*d is obtained by flipping the fp8 sign bits of chunks with a negative scale.
// - Per-head 2^-e_h is folded into w (exact power-of-two scaling).
// - Warpgroups run decoupled: each owns the 64-chunk sub-tile wg of every 256-chunk tile of its
//   block, with its own ring of kStages raw sub-tiles (cp.async, one group a sub-tile) and only
//   its own named barrier (bar.sync wg + 1, 128) between copy, conversion and wgmma, so one
//   warpgroup's conversion and relu/weight epilogue run under another's wgmma. The block meets
//   (__syncthreads) only where the batch row changes, to load that row's queries. Measured
//   (H100, B 1, device time of the score graph, N 1M): lock-step (one raw 256-chunk tile,
//   two __syncthreads a tile) exact 0.688 ms, decoupled 0.608 ms.
// - The head sum (relu * w and the sum over heads) runs on the fp32 pipes, in f32.
// - Exact mode's two query terms take 64 KB a layer: one layer per pass (3 passes over the keys).
#include "kernels/pdl.cuh"
#include "kernels/score_common.cuh"

#include <algorithm>

namespace flashmem::kernels {

namespace {

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

__device__ __forceinline__ float sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }

// The top bit of each byte of the result is set where the byte is an e4m3fn NaN (0x7F or 0xFF):
// adding 1 to the low 7 bits carries into bit 7 exactly for 0x7F, and never across bytes.
__device__ __forceinline__ uint32_t nan_bytes(uint32_t w) { return (w & 0x7F7F7F7Fu) + 0x01010101u; }

// The per-thread end of a wgmma M tile: rows r0 and r0 + 8 (r0 = 16 * warp + lane / 4 of the
// tile whose row 0 is chunk n0 of batch row b; cnt valid rows), each layer's logit = head sum *
// |scale|, its sigmoid folded into the max/mean ensemble, then the score written.
struct RowPairEnd {
  int64_t base;  // b * N + n0: flat index of the tile's row 0
  int r0, cnt;
  float sc[2], ens[2];

  __device__ __forceinline__ RowPairEnd(const ScoreParams& p, int64_t b, int64_t n0, int r0_, int cnt_, float s0, float s1)
      : base(b * p.chunks + n0), r0(r0_), cnt(cnt_), sc{s0, s1} {
#pragma unroll
    for (int half = 0; half < 2; ++half)
      ens[half] = (!p.first_pass && r0 + 8 * half < cnt) ? p.scores[base + r0 + 8 * half] : 0.0f;
  }
  // Folds s (sigmoids, or their sum over a group of layers) into the ensemble; first: the
  // first layers of the first pass.
  __device__ __forceinline__ void combine(const ScoreParams& p, bool first, const float (&s)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (first) ens[half] = s[half];
      else if (p.ensemble_mean) ens[half] = __fadd_rn(ens[half], s[half]);
      else ens[half] = fmaxf(ens[half], s[half]);
    }
  }
  // Layer l's (of this pass) logit of row r0 + 8 * half, when asked for.
  __device__ __forceinline__ void store_logit(const ScoreParams& p, int l, int half, float logit) const {
    const int r = r0 + 8 * half;
    if (p.layer_logits && r < cnt) p.layer_logits[(static_cast<int64_t>(p.layer0 + l) * p.batch) * p.chunks + base + r] = logit;
  }
  // v: layer l's (of this pass) head sums of rows r0, r0 + 8; the quad's thread tq == 0 writes
  // the logits when asked.
  __device__ __forceinline__ void layer(const ScoreParams& p, int l, const float (&v)[2], int tq) {
    float s[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float logit = v[half] * sc[half];
      s[half] = sigmoid(logit);
      if (tq == 0) store_logit(p, l, half, logit);
    }
    combine(p, p.first_pass && l == 0, s);
  }
  // Writes the scores (the quad's thread tq == 0).
  __device__ __forceinline__ void write(const ScoreParams& p, int tq) const {
    if (tq != 0) return;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r0 + 8 * half;
      if (r >= cnt) continue;
      float v = ens[half];
      if (p.last_pass && p.ensemble_mean) v = __fdiv_rn(v, static_cast<float>(p.total_layers));
      p.scores[base + r] = v;
    }
  }
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
// Barrier of one warpgroup's 128 threads (ids 1..4; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(wg + 1) : "memory"); }

// Keeps the compiler from moving accumulator reads/writes across the async MMA boundaries.
__device__ __forceinline__ void fence_operands(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

constexpr int kWarpGroups = 4, kThreads = kWarpGroups * 128;  // 128 registers a thread at most
constexpr int kTileChunks = kWarpGroups * kGroupRows;
static_assert(kTileChunks == 256 && kThreads == 512, "a tile is 4 warpgroups x 64 chunks");
constexpr int kStages = 2;  // raw 64-chunk sub-tiles in flight per warpgroup (see NOTES)
static_assert(kHeadTile == 128, "wgmma m64n128: 64 f32 accumulators per thread");
static_assert(kHeadDim == 2 * 64, "two 128-byte swizzle blocks of 64 f16 per row");
// One warpgroup's A tile: 64 rows x 128 dims f16 (two K blocks).
constexpr int kATileBytes = 2 * kGroupRows * kSwizzleBlock;
// One warpgroup's raw sub-tile buffer: 64 rows of 132 bytes, +16: it starts at src % 16.
constexpr int kSubTileBytes = (kGroupRows * kChunkBytes + 16 + 15) / 16 * 16;
static_assert((kGroupRows * kChunkBytes) % 16 == 0, "sub-tiles of a row start 16-byte apart");

// Bytes of shared memory for the queries of one layer: terms x 2 K blocks x Hp rows x 128.
__host__ __device__ constexpr int query_layer_bytes(int Hp, int terms) { return terms * 2 * Hp * kSwizzleBlock; }

struct SmemLayout {
  int q, a, w, scale, tile, total;  // offsets from the 1024-aligned base; total includes the slack
};
__host__ __device__ constexpr SmemLayout smem_layout(int Hp, int layers, int terms) {
  SmemLayout s{};
  s.q = 0;
  s.a = layers * query_layer_bytes(Hp, terms);  // a multiple of 1024 (Hp % 128 == 0)
  s.w = s.a + kWarpGroups * kATileBytes;
  s.scale = s.w + (layers * Hp * 4 + 15) / 16 * 16;
  s.tile = s.scale + kTileChunks * 4;
  s.total = s.tile + kWarpGroups * kStages * kSubTileBytes + 1024;  // +1024: the base is aligned up to 1024
  return s;
}

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

__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// d (+)= A[64 x 16] * B[16 x 128]^T, both from shared memory; accumulate = false overwrites d.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FM_WGMMA_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : FM_WGMMA_D64_OPERANDS(d)
      : "l"(a), "l"(b), "r"(static_cast<int>(accumulate)));
}

// Issues (without waiting) the wgmma of one (layer, head tile) item: 8 k-steps x TERMS.
// a: this warpgroup's A tile; q: the layer's query image; Hp: padded heads (rows of a K block).
template <int TERMS>
__device__ __forceinline__ void issue_item(float (&d)[64], const uint8_t* a, const uint8_t* q, int Hp, int nt) {
  fence_operands(d);
  wgmma_fence();
  const uint64_t da = smem_desc(a), dq = smem_desc(q + nt * kHeadTile * kSwizzleBlock);
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int kb = kk / 4, koff = (kk % 4) * 32;  // K block, byte offset inside the 128-byte row
#pragma unroll
    for (int t = 0; t < TERMS; ++t)
      wgmma_m64n128k16(d, desc_add(da, kb * kGroupRows * kSwizzleBlock + koff),
                       desc_add(dq, (t * 2 + kb) * Hp * kSwizzleBlock + koff), kk > 0 || t > 0);
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

// Contract: see ScoreParams. Grid: persistent, at most one block per SM; block k owns the
// contiguous units [k*U/G, (k+1)*U/G) of U = B * ceil(N/256) tiles (row-major), so its
// query is reloaded only when its row changes. 512 threads (4 warpgroups), 1 block/SM.
template <int TERMS>
__global__ void __launch_bounds__(kThreads, 1) score_kernel(const ScoreParams p, int64_t tiles_per_row, int64_t units) {
  static_assert(TERMS == 1 || TERMS == 2, "fp16 hi (fast) or hi + lo (exact)");
  allow_dependents();
  extern __shared__ uint8_t smem_raw[];
  // Aligned up to 1024 by pointer arithmetic on smem_raw (not an integer round trip), so the
  // compiler still knows every access below is to shared memory (LDS/STS, 32-bit addresses).
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const int Hp = padded_heads(p.heads), NT = Hp / kHeadTile, LC = p.layer_count;
  const SmemLayout L = smem_layout(Hp, LC, TERMS);
  const int q_bytes = L.a;
  float* sw = reinterpret_cast<float*>(smem + L.w);
  float* sscale = reinterpret_cast<float*>(smem + L.scale);
  constexpr int S = kStages;
  const int wg = threadIdx.x / 128, wt = threadIdx.x % 128;  // warpgroup, thread in it
  uint8_t* stile = smem + L.tile + wg * S * kSubTileBytes;   // this warpgroup's raw sub-tile ring
  const int warp = wt / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  uint8_t* atile = smem + L.a + wg * kATileBytes;
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
                                                           static_cast<int64_t>(query_layer_bytes(Hp, TERMS)));
      for (int i = threadIdx.x; i < q_bytes / 16; i += kThreads) cp_async16(smem + 16 * i, gq + i);
      cp_async_commit();  // all in flight at once; waited for with the key tile below
      const float* gw = p.w_scaled + (b * p.total_layers + p.layer0) * static_cast<int64_t>(Hp);
      for (int i = threadIdx.x; i < LC * Hp; i += kThreads) sw[i] = gw[i];
      cur_b = b;
      cp_async_wait_all();
      fence_async_shared();  // the queries, for every warpgroup's wgmma
      __syncthreads();
    } else {
      cp_async_wait_group<S - 1>();  // sub-tile u; later ones may stay in flight
      warpgroup_sync(wg);            // every thread's copies of it have landed
    }

    // Step 1: this warpgroup's 64 rows into the swizzled f16 A tile (thread: one K block of a
    // row), the sign of the scale folded in, |scale| to shared memory, NaN check.
    {
      const int r = wt / 2, kb = wt % 2, row = wg * kGroupRows + r;
      const uint8_t* t = stile + cur_slot * kSubTileBytes + (reinterpret_cast<uintptr_t>(src) & 15) +
                         r * kChunkBytes;
      const float scale = *reinterpret_cast<const float*>(t + kHeadDim);
      const bool valid = row < cnt;
      const uint32_t flip = scale < 0.0f ? kByteTops : 0u;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(t + 64 * kb);
      uint8_t* dst = atile + kb * kGroupRows * kSwizzleBlock + r * kSwizzleBlock;
      bool bad = !isfinite(scale);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = i ^ (kb << 2);  // the two K-block halves of a row hit different banks
        const uint32_t w0 = valid ? words[2 * c] : 0u, w1 = valid ? words[2 * c + 1] : 0u;
        bad |= ((nan_bytes(w0) | nan_bytes(w1)) & kByteTops) != 0;
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
    const int r0 = wg * kGroupRows + warp * 16 + g;  // this thread's rows r0, r0 + 8 of the tile
    RowPairEnd end(p, b, n0, r0, cnt, sscale[r0], sscale[r0 + 8]);
    float acc[64], part[2] = {0.0f, 0.0f};
    for (int l = 0; l < LC; ++l) {
      for (int nt = 0; nt < NT; ++nt) {
        issue_item<TERMS>(acc, atile, smem + l * query_layer_bytes(Hp, TERMS), Hp, nt);
        wgmma_wait<0>();
        head_sum(acc, sw + l * Hp + nt * kHeadTile, tq, part);
      }
      float v[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        v[half] = part[half];
        v[half] += __shfl_xor_sync(0xffffffffu, v[half], 1);
        v[half] += __shfl_xor_sync(0xffffffffu, v[half], 2);
        part[half] = 0.0f;
      }
      end.layer(p, l, v, tq);
    }
    end.write(p, tq);
  }
  publish_bad_chunk(p);
}

}  // namespace

int score_max_layers_per_pass(int H, int terms, bool fp8) {
  if (fp8) return score_fp8_max_layers_per_pass(H);
  const int Hp = padded_heads(H);
  int layers = 0;
  while (smem_layout(Hp, layers + 1, terms).total <= kSmemLimit) ++layers;
  return layers;
}

cudaError_t score_chunks(const ScoreParams& p, int sm_count, cudaStream_t stream, const FusedThreshold* select) {
  if ((p.terms != 1 && p.terms != 2) || (p.fp8 && p.terms != 1)) return cudaErrorInvalidValue;
  if (p.layer_count <= 0 || p.layer_count > score_max_layers_per_pass(p.heads, p.terms, p.fp8))
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(p.keys) % 4 != 0) return cudaErrorMisalignedAddress;
  if (!p.bad_chunk || (p.last_pass && (!p.bad_chunk_out || !p.blocks_done))) return cudaErrorInvalidValue;
  if (select && (!p.fp8 || !p.last_pass || !select->keep || !select->kept_scratch || !select->kept_count))
    return cudaErrorInvalidValue;
  if (p.fp8) return score_chunks_fp8(p, select ? *select : FusedThreshold{}, sm_count, stream);
  const int64_t tiles_per_row = (p.chunks + kTileChunks - 1) / kTileChunks;
  const int64_t units = p.batch * tiles_per_row;
  const int grid = static_cast<int>(std::min<int64_t>(units, sm_count));
  const int smem = smem_layout(padded_heads(p.heads), p.layer_count, p.terms).total;
  const auto kernel = p.terms == 2 ? score_kernel<2> : score_kernel<1>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  return launch_chained(true, kernel, dim3(grid), dim3(kThreads), smem, stream, p, tiles_per_row, units);
}

}  // namespace flashmem::kernels
