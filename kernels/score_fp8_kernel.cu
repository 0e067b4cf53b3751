// Fast mode's scoring kernel (SPEC 4 with e4m3 queries): [B, N, 132] fp8 keys x per-layer
// queries [H, 128] -> [B, N] ensembled sigmoid scores. CPU reference: the CPU backend's
// score_tiles (src/retriever/cpu_retriever.cpp); exact mode is score_kernel.cu.
//
//   logit[l, b, n] = sum_h relu(s_bn * (q[b, l, h, :] . k8[b, n, :])) * w[b, l, h]
//
// Chunks are M, heads N, the 128 key dims K: wgmma m64n128k32 e4m3 x e4m3 -> f16 with the keys
// as the register operand A and the layer's queries ([Hp][128 bytes], 128-byte swizzle) as B in
// shared memory; then the head sum on the CUDA cores, relu and fma on f16 pairs of the
// accumulators (two packed instructions per two heads).
//
// A block is one producer warpgroup and four consumer warpgroups (warp specialisation):
// - the producer's thread 0 moves each 64-chunk unit's raw rows (132 bytes each, as the caller
//   stores them) into a ring of kStages slots with one bulk copy (cp.async.bulk, the TMA engine)
//   that signals the slot's `full` mbarrier; the whole warpgroup stages the row's queries (one
//   bulk copy) and builds the f16 head-weight tiles once;
// - consumer c takes units c, c + 4, ...: it reads its key fragments straight from the raw slot
//   into registers, releases the slot (`empty`), and runs every (layer, head tile) item: the
//   scoring wgmma, its head sum, the next item's scoring; then it leaves the unit's head sums
//   (each quad thread's share of every layer, and the rows' |scale|) in a sum slot (`sums_full`);
// - the producer's warps 1-3 finish the units in turn (a warp a unit, two rows a thread): the
//   layer logits, sigmoid and the max/mean ensemble, the scores (and per-layer logits on
//   request; with a fused threshold selection, FusedThreshold, the keep bytes and per-row
//   counts), and the key check: a row whose score is NaN or whose scale is not finite is flagged
//   as a bad chunk. Only those outputs reach device memory. The consumers' own finish (a quad
//   reduce-scatter, sigmoids, ensemble shuffles: chains of shuffle and MUFU latency) held the
//   tensor pipe idle; handed off, B 1 N 1M went 0.197-0.200 -> 0.195-0.198 ms and B 8 N 1M
//   0.815 -> 0.79 (session 12).
//
// NOTES:
// - The key check costs no pass of its own: an e4m3 NaN byte makes every head's dot product of
//   its row NaN, which the head sum carries (max.NaN keeps a NaN where relu's max would drop it;
//   NaN * 0 is NaN, so padded heads and zero scales carry it too) into every layer's logit and
//   the ensemble (max.NaN: fmaxf would drop it); no finite input reaches inf or NaN (the range
//   bound below). Two producer warps that read every row of the ring for NaN bytes instead cost
//   ~2 us at B 1, N 1M and 4 % at B 8 (session 12).
// - No relayout of the keys: the K order of the matmul is a permutation of the key bytes,
//   chosen so that thread tq of a quad holds the 32 contiguous bytes tq*32 .. tq*32+31 of its
//   rows (words j = 2 kk + hh feed k-step kk, register half hh of the A fragment); the query
//   finish writes the queries in the same order (query_finish.cuh). Rows are 33 words apart,
//   so the 32 lanes' loads (rows g, words 8 tq + j) fall in 32 different banks.
// - The bulk copy moves the 16-byte-aligned window around a unit's bytes (up to 12 bytes more
//   on each side; those lie in the same 16-byte segment as key bytes, so on the same page), and
//   the consumer finds row 0 at src % 16 in the slot; any N and any 4-byte-aligned keys work.
// - The chunk scale is applied after the dot product: relu(s*d) = |s| * relu(sign(s)*d); the
//   fragments of a row with a negative scale get their sign bits flipped (skipped by the warp
//   when no row of it has one). Per-head 2^-e_h is folded into w (exact power-of-two scaling).
// - f16 cannot overflow: the query finish scales each head so that sum |q| < 8 (+1/16 for the
//   e4m3 rounding), so every partial dot product with e4m3 keys (|k| <= 448) stays below 2^12;
//   the head weights are w / P_l with P_l the power of two above the layer's max |w|, so a chain
//   of 8 relu * w terms stays below 2^15. Each chain ends in f32 (the quad and layer sums).
// - Why f16 accumulators and a CUDA-core head sum (session 11): the earlier design (f32
//   accumulators, relu packed to bf16, the head sum as 8 wgmma m64n8k16 an item, 3 consumers)
//   spent ~50 us at N 1M on those tiny wgmma, which hold the tensor pipe far beyond their FLOPs;
//   its every variant (bench/RESULTS.md, sessions 3-10) stayed at 0.21 ms. With f16
//   accumulators an item is 32 accumulator registers, so the head sum is 64 packed ALU/FMA
//   instructions a thread and four consumers fit (96 registers): a microbenchmark of the chain
//   runs at the tensor pipe's peak, and fast B 1 N 1M went from 0.212-0.215 to 0.201-0.207 ms.
//   Tried with it and not kept (within the spread): 2, 4 or 8 chains a row; 8 or 16 ring slots;
//   the next unit's first scoring issued before the unit's finish; the head weights staged by
//   one batch of loads; setmaxnreg (the 96 registers fit every warp).
// - A grid row per batch row (gridDim.y = B, blockIdx.x splits the row's units), so a block's
//   queries are staged once.
#include <algorithm>

#include "kernels/pdl.cuh"
#include "kernels/score_common.cuh"

namespace flashmem::kernels {

namespace {

constexpr int kConsumers = 4, kThreads = (1 + kConsumers) * 128;
constexpr int kStages = 12;                                  // raw units in the ring
constexpr int kSlotBytes = kGroupRows * kChunkBytes + 16;     // a unit's 16-byte-aligned window
constexpr int kHeadWeightBytes = kHeadTile * 2;               // a (layer, head tile)'s f16 weights
// Units' head sums on their way to the finishers. The producer frees a unit's sum slot (waits for
// the finisher of the unit kSumSlots earlier) before it moves the unit's keys, so a consumer that
// has the keys has the slot: at least a ring and a round of consumers, or it would stall the ring.
constexpr int kSumSlots = 16;
static_assert(kSumSlots >= kStages + kConsumers, "sum slots free ahead of the ring");
constexpr int kFinishers = 3;                                 // producer warps that finish the units, in turn
static_assert(kSlotBytes % 16 == 0, "bulk copies move multiples of 16 bytes to 16-byte-aligned slots");
static_assert(kConsumers < kStages, "a consumer's next slot is at most one lap ahead");

struct SmemLayout {
  int w, w_scale, ring, sums, bars, total;  // the queries at 0; offsets from the 1024-aligned base
};
// A sum slot: [64 rows][layers][4 quad threads] f32 head sums, then the rows' |scale|.
constexpr int sum_slot_floats(int layers) { return kGroupRows * (layers * 4 + 1); }
constexpr SmemLayout smem_layout(int Hp, int layers) {
  SmemLayout s{};
  s.w = layers * Hp * kHeadDim;  // a multiple of 1024 (Hp % 128 == 0)
  s.w_scale = s.w + layers * (Hp / kHeadTile) * kHeadWeightBytes;
  s.ring = s.w_scale + (layers * 4 + 15) / 16 * 16;
  s.sums = s.ring + kStages * kSlotBytes;
  s.bars = s.sums + kSumSlots * sum_slot_floats(layers) * 4;
  s.total = s.bars + (2 * kStages + 1 + 2 * kSumSlots) * 8 + 1024;  // +1024: the base is aligned up to 1024
  return s;
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Adds bytes to the transaction count of the barrier's current phase (no arrival).
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
// Returns once the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// Bulk copy (TMA) of bytes (a multiple of 16) from 16-byte-aligned global src to shared dst;
// completes as transactions on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
// d (+)= A[64 x 32] * B[32 x 128]^T, e4m3 x e4m3 -> f16: A from registers (a0..a3 of this
// thread, the m64nNk32 8-bit fragment), B K-major in shared memory. d[m] holds the f16 pair of
// row r0 + 8 (m % 2), columns 8 (m / 2) + 2 tq and the next (the f32 layout's pairs, packed).
__device__ __forceinline__ void wgmma_m64n128k32_e4m3_f16_rs(uint32_t (&d)[32], const uint32_t (&a)[4], uint64_t b,
                                                             bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f16.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]),
        "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]),
        "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),
        "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(static_cast<int>(accumulate)));
}

// relu(x) * w + c on f16 pairs; a NaN x gives NaN (the key check).
__device__ __forceinline__ uint32_t relu_fma_f16x2(uint32_t x, uint32_t w, uint32_t c) {
  uint32_t r;
  asm("{\n.reg .b32 m;\nmax.NaN.f16x2 m, %1, %4;\nfma.rn.f16x2 %0, m, %2, %3;\n}\n" : "=r"(r) : "r"(x), "r"(w), "r"(c), "r"(0u));
  return r;
}
// max that keeps a NaN (fmaxf drops it): the ensemble of a NaN row stays NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float f16x2_sum(uint32_t x) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&x));
  return f.x + f.y;
}

// The consumers' head weights, from w (LC x Hp f32): per layer l a power of two P_l >= max_h
// |w[l, h]| (scale[l]) and w / P_l rounded to f16 (|w / P_l| <= 1: the head sums stay in f16's
// range). Tile (l, nt) holds, at word (j4 * 4 + tq) * 4 + e, the f16 pair of heads nt * 128 +
// 8 j + 2 tq and the next, j = 4 j4 + e: thread tq of a quad reads its 16 words with 4 16-byte
// loads that its warp's 4 distinct quad lanes make 64 contiguous bytes. Called by the producer
// warpgroup (t < 128), which holds named barrier 1 meanwhile; w is the kernel before's output
// (L2 loads).
__device__ __forceinline__ void build_head_weights(const float* __restrict__ w, int LC, int Hp, uint32_t* tiles,
                                                   float* scale, int t) {
  for (int l = t / 32; l < LC; l += 4) {  // a warp a layer
    float m = 0.0f;
    for (int h = t % 32; h < Hp; h += 32) m = fmaxf(m, fabsf(__ldcg(w + l * Hp + h)));
    const unsigned bits = __reduce_max_sync(0xffffffffu, __float_as_uint(m));  // non-negative: ordered as integers
    int ex = 0;
    frexpf(__uint_as_float(bits), &ex);  // max < 2^ex (ex = 0 for max 0)
    if (t % 32 == 0) scale[l] = ldexpf(1.0f, ex);
  }
  asm volatile("bar.sync 1, 128;\n" ::: "memory");
  const int NT = Hp / kHeadTile, words = LC * NT * (kHeadWeightBytes / 4);
  for (int u = t; u < words; u += 128) {
    const int tile = u / 64, j4 = u % 64 / 16, tq = u % 16 / 4, e = u % 4;
    const int l = tile / NT, h = tile % NT * kHeadTile + 8 * (4 * j4 + e) + 2 * tq;
    const float inv = 1.0f / scale[l];  // a power of two: exact
    const __half2 pair = __floats2half2_rn(__ldcg(w + l * Hp + h) * inv, __ldcg(w + l * Hp + h + 1) * inv);
    tiles[u] = *reinterpret_cast<const uint32_t*>(&pair);
  }
}

// Fast mode's sigmoid: ex2.approx and rcp.approx (a few ulp, far below the e4m3 rounding of the
// queries).
__device__ __forceinline__ float sigmoid_approx(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// Issues (without waiting) the scoring of one (layer, head tile) item: 4 k-steps of 32 bytes
// inside the 128-byte K block of the item's queries (descriptor dq).
__device__ __forceinline__ void issue_scoring(uint32_t (&d)[32], const uint32_t (&a)[4][4], uint64_t dq) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_m64n128k32_e4m3_f16_rs(d, a[kk], desc_add(dq, kk * 32), kk > 0);
  wgmma_commit();
}

// A position in the ring: slot s of lap parity `lap` (the parity its full/empty barriers
// complete with); advanced by fewer than kStages units at a time.
struct RingSlot {
  int s = 0;
  uint32_t lap = 0;
  __device__ __forceinline__ void advance(int units) {
    s += units;
    if (s >= kStages) s -= kStages, lap ^= 1;
  }
};

// Contract: see ScoreParams. Grid (G, B): block (x, b) scores the units [x*U/G, (x+1)*U/G) of
// row b, U = ceil(N / 64). kThreads threads, one block an SM. kHeadTiles: the padded heads' tile
// count when fixed at compile time (0: from p at run time). One tile (up to 128 heads, the
// released shape) drops the head-tile loop and its address arithmetic from every item: B 8 N 1M
// 0.835 -> 0.819 ms (session 12). Fixing the layer count too spilled and gained nothing more.
template <int kHeadTiles>
__global__ void __launch_bounds__(kThreads, 1) score_fp8_kernel(const ScoreParams p, int64_t units_per_row,
                                                                   const FusedThreshold sel) {
  allow_dependents();
  extern __shared__ uint8_t smem_raw[];
  // Aligned up to 1024 by pointer arithmetic on smem_raw, so every access stays LDS/STS.
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const int Hp = kHeadTiles ? kHeadTiles * kHeadTile : padded_heads(p.heads), NT = Hp / kHeadTile;
  const int LC = p.layer_count;
  const SmemLayout L = smem_layout(Hp, LC);
  uint8_t* ring = smem + L.ring;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L.bars);
  uint64_t* empty = full + kStages;
  uint64_t* qfull = empty + kStages;
  uint64_t* sums_full = qfull + 1;
  uint64_t* sums_empty = sums_full + kSumSlots;
  // Sum slot s (see sum_slot_floats): row r's 4 quad sums of layer l, and row r's |scale|.
  float* sums = reinterpret_cast<float*>(smem + L.sums);
  const auto quad_sums = [&](int s, int r, int l) { return sums + s * sum_slot_floats(LC) + (r * LC + l) * 4; };
  const auto row_scale = [&](int s, int r) { return sums + s * sum_slot_floats(LC) + kGroupRows * LC * 4 + r; };
  const int64_t N = p.chunks, b = blockIdx.y;
  const int64_t t_begin = blockIdx.x * units_per_row / gridDim.x;
  const int count = static_cast<int>((blockIdx.x + 1) * units_per_row / gridDim.x - t_begin);
  // Unit i of this block: chunks n0 = (t_begin + i) * 64 .. + rows of row b.
  const auto unit_n0 = [&](int i) { return (t_begin + i) * kGroupRows; };
  const auto unit_src = [&](int i) { return p.keys + (b * N + unit_n0(i)) * kChunkBytes; };
  const auto unit_rows = [&](int i) { return static_cast<int>(N - unit_n0(i) < kGroupRows ? N - unit_n0(i) : kGroupRows); };
  // Row 0 of a unit in ring slot s: the slot holds the 16-byte-aligned window around its rows,
  // which start at the same offset in every unit of the block (a unit is 64 x 132 = 528 x 16 bytes).
  static_assert(kGroupRows * kChunkBytes % 16 == 0, "units keep their rows' 16-byte offset");
  const int row0_offset = static_cast<int>(reinterpret_cast<uintptr_t>(unit_src(0)) & 15);
  const auto slot_rows = [&](int s) { return ring + s * kSlotBytes + row0_offset; };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);   // the producer's arrive (with the copy's bytes)
      mbar_init(&empty[s], 4);  // one arrive per warp of the consumer
    }
    mbar_init(qfull, 128);  // the producer warpgroup, after the head weights
    for (int s = 0; s < kSumSlots; ++s) {
      mbar_init(&sums_full[s], 4);            // one arrive per warp of the consumer
      mbar_init(&sums_empty[s], 1);           // the unit's finisher warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_async_shared();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    const int t = threadIdx.x;
    int i = 0;
    RingSlot at;  // unit i's
    const auto issue = [&] {  // unit i into its slot
      const uintptr_t src = reinterpret_cast<uintptr_t>(unit_src(i));
      const uintptr_t lo = src & ~uintptr_t{15}, hi = (src + unit_rows(i) * kChunkBytes + 15) & ~uintptr_t{15};
      mbar_arrive_expect_tx(&full[at.s], static_cast<uint32_t>(hi - lo));
      bulk_copy(ring + at.s * kSlotBytes, reinterpret_cast<const void*>(lo), static_cast<uint32_t>(hi - lo), &full[at.s]);
      ++i;
      at.advance(1);
    };
    // The first lap of keys is in flight before the grid wait (keys are the caller's).
    if (t == 0)
      while (i < min(count, kStages)) issue();
    grid_dependency_wait();  // the queries and head weights come from the kernel before
    const int64_t row_layer = b * p.total_layers + p.layer0;
    if (t == 0) {
      const uint32_t q_bytes = static_cast<uint32_t>(LC * Hp * kHeadDim);
      mbar_expect_tx(qfull, q_bytes);
      bulk_copy(smem, static_cast<const uint8_t*>(p.qfrag) + row_layer * Hp * kHeadDim, q_bytes, qfull);
    }
    build_head_weights(p.w_scaled + row_layer * Hp, LC, Hp, reinterpret_cast<uint32_t*>(smem + L.w),
                       reinterpret_cast<float*>(smem + L.w_scale), t);
    mbar_arrive(qfull);
    if (t == 0)
      while (i < count) {
        mbar_wait(&empty[at.s], at.lap ^ 1);  // the consumer of the slot's previous unit is done with it
        mbar_wait(&sums_empty[i % kSumSlots], ((i / kSumSlots) & 1) ^ 1);  // and its sum slot's finisher
        issue();
      }
    if (t >= 32) {  // the finishers: warp 1 + f finishes units f, f + kFinishers, ..., rows lane and lane + 32
      const int f = t / 32 - 1, lane = t % 32;
      const float* w_scale = reinterpret_cast<const float*>(smem + L.w_scale);
      unsigned kept = 0;
      for (int u = f; u < count; u += kFinishers) {
        const int s = u % kSumSlots;
        mbar_wait(&sums_full[s], (u / kSumSlots) & 1);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = lane + 32 * half;
          if (r >= unit_rows(u)) continue;
          const float sc = *row_scale(s, r);
          const int64_t at_n = b * N + unit_n0(u) + r;
          float ens = p.first_pass ? 0.0f : p.scores[at_n];
#pragma unroll 4
          for (int l = 0; l < LC; ++l) {
            const float4 q = *reinterpret_cast<const float4*>(quad_sums(s, r, l));
            const float logit = (q.x + q.y + q.z + q.w) * w_scale[l] * sc;
            if (p.layer_logits) p.layer_logits[(p.layer0 + l) * p.batch * N + at_n] = logit;
            const float sg = sigmoid_approx(logit);
            ens = p.ensemble_mean ? ens + sg : (p.first_pass && l == 0) ? sg : max_nan(ens, sg);
          }
          if (p.last_pass && p.ensemble_mean) ens = __fdiv_rn(ens, static_cast<float>(p.total_layers));
          p.scores[at_n] = ens;
          if (sel.keep && p.last_pass) {
            sel.keep[at_n] = ens > sel.threshold;
            kept += ens > sel.threshold;
          }
          // The key check: a NaN score (see NOTES) or a non-finite scale.
          if (isnan(ens) || !isfinite(sc)) atomicMin(p.bad_chunk, static_cast<unsigned long long>(at_n));
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&sums_empty[s]);
      }
      add_kept(p, sel, b, kept);
    }
  } else {
    const int wt = threadIdx.x % 128, warp = wt / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const int r0 = warp * 16 + g;  // this thread's rows r0, r0 + 8 of a unit
    grid_dependency_wait();        // earlier passes' scores
    mbar_wait(qfull, 0);
    RingSlot at;
    at.advance(wg - 1);
    for (int i = wg - 1; i < count; i += kConsumers) {
      mbar_wait(&full[at.s], at.lap);
      // Key fragments: words tq*8 + j of rows r0 (a0, a2) and r0 + 8 (a1, a3), j = 2 kk + hh.
      const uint8_t* raw = slot_rows(at.s);
      const uint32_t* lo_row = reinterpret_cast<const uint32_t*>(raw + r0 * kChunkBytes) + tq * 8;
      const uint32_t* hi_row = reinterpret_cast<const uint32_t*>(raw + (r0 + 8) * kChunkBytes) + tq * 8;
      uint32_t a[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        a[kk][0] = lo_row[2 * kk];
        a[kk][1] = hi_row[2 * kk];
        a[kk][2] = lo_row[2 * kk + 1];
        a[kk][3] = hi_row[2 * kk + 1];
      }
      const float sc_lo = *reinterpret_cast<const float*>(raw + r0 * kChunkBytes + kHeadDim);
      const float sc_hi = *reinterpret_cast<const float*>(raw + (r0 + 8) * kChunkBytes + kHeadDim);
      const uint32_t flip_lo = sc_lo < 0.0f ? kByteTops : 0u, flip_hi = sc_hi < 0.0f ? kByteTops : 0u;
      if (__any_sync(0xffffffffu, (flip_lo | flip_hi) != 0)) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          a[kk][0] ^= flip_lo;
          a[kk][2] ^= flip_lo;
          a[kk][1] ^= flip_hi;
          a[kk][3] ^= flip_hi;
        }
      }

      // Every (layer, head tile) item: the scoring wgmma, then its head sum on the CUDA cores
      // (relu and fma on f16 pairs, 2 chains a row of 8 terms each, summed in f32), then the next
      // item's scoring. Each thread sums 32 of the tile's heads (its part of the layer's logit).
      uint32_t acc[32];
      const auto query = [&](int l, int nt) { return smem_desc(smem + (l * Hp + nt * kHeadTile) * kHeadDim); };
      issue_scoring(acc, a, query(0, 0));
      __syncwarp();  // the wgmma fence above waited for every lane's key words: the slot is free
      if (lane == 0) mbar_arrive(&empty[at.s]);
      at.advance(kConsumers);
      for (int group = 0; group * 4 < LC; ++group) {
        float part[4][2] = {};  // layer 4 group + s's head sums of rows r0, r0 + 8 (this thread's heads)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int l = group * 4 + s;
          if (l >= LC) break;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4* wt = reinterpret_cast<const uint4*>(smem + L.w + (l * NT + nt) * kHeadWeightBytes) + tq;
            uint32_t wv[16];
#pragma unroll
            for (int j4 = 0; j4 < 4; ++j4) *reinterpret_cast<uint4*>(wv + 4 * j4) = wt[4 * j4];
            wgmma_wait<0>();
            uint32_t c[2][2] = {};
#pragma unroll
            for (int j = 0; j < 16; ++j)
#pragma unroll
              for (int half = 0; half < 2; ++half) c[half][j % 2] = relu_fma_f16x2(acc[2 * j + half], wv[j], c[half][j % 2]);
            if (nt + 1 < NT) issue_scoring(acc, a, query(l, nt + 1));
            else if (l + 1 < LC) issue_scoring(acc, a, query(l + 1, 0));
#pragma unroll
            for (int half = 0; half < 2; ++half) part[s][half] += f16x2_sum(c[half][0]) + f16x2_sum(c[half][1]);
          }
        }
        // The quad's head sums go to the finishers (the slot is free: see kSumSlots).
        const int slot = i % kSumSlots;
        if (group == 0 && tq == 0) {
          *row_scale(slot, r0) = fabsf(sc_lo);
          *row_scale(slot, r0 + 8) = fabsf(sc_hi);
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int l = group * 4 + s;
          if (l >= LC) break;
#pragma unroll
          for (int half = 0; half < 2; ++half) quad_sums(slot, r0 + 8 * half, l)[tq] = part[s][half];
        }
      }
      wgmma_wait<0>();  // none in flight (the last item issues no scoring): for ptxas, which cannot tell
      // The key fragments stay allocated until every wgmma that reads them has completed.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int k = 0; k < 4; ++k) asm volatile("" : "+r"(a[kk][k])::"memory");
      __syncwarp();
      if (lane == 0) mbar_arrive(&sums_full[i % kSumSlots]);
    }
  }
  publish_bad_chunk(p, sel);
}

}  // namespace

int score_fp8_max_layers_per_pass(int H) {
  const int Hp = padded_heads(H);
  int layers = 0;
  while (smem_layout(Hp, layers + 1).total <= kSmemLimit) ++layers;
  return layers;
}

cudaError_t score_chunks_fp8(const ScoreParams& p, const FusedThreshold& select, int sm_count, cudaStream_t stream) {
  if (p.chunks <= 0 || p.batch <= 0 || p.batch > 65535) return cudaErrorInvalidValue;
  const int64_t units_per_row = (p.chunks + kGroupRows - 1) / kGroupRows;
  // All blocks in one wave: B rows of G blocks, G * B <= the SM count where B allows.
  const int grid_x = static_cast<int>(std::min<int64_t>(units_per_row, std::max<int64_t>(1, sm_count / p.batch)));
  const int smem = smem_layout(padded_heads(p.heads), p.layer_count).total;
  const auto kernel = padded_heads(p.heads) == kHeadTile ? score_fp8_kernel<1> : score_fp8_kernel<0>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  return launch_chained(true, kernel, dim3(grid_x, static_cast<unsigned>(p.batch)), dim3(kThreads), smem, stream, p,
                        units_per_row, select);
}

}  // namespace flashmem::kernels
