// Selection on the device (SPEC 4). CPU reference: src/retriever/selection.cpp.
// Threshold: keep = score > t (strict) and a per-row count. Top-k: a stable descending CUB
// radix sort of (score, index) per row, so equal scores keep the lower index first, exactly
// the CPU's order; then the first min(k, N) indices are written and scattered into keep.
#include <cub/device/device_radix_sort.cuh>

#include "kernels/retriever_kernels.hpp"

namespace flashmem::kernels {

namespace {

constexpr int kThreads = 256;

// Contract: scores [B, N]; keep [B, N] = scores > t; count[b] = kept in row b. One launch: each
// block writes its row-part count to partial[b, blockIdx.x], and the row's last block to finish
// (ticket[b], 0 on entry) sums them in block order and writes count[b]. It leaves the ticket and
// the partials zero again, so the next call finds zeros wherever its B and N place them.
// Grid (ceil(N / (256*8)) capped, B).
__global__ void __launch_bounds__(kThreads) threshold_kernel(const float* __restrict__ scores, int64_t N, float t,
                                                             uint8_t* __restrict__ keep, long long* count,
                                                             int* partial, unsigned* ticket) {
  const int64_t b = blockIdx.y;
  int kept = 0;
  for (int64_t n = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * kThreads) {
    const bool k = scores[b * N + n] > t;
    keep[b * N + n] = k;
    kept += k;
  }
  __shared__ int warp_sums[kThreads / 32];
  __shared__ bool last;
  const auto block_sum = [&](int v) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    __syncthreads();
    return total;
  };
  const int total = block_sum(kept);
  if (threadIdx.x == 0) {
    partial[b * gridDim.x + blockIdx.x] = total;
    __threadfence();
    last = atomicAdd(ticket + b, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  long long sum = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += kThreads) {
    sum += *static_cast<volatile int*>(partial + b * gridDim.x + i);
    partial[b * gridDim.x + i] = 0;
  }
  const int row = block_sum(static_cast<int>(sum));  // a row has at most 2^31 - 1 chunks
  if (threadIdx.x == 0) {
    count[b] = row;
    ticket[b] = 0;
  }
}

__global__ void iota_kernel(int* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<int>(i);
}

// Contract: sorted_idx [N] of row b; top[b, :k] = sorted_idx[:k]; keep[b, idx] = 1.
__global__ void scatter_topk_kernel(const int* __restrict__ sorted_idx, int64_t N, int64_t k, int64_t b,
                                    int64_t* __restrict__ top, uint8_t* __restrict__ keep, long long* count) {
  if (blockIdx.x == 0 && threadIdx.x == 0) count[b] = k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int idx = sorted_idx[i];
    top[b * k + i] = idx;
    keep[b * N + idx] = 1;
  }
}

struct TopkScratch {
  float* keys_out;
  int *vals_in, *vals_out;
  void* temp;
  size_t temp_bytes;
};

size_t align256(size_t x) { return (x + 255) / 256 * 256; }

size_t cub_temp_bytes(int64_t N) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairsDescending(nullptr, bytes, static_cast<const float*>(nullptr),
                                            static_cast<float*>(nullptr), static_cast<const int*>(nullptr),
                                            static_cast<int*>(nullptr), static_cast<int>(N));
  return bytes;
}

TopkScratch carve(void* scratch, int64_t N) {
  uint8_t* p = static_cast<uint8_t*>(scratch);
  TopkScratch s{};
  s.keys_out = reinterpret_cast<float*>(p);
  p += align256(N * sizeof(float));
  s.vals_in = reinterpret_cast<int*>(p);
  p += align256(N * sizeof(int));
  s.vals_out = reinterpret_cast<int*>(p);
  p += align256(N * sizeof(int));
  s.temp = p;
  s.temp_bytes = cub_temp_bytes(N);
  return s;
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)); }

}  // namespace

int64_t threshold_blocks(int64_t N) { return std::min<int64_t>((N + kThreads * 8 - 1) / (kThreads * 8), 65535); }

size_t threshold_scratch_bytes(int64_t B, int64_t N) { return static_cast<size_t>(B) * (threshold_blocks(N) + 1) * 4; }

cudaError_t select_threshold(const float* scores, int64_t B, int64_t N, float t, uint8_t* keep, long long* count,
                             void* scratch, cudaStream_t stream) {
  const int64_t blocks = threshold_blocks(N);
  unsigned* ticket = static_cast<unsigned*>(scratch);
  int* partial = reinterpret_cast<int*>(ticket + B);
  threshold_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(B)), kThreads, 0, stream>>>(
      scores, N, t, keep, count, partial, ticket);
  return cudaGetLastError();
}

size_t topk_scratch_bytes(int64_t N) { return 3 * align256(N * 4) + align256(cub_temp_bytes(N)); }

cudaError_t select_topk(const float* scores, int64_t B, int64_t N, int64_t k, void* scratch, size_t scratch_bytes,
                        uint8_t* keep, int64_t* top, long long* count, cudaStream_t stream) {
  if (scratch_bytes < topk_scratch_bytes(N) || N > INT32_MAX) return cudaErrorInvalidValue;
  k = std::min(k, N);
  TopkScratch s = carve(scratch, N);
  cudaError_t err = cudaMemsetAsync(keep, 0, B * N, stream);
  if (err != cudaSuccess) return err;
  iota_kernel<<<blocks_for(N), kThreads, 0, stream>>>(s.vals_in, N);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  for (int64_t b = 0; b < B; ++b) {
    size_t temp_bytes = s.temp_bytes;
    err = cub::DeviceRadixSort::SortPairsDescending(s.temp, temp_bytes, scores + b * N, s.keys_out, s.vals_in,
                                                    s.vals_out, static_cast<int>(N), 0, 32, stream);
    if (err != cudaSuccess) return err;
    scatter_topk_kernel<<<blocks_for(k), kThreads, 0, stream>>>(s.vals_out, N, k, b, top, keep, count);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace flashmem::kernels
