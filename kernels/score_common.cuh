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
