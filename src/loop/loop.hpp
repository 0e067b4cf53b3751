// The decode loop (SPEC 6) with a dense shadow: prefill, decode steps, one retrieval per
// window of tau steps from the previous step's hidden state and position, a keep policy,
// the mask held for the window, argmax tokens. It composes a Decoder, a Retriever, a
// KeepPolicy and observers; the measures are computed here once and handed to observers.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "src/loop/observer.hpp"
#include "src/loop/policy.hpp"
#include "src/retriever/retriever.hpp"
#include "toy_model/decoder.hpp"

namespace flashmem {

struct LoopSettings {
  int64_t prefill = 8, steps = 0, tau = 64;
  SelectRule select;
  KeepRules rules;
  bool shadow = true;        // dense rows in lockstep (teacher-forced on the sparse tokens)
  bool free_running = true;  // dense rows on their own tokens (first divergence)
  uint64_t seed = 5;         // the policy's RNG
};

struct LoopInputs {
  Decoder* decoder = nullptr;
  Retriever* retriever = nullptr;
  CompressedKeysView keys;          // [B, N, 132]
  std::span<const int64_t> prompt;  // [B, prefill]
};

// Runs the loop; throws Error on inconsistent sizes (naming them).
LoopResult run_decode_loop(const LoopSettings& settings, const LoopInputs& in, KeepPolicy& policy,
                           std::span<StepObserver* const> observers);

}  // namespace flashmem
