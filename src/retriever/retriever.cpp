#include "src/retriever/retriever.hpp"

#include <cmath>

#include "src/common/error.hpp"
#include "src/retriever/cpu_retriever.hpp"
#ifdef FLASHMEM_HAVE_CUDA
#include "src/retriever/cuda_retriever.hpp"
#endif

namespace flashmem {

const char* device_name(Device d) { return d == Device::Cpu ? "cpu" : "cuda"; }

Device parse_device(const std::string& text, const std::string& field) {
  if (text == "cpu") return Device::Cpu;
  if (text == "cuda") return Device::Cuda;
  fail(field, ": '", text, "' is not a device, expected cpu or cuda");
}

Precision parse_precision(const std::string& text, const std::string& field) {
  if (text == "exact") return Precision::Exact;
  if (text == "fast") return Precision::Fast;
  fail(field, ": '", text, "' is not a precision, expected exact or fast");
}

bool cuda_available(std::string* why_not) {
#ifdef FLASHMEM_HAVE_CUDA
  return cuda_device_present(why_not);
#else
  if (why_not) *why_not = "this build has no CUDA backend (nvcc was not found when it was configured)";
  return false;
#endif
}

void RetrieverOptions::validate() const {
  if (max_position <= 0) fail("max_position: ", max_position, " must be positive");
}

Retriever::Retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options)
    : weights_(std::move(weights)), options_(options) {
  options_.validate();
  if (!weights_ || weights_->layers.empty()) fail("retriever: no layers to score with");
}

void Retriever::validate_inputs(const ScoreInputs& in) const {
  const int64_t B = static_cast<int64_t>(in.positions.size());
  if (B == 0) fail("positions: batch size B = 0, expected at least one row");
  if (in.keys.batch != B) fail("compressed_k: batch ", in.keys.batch, " does not match positions (B = ", B, ")");
  if (in.keys.chunks <= 0) fail("compressed_k: N = ", in.keys.chunks, " chunks, expected at least one");
  if (static_cast<int64_t>(in.hidden.size()) != B * weights_->hidden)
    fail("hidden: ", in.hidden.size(), " values, expected [B = ", B, ", D = ", weights_->hidden, "]");
  for (int64_t b = 0; b < B; ++b)
    if (in.positions[b] < 0) fail("positions: row ", b, " is ", in.positions[b], ", expected >= 0");
  for (size_t i = 0; i < in.hidden.size(); ++i)
    if (!std::isfinite(in.hidden[i]))
      fail("hidden: row ", i / weights_->hidden, " value ", i % weights_->hidden, " is not finite");
}

std::unique_ptr<Retriever> make_retriever(Device device, std::shared_ptr<const RetrieverWeights> weights,
                                          RetrieverOptions options) {
  if (device == Device::Cpu) return make_cpu_retriever(std::move(weights), options);
#ifdef FLASHMEM_HAVE_CUDA
  std::string why;
  if (!cuda_available(&why)) fail("--device cuda: ", why);
  return make_cuda_retriever(std::move(weights), options);
#else
  fail("--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
#endif
}

}  // namespace flashmem
