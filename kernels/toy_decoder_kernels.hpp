// CUDA kernels of the toy decoder (SPEC 5): raw device pointers and a stream in, a
// cudaError_t out (the launch's error; the caller checks it). No framework types here.
// CPU references: toy_model/cpu_decoder.cpp (the whole step) and the per-kernel references
// in tests/test_toy_decoder_cuda.cpp. Layouts are row-major; D = heads * head_size.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace flashmem::kernels::toy {

// ---- memory attention (memattn.cu) ------------------------------------------------------

// Per row b: idx[b, 0..count[b]) = the indices n with keep[b, n] != 0, ascending.
// keep [B, N] u8, idx [B, N] int32, count [B] int32. One block per row.
cudaError_t compact_keep(const uint8_t* keep, int B, int N, int32_t* idx, int32_t* count, cudaStream_t stream);

// Split-K plan: chunks (of the compacted list) are cut into splits of split_len; a block
// handles one (split, head, row). Splits past a row's count do nothing.
struct MemAttnPlan {
  int split_len = 0, max_splits = 0;
};
MemAttnPlan memattn_plan(int N);
// Floats of workspace memattn needs: partial (m, l, acc[hs]) per (row, head, split) + stats.
size_t memattn_workspace_floats(const MemAttnPlan& plan, int B, int heads, int head_size);

struct MemAttnParams {
  const float* q;       // [B, D] queries (after wq)
  const float* keys;    // [N, D] wk * memory
  const float* values;  // [N, D] wv * memory
  const int32_t* idx;   // [B, N] compacted kept indices, or null = dense (every chunk kept)
  const int32_t* count; // [B] kept count per row, or null = dense
  int B, N, heads, head_size;
  MemAttnPlan plan;
  float* workspace;     // memattn_workspace_floats(...)
  float* out;           // [B, D] softmax(q.k / sqrt(hs)) . v per head; 0 for an empty row
  float* probs;         // optional [B, heads, N]: probabilities, 0 on masked chunks (the
                        // caller zeroes it first: only kept entries are written)
};
// Reads only kept chunks' keys and values (each once per row). head_size <= 1024.
cudaError_t memattn(const MemAttnParams& p, cudaStream_t stream);

// ---- element-wise and row kernels (decoder_ops.cu) --------------------------------------

// x[b, :] = embed[tokens[b], :]; tokens already validated (0 <= t < V).
cudaError_t embed_rows(const float* embed, const int64_t* tokens, int B, int D, float* x, cudaStream_t stream);
// out[b] = x[b] * rsqrt(mean(x[b]^2) + 1e-6) * w; mean accumulated in double (as the CPU).
cudaError_t rmsnorm_rows(const float* x, const float* w, int B, int D, float* out, cudaStream_t stream);
// u = 0.5 u (1 + erf(u / sqrt 2)), n values, in place.
cudaError_t gelu_inplace(float* u, int64_t n, cudaStream_t stream);
// next[b] = argmax of logits[b, 0..V) (lowest index among equal maxima).
cudaError_t argmax_rows(const float* logits, int B, int V, int64_t* next, cudaStream_t stream);

// y[b, :] = W x[b] + beta y[b] for B <= kSkinnyMaxRows rows (the decode step's GEMV): W
// [out, in] row-major, in % 4 == 0, 16-byte aligned rows; each weight row is read once.
constexpr int kSkinnyMaxRows = 4;
cudaError_t skinny_linear(const float* W, int out, int in, const float* x, int B, float* y, float beta, cudaStream_t stream);

}  // namespace flashmem::kernels::toy
