// CUDA kernels of the retriever (SPEC 3-4): raw device pointers and a stream in, a
// cudaError_t out (the launch's error; the caller checks it). No framework types here.
// rmsnorm_rows, finish_queries, project_finish_queries and score_chunks (and gemv when asked)
// are programmatic dependent launches (kernels/pdl.cuh): each may start before the kernel ahead
// of it in the stream ends and waits for it before reading its outputs, so the chain runs
// without gaps.
// The CPU references are src/retriever/query.cpp (query side), the CPU backend's
// score_tiles (scoring) and src/retriever/selection.cpp (selection).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace flashmem::kernels {

constexpr int kHeadDim = 128;
constexpr int kChunkBytes = 132;       // 128 fp8 e4m3fn + float32 scale
constexpr int kHeadTile = 128;         // heads per wgmma (its N)

// Heads are padded to a multiple of kHeadTile (one wgmma N-tile): padded heads have q = 0, w = 0.
__host__ __device__ inline int padded_heads(int H) { return (H + kHeadTile - 1) / kHeadTile * kHeadTile; }

// Query fragments: per row b and layer l, the Hadamard-rotated query scaled per head by a
// power of two 2^e_h (so the largest |value| of the head lies in [2^14, 2^15)) and split into
// `terms` fp16 parts (hi = fp16(q'), lo = fp16(q' - hi)), stored as the scoring kernel's
// shared-memory image of the wgmma B operand: [terms][K block 2][head Hp][64 halves], the
// 16-byte chunk c of head h's 64 dims at position c ^ (h % 8) (128-byte swizzle; see
// score_kernel.cu). The head weight
// fused_w[h] * 2^-e_h is stored beside it in w_scaled [B, L, Hp]. Padded slots must be zero
// (the caller zeroes both buffers when Hp != H).
// fp8 (fast mode): one e4m3 term instead, the head scaled by 2^e_h so that the sum of its
// |values| lies in [4, 8) (the scoring accumulates in f16), stored as [head Hp][128 bytes] in the scoring
// kernel's K order (a permutation of the 32 four-byte words, query_finish.cuh), the 16-byte
// chunk c of head h at position c ^ (h % 8); the keys' e4m3 bytes are the A operand as they are.
inline int64_t query_fragment_bytes(int H, int terms, bool fp8) {
  return static_cast<int64_t>(padded_heads(H)) * 128 * (fp8 ? 1 : 2 * terms);
}

// Small-batch projection for B <= kGemvMaxBatch (gemv_kernel.cu): for z < Z,
// y[z*y_lstride + b*y_bstride + r] = sum_k W[z*w_lstride + r*K + k] * x[z*x_lstride + b*x_bstride + k],
// W fp32 or bf16 (16-byte aligned rows), x and y fp32. Needs K % 4 (fp32) or K % 8 (bf16) == 0
// and x (16-byte aligned), x_bstride, x_lstride multiples of 4. chained: a programmatic dependent
// launch (pdl.cuh) that starts streaming W while the kernel before it, which writes x, finishes.
// rows_done (optional, Z == 1): each row, once its y is written, adds 1 to rows_done[r /
// rows_per_count] with release semantics, for project_finish_queries' x_ready.
constexpr int kGemvMaxBatch = 4;
bool gemv_supported(int B, int K, bool bf16_weights);
cudaError_t gemv(const void* W, bool bf16_weights, int64_t rows, int K, int64_t w_lstride, int Z, const float* x,
                 int64_t x_lstride, int64_t x_bstride, int B, float* y, int64_t y_lstride, int64_t y_bstride,
                 bool chained, cudaStream_t stream, unsigned* rows_done = nullptr, int64_t rows_per_count = 0);

// RMSNorm of the first projection's q part (SPEC 3.2). proj [B, P] row-major with layer l's
// wq_a output at columns l*stride .. l*stride+R; out: [L, B, R] (float or bf16 when out_bf16).
cudaError_t rmsnorm_rows(const float* proj, int64_t P, int64_t stride, const float* q_norm /*[L,R]*/, int L, int B,
                         int R, void* out, bool out_bf16, cudaStream_t stream);

// float32 -> bf16 (round to nearest even), n values.
cudaError_t to_bf16(const float* in, void* out_bf16, int64_t n, cudaStream_t stream);

// The query finish, steps 3.4-3.7 on the second projection's output q (SPEC 3), per layer l
// and row b: fused_raw = proj columns l*stride + R .. + H of proj [B, P] (the first
// projection's output); angles [B, 32, 2] (cos, sin at the clamped positions, computed on the
// host by the CPU's rope_at so both backends use identical values; 16-byte aligned, device
// memory or mapped pinned host memory); head_scale: 128^-0.5 * H^-0.5 (SPEC 3.7). Writes qfrag
// [B, L, query_fragment_bytes(H, terms, fp8)] and w_scaled [B, L, Hp] (terms 1 or 2; fp8
// needs terms 1).
struct QueryFinish {
  const float* proj;
  int64_t P, stride, R;
  const float* angles;
  int L, B, H;
  float head_scale;
  int terms;
  bool fp8;
  void* qfrag;
  float* w_scaled;
};

// The finish on q_raw [L, B, H*128], the cuBLAS projections' output (B > kGemvMaxBatch).
cudaError_t finish_queries(const float* q_raw, const QueryFinish& f, cudaStream_t stream);

// The second projection and the finish as one kernel for f.B <= kGemvMaxBatch (gemv_kernel.cu;
// the same needs as gemv): layer l's q[b] = W_l x_l[b], W_l = W + l*w_lstride [H*128, K],
// x_l[b] = x + l*x_lstride + b*x_bstride, each row summed bitwise as gemv sums it, then finished
// in the kernel (no q_raw in memory). x_norm (optional, [L, K] fp32): each x row is first
// RMS-normalised as rmsnorm_rows does, bitwise the same (where project_finish_normalises(f.B, K);
// x then needs no alignment). A programmatic dependent launch: W streams while the kernel that
// writes x and f.proj finishes. x_ready (optional, with x_norm; [L + 1] counters, zero before the
// first call): layer l's blocks start on x and f.proj once x_ready[l] >= x_ready_count (gemv's
// rows_done) instead of when the kernel before ends, whose grid-completion handoff costs
// microseconds; the kernel re-arms the counters to zero.
bool project_finish_normalises(int B, int K);  // B normalised rows of K fit its shared memory
cudaError_t project_finish_queries(const void* W, bool bf16_weights, int K, int64_t w_lstride, const float* x,
                                   int64_t x_lstride, int64_t x_bstride, const float* x_norm, const QueryFinish& f,
                                   cudaStream_t stream, unsigned* x_ready = nullptr, unsigned x_ready_count = 0);

// Scoring (SPEC 4): keys [B, N, 132] device, 4-byte aligned. Layers [layer0, layer0+count) of
// qfrag/w_scaled. Per chunk: logit_l = sum_h relu(q_lh . k) * w_lh, score = ensemble of
// sigmoid(logit_l) over layers (max, or sum to be divided by total_layers on the last pass).
// first_pass: overwrite scores; else combine with what an earlier pass wrote.
// layer_logits (optional, [L_total, B, N]) receives the logits of these layers.
// bad_chunk: atomicMin of the flat index b*N+n of any chunk with an fp8 NaN byte or a
// non-finite scale (initialise to UINT64_MAX once). On the last pass the grid's last block
// moves it to *bad_chunk_out (pinned host memory: no copy after the kernel) and re-arms it
// to UINT64_MAX; blocks_done (initialise to 0 once) counts the finished blocks and is reset.
struct ScoreParams {
  const uint8_t* keys;
  const void* qfrag;
  const float* w_scaled;
  int64_t batch, chunks;
  int total_layers, layer0, layer_count, terms, heads;  // heads: H (padded inside)
  bool fp8;                                             // e4m3 queries (terms 1), wgmma k32 e4m3
  bool ensemble_mean, first_pass, last_pass;
  float* scores;
  float* layer_logits;
  unsigned long long* bad_chunk;
  unsigned long long* bad_chunk_out;
  unsigned* blocks_done;
};
// The threshold selection fused into the last pass of fp8 scoring (score_chunks' `select`), as
// select_threshold computes it: keep[b, n] = score > threshold, kept_count[b] = kept in row b;
// kept_scratch [B] (zero before the first call) collects the blocks' counts, and the grid's last
// block moves them to kept_count and leaves the scratch zero again. No pass over the scores of
// its own. (Not in ScoreParams: any change to those makes ptxas schedule the exact kernel
// differently, and one such change measured 12 % slower.)
struct FusedThreshold {
  uint8_t* keep;
  float threshold;
  unsigned* kept_scratch;
  long long* kept_count;
};
int score_max_layers_per_pass(int H, int terms, bool fp8);  // 0: H too large for shared memory
cudaError_t score_chunks(const ScoreParams& p, int sm_count, cudaStream_t stream, const FusedThreshold* select = nullptr);

// Threshold selection: keep[i] = scores[i] > t; count[b] = kept in row b (int64), in one
// launch. scratch: threshold_scratch_bytes(B, N) bytes, zero before the first call (the kernel
// leaves all it used zero again, so calls with any B and N can share one zeroed buffer).
size_t threshold_scratch_bytes(int64_t B, int64_t N);
cudaError_t select_threshold(const float* scores, int64_t B, int64_t N, float t, uint8_t* keep, long long* count,
                             void* scratch, cudaStream_t stream);

// Top-k: bytes of scratch needed for rows of N chunks.
size_t topk_scratch_bytes(int64_t N);
// keep [B, N] (zeroed here), top [B, k] int64 indices (highest first, ties: lower index),
// count[b] = min(k, N).
cudaError_t select_topk(const float* scores, int64_t B, int64_t N, int64_t k, void* scratch, size_t scratch_bytes,
                        uint8_t* keep, int64_t* top, long long* count, cudaStream_t stream);

}  // namespace flashmem::kernels
