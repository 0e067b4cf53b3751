// Scoring inputs that own their memory: mock ones (as the reference demo builds them) or a
// user's own tensors read from safetensors (hidden, compressed_k, positions).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "src/retriever/retriever.hpp"

namespace flashmem {

struct OwnedScoreInputs {
  int64_t batch = 0, chunks = 0, hidden_dim = 0;
  std::vector<float> hidden;        // [B, D]
  std::vector<uint8_t> keys;        // [B, N, 132]
  std::vector<int64_t> positions;   // [B]

  ScoreInputs view() const;
};

// Standard-normal hidden states, mock keys (compressed_keys.hpp) and every row at the last
// position of a history of N chunks of 4 tokens (4N - 1), from a seed.
OwnedScoreInputs mock_score_inputs(int64_t batch, int64_t chunks, int64_t hidden_dim, uint64_t seed);

// Reads `hidden` [B, D] (F32/BF16/F16), `compressed_k` [B, N, 132] U8 and `positions` [B]
// I64; errors name the file and key and say what was expected.
OwnedScoreInputs load_score_inputs(const std::string& path, int64_t hidden_dim);

}  // namespace flashmem
