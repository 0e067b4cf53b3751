// Backend dispatch and the input checks both backends share.
#include <string>

#include "src/common/error.hpp"
#include "toy_model/decoder_internal.hpp"

namespace flashmem {

int64_t validate_step_inputs(const ToyDecoderWeights& w, std::span<const int64_t> tokens, std::span<const uint8_t> keep) {
  const int64_t B = static_cast<int64_t>(tokens.size());
  if (B == 0) fail("decoder step: tokens is empty (need one token per row)");
  for (int64_t b = 0; b < B; ++b)
    if (tokens[b] < 0 || tokens[b] >= w.vocab)
      fail("decoder step: tokens[", b, "] = ", tokens[b], " is outside the vocabulary [0, ", w.vocab, ")");
  if (!keep.empty() && static_cast<int64_t>(keep.size()) != B * w.chunks)
    fail("decoder step: keep has ", keep.size(), " entries, expected B*N = ", B, "*", w.chunks, " (or none for dense)");
  return B;
}

std::vector<int64_t> empty_keep_rows(int64_t batch, int64_t chunks, std::span<const uint8_t> keep) {
  std::vector<int64_t> rows;
  if (keep.empty()) return rows;
  for (int64_t b = 0; b < batch; ++b) {
    bool any = false;
    for (int64_t n = 0; n < chunks && !any; ++n) any = keep[b * chunks + n] != 0;
    if (!any) rows.push_back(b);
  }
  return rows;
}

std::unique_ptr<Decoder> make_decoder(Device device, std::shared_ptr<const ToyDecoderWeights> weights) {
  if (!weights) fail("make_decoder: no weights");
  validate_toy_decoder(*weights);
  if (device == Device::Cpu) return make_cpu_decoder(std::move(weights));
#ifdef FLASHMEM_TOY_CUDA  // set by toy_model/meson.build when the CUDA backend is compiled
  return make_cuda_decoder(std::move(weights));
#else
  fail("--device cuda: this build has no CUDA backend (nvcc was not found when it was configured)");
#endif
}

}  // namespace flashmem
