// The Retriever: one interface, a CPU (Eigen) and a CUDA backend. Scores [B, N] compressed
// chunks from each row's hidden state and position, ensembles over layers, selects.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "src/retriever/compressed_keys.hpp"
#include "src/retriever/selection.hpp"
#include "src/retriever/weights.hpp"

namespace flashmem {

enum class Device { Cpu, Cuda };
enum class Precision { Exact, Fast };  // Fast: bf16 weights and tensor-core scoring (CUDA only)
const char* device_name(Device d);
Device parse_device(const std::string& text, const std::string& field);
Precision parse_precision(const std::string& text, const std::string& field);
bool cuda_available(std::string* why_not = nullptr);  // built with CUDA and a device present

struct RetrieverOptions {
  int64_t max_position = 524288;
  Ensemble ensemble = Ensemble::Max;
  Precision precision = Precision::Exact;
  void validate() const;
};

// One scoring call. Host memory; every row has its own keys (rows may share a pointer).
struct ScoreInputs {
  std::span<const float> hidden;       // [B, D]
  CompressedKeysView keys;             // [B, N, 132]
  std::span<const int64_t> positions;  // [B], >= 0
};

struct Scores {
  int64_t batch = 0, chunks = 0;
  std::vector<float> ensemble;                  // [B, N] sigmoid scores, ensembled
  std::vector<std::vector<float>> layer_logits;  // per layer [B, N], when asked for
};

class Retriever {
 public:
  virtual ~Retriever() = default;
  virtual const char* backend() const = 0;
  const RetrieverWeights& weights() const { return *weights_; }
  const RetrieverOptions& options() const { return options_; }

  // Scores every layer against the same keys and ensembles them.
  virtual Scores score(const ScoreInputs& in, bool with_layer_logits = false) = 0;
  // Scores and selects in one call (the CUDA backend selects on the device).
  virtual Selection retrieve(const ScoreInputs& in, const SelectRule& rule, Scores* scores_out = nullptr) = 0;
  // Logits [B, N] of one layer against its own keys (a per-layer entry point).
  virtual std::vector<float> layer_logits(size_t layer, const ScoreInputs& in) = 0;

 protected:
  Retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options);
  // Shape, position and emptiness checks shared by the backends (keys' contents are
  // checked inside each backend's scoring pass). Throws Error naming the field.
  void validate_inputs(const ScoreInputs& in) const;

  std::shared_ptr<const RetrieverWeights> weights_;
  RetrieverOptions options_;
};

std::unique_ptr<Retriever> make_retriever(Device device, std::shared_ptr<const RetrieverWeights> weights,
                                          RetrieverOptions options = {});

}  // namespace flashmem
