// The CUDA backend of Retriever (built only with nvcc; see kernels/ for the kernels).
#pragma once
#include <memory>
#include <string>

#include "src/retriever/retriever.hpp"

namespace flashmem {

// True when the CUDA runtime sees a device; otherwise why_not says why (no driver, no GPU).
bool cuda_device_present(std::string* why_not);

std::unique_ptr<Retriever> make_cuda_retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options);

}  // namespace flashmem
