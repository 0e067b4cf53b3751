// Device pieces shared by the two scoring kernels (SPEC 4): score_kernel.cu (exact mode and
// fp16 fast scoring: both operands in shared memory, 4 decoupled warpgroups) and
// score_fp8_kernel.cu (fast mode: e4m3 keys as register operands, a producer warpgroup and
// four consumers). Hopper-only (sm_90a): wgmma, mbarriers, bulk copies.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

constexpr int kSmemLimit = 232448;  // sm_90 opt-in dynamic shared memory per block
constexpr int kSwizzleBlock = 128;  // bytes of one row of a 128-byte-swizzled K block
constexpr int kGroupRows = 64;      // wgmma M: chunks a warpgroup scores at once

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Makes this thread's generic-proxy shared-memory writes (st.shared, cp.async) visible to the
// async proxy (wgmma operands, bulk copies).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The top bit of each byte of the result is set where the byte is an e4m3fn NaN (0x7F or 0xFF):
// adding 1 to the low 7 bits carries into bit 7 exactly for 0x7F, and never across bytes.
__device__ __forceinline__ uint32_t nan_bytes(uint32_t w) { return (w & 0x7F7F7F7Fu) + 0x01010101u; }
constexpr uint32_t kByteTops = 0x80808080u;  // the top (e4m3: sign) bit of each of 4 bytes

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return ((smem_u32(p) & 0x3FFFF) >> 4) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
// A descriptor of p + bytes from p's (bytes % 16 == 0): the start address is its low 14 bits in
// 16-byte units and shared memory ends below 2^18, so the sum never carries out of the field.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, int bytes) { return desc + (bytes >> 4); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

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

// Adds a warp's kept counts of batch row b to the grid's (every lane of the warp calls this).
__device__ __forceinline__ void add_kept(const ScoreParams& p, const FusedThreshold& sel, int64_t b, unsigned kept) {
  kept = __reduce_add_sync(0xffffffffu, kept);
  if (sel.keep && p.last_pass && threadIdx.x % 32 == 0 && kept != 0) atomicAdd(sel.kept_scratch + b, kept);
}

// The last block of the grid to finish publishes the bad-chunk flag to the host and re-arms it
// for the next call, and moves the fused selection's counts (every thread of the block calls
// this once, at the end).
__device__ __forceinline__ void publish_bad_chunk(const ScoreParams& p, const FusedThreshold& sel = {}) {
  if (!p.last_pass) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.blocks_done, 1u) == gridDim.x * gridDim.y - 1) {
      __threadfence();
      *p.bad_chunk_out = atomicExch(p.bad_chunk, ~0ull);
      *p.blocks_done = 0;
      if (sel.keep)
        for (int64_t b = 0; b < p.batch; ++b) sel.kept_count[b] = atomicExch(sel.kept_scratch + b, 0u);
      __threadfence_system();
    }
  }
}

// Fast mode's fp8 scoring (score_fp8_kernel.cu), behind score_chunks and
// score_max_layers_per_pass when ScoreParams::fp8; the checks of score_chunks are done.
int score_fp8_max_layers_per_pass(int H);
cudaError_t score_chunks_fp8(const ScoreParams& p, const FusedThreshold& select, int sm_count, cudaStream_t stream);

}  // namespace flashmem::kernels
