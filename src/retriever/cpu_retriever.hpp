// The CPU backend of Retriever: Eigen, tiled over chunks so memory stays O(B*N).
#pragma once
#include <memory>

#include "src/retriever/retriever.hpp"

namespace flashmem {

std::unique_ptr<Retriever> make_cpu_retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options);

}  // namespace flashmem
