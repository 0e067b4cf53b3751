// Shared by the toy decoder backends (not part of the public interface).
#pragma once
#include <cmath>
#include <memory>
#include <span>

#include "toy_model/decoder.hpp"

namespace flashmem {

// Checks tokens [B] (0 <= token < V, B >= 1) and keep (empty or [B, N]); throws Error naming
// the argument. Returns B.
int64_t validate_step_inputs(const ToyDecoderWeights& w, std::span<const int64_t> tokens, std::span<const uint8_t> keep);

// Rows whose keep-row has no chunk (never any with dense attention), ascending.
std::vector<int64_t> empty_keep_rows(int64_t batch, int64_t chunks, std::span<const uint8_t> keep);

// GELU, exact erf form: 0.5 x (1 + erf(x / sqrt 2)), float32 as torch computes it.
inline float gelu_erf(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f)); }

std::unique_ptr<Decoder> make_cpu_decoder(std::shared_ptr<const ToyDecoderWeights> weights);
#ifdef FLASHMEM_TOY_CUDA
std::unique_ptr<Decoder> make_cuda_decoder(std::shared_ptr<const ToyDecoderWeights> weights);
#endif

}  // namespace flashmem
