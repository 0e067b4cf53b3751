// Retriever checkpoint: per layer wq_a [R, D], q_norm_weight [R], wq_b [H*128, R],
// weights_proj [H, D] (SPEC 2), widened to float32, row-major, layers in call order.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "src/formats/safetensors.hpp"

namespace flashmem {

struct RetrieverLayer {
  std::string name;             // "l10", ...
  std::vector<float> wq_a;      // [rank, hidden]
  std::vector<float> q_norm;    // [rank]
  std::vector<float> wq_b;      // [heads * 128, rank]
  std::vector<float> weights_proj;  // [heads, hidden]
};

struct RetrieverWeights {
  int64_t hidden = 0, rank = 0, heads = 0;  // D, R, H; every layer shares them
  std::vector<RetrieverLayer> layers;

  size_t parameter_bytes() const;  // float32 bytes of all weights (what one pass must read)
};

// Loads "retrievers.<layer>.<name>" tensors (F32/BF16/F16). Layers: all in string-sorted
// order, or exactly `layer_names` in that order. Errors name the file and key.
RetrieverWeights load_retriever(const std::string& path, const std::vector<std::string>& layer_names = {});

// Writes a checkpoint in the same format (F32 or BF16), atomically.
void save_retriever(const RetrieverWeights& weights, const std::string& path, DType dtype = DType::F32);

}  // namespace flashmem
