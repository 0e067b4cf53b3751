// Builds what a run needs from its config: decoder weights (file or seeded, with the chosen
// memory structure), the retriever checkpoint (file or seeded, SPEC 8), compressed keys
// (mock, derived from the memory, or a file) and the prompt (file or seeded).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/loop/config.hpp"
#include "src/loop/loop.hpp"
#include "src/retriever/retriever.hpp"
#include "toy_model/decoder.hpp"

namespace flashmem {

struct RunSetup {
  Device device = Device::Cpu;
  std::shared_ptr<const ToyDecoderWeights> decoder_weights;
  std::shared_ptr<const RetrieverWeights> retriever_weights;
  int64_t batch = 0, chunks = 0;
  std::vector<uint8_t> keys;    // [B, N, 132]
  std::vector<int64_t> prompt;  // [B, prefill]
  std::vector<int64_t> salient_chunks;  // memory.structure salient: the amplified chunks
  double setup_s = 0.0;

  CompressedKeysView keys_view() const;
};

// Validates cfg, builds the inputs and resolves cfg in place (device, the shape read from
// files, the retriever's layer names), so the config written to the run folder is complete.
RunSetup prepare_run(RunConfig& cfg);

LoopSettings loop_settings(const RunConfig& cfg);
RetrieverOptions retriever_options(const RunConfig& cfg);

// Keys that mean something: chunk n's 128-dim key is a fixed seeded projection of its memory
// vector (P [128, D], entries uniform * sqrt(3/D)), globally rescaled so the median chunk's
// key RMS is that of the mock keys (0.0625), stored fp8 e4m3fn with a per-chunk scale
// amax / 448. Returns [N, 132].
std::vector<uint8_t> memory_compressed_keys(const std::vector<float>& memory, int64_t chunks, int64_t hidden,
                                            uint64_t seed);

// Amplifies round(fraction * N) seeded chunks of memory [N, D] by gain; returns their indices.
std::vector<int64_t> make_salient_memory(std::vector<float>& memory, int64_t chunks, int64_t hidden,
                                         double fraction, double gain, uint64_t seed);

}  // namespace flashmem
