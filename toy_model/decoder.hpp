// The toy decoder of SPEC 5: random weights standing in for DeepSeek-V4, whose attention
// reads a fixed memory of N chunks. A keep-mask per row hides chunks from attention (the
// emulation of "not recalled to the GPU"). One interface, a CPU and a CUDA backend.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "src/retriever/retriever.hpp"  // Device

namespace flashmem {

struct ToyDecoderLayer {
  std::vector<float> wq, wk, wv, wo;  // [D, D]
  std::vector<float> mlp_up;          // [2D, D]
  std::vector<float> mlp_down;        // [D, 2D]
  std::vector<float> attn_norm, mlp_norm;  // [D]
};

struct ToyDecoderWeights {
  int64_t hidden = 0, heads = 8, vocab = 512, chunks = 0;  // D, heads, V, N
  std::vector<float> embed;   // [V, D]
  std::vector<float> memory;  // [N, D]
  std::vector<ToyDecoderLayer> layers;
  std::vector<float> final_norm;  // [D]
  std::vector<float> lm_head;     // [V, D]
};

// Names as in fixtures/toy_decoder_small.safetensors; errors name the file and key.
ToyDecoderWeights load_toy_decoder(const std::string& path, int64_t heads = 8);

struct ToyDecoderShape {
  int64_t hidden = 4096, heads = 8, vocab = 512, layers = 2, chunks = 4096;
};
// Seeded random weights (scaled so activations stay O(1) at any D).
ToyDecoderWeights synthetic_toy_decoder(uint64_t seed, const ToyDecoderShape& shape);
// The memory part of synthetic_toy_decoder on its own: [N, D], values pm1 * sqrt(3) (rms 1),
// from its own streams, so a caller may replace weights.memory with structured memory
// (then call validate_toy_decoder) without changing any other weight.
std::vector<float> synthetic_toy_memory(uint64_t seed, int64_t chunks, int64_t hidden);
// Sizes of every tensor against hidden/heads/vocab/chunks; throws Error naming the tensor.
void validate_toy_decoder(const ToyDecoderWeights& weights);

// Result of one decode step for B rows.
struct DecoderStep {
  int64_t batch = 0;
  std::vector<float> hidden;       // [B, D] final hidden state (after final_norm)
  std::vector<float> logits;       // [B, V]
  std::vector<int64_t> next_token;  // [B] argmax (lowest index on ties)
  // When asked for: attention probabilities [layers, B, heads, N] (0 on masked chunks).
  std::vector<float> attention;
  std::vector<int64_t> empty_rows;  // rows whose keep-set was empty in some layer (counted, no NaN)
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual const char* backend() const = 0;
  virtual const ToyDecoderWeights& weights() const = 0;
  // tokens [B]; keep [B, N] (1 = chunk visible) or empty for dense attention. The step is a
  // pure function of (token, keep-row) per row: rows are independent, so sparse rows and
  // dense-shadow rows can share one call. Memory keys/values are computed at construction.
  virtual DecoderStep step(std::span<const int64_t> tokens, std::span<const uint8_t> keep, bool with_attention) = 0;
};

std::unique_ptr<Decoder> make_decoder(Device device, std::shared_ptr<const ToyDecoderWeights> weights);

}  // namespace flashmem
