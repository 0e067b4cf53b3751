// Keep policies: what the loop keeps visible for the next window of tau steps. A policy
// proposes candidates and a priority per chunk; post-processing (attention sink, recency
// tail, cap or budget) is applied in one place, apply_keep_rules(). Policies register by
// name, so a later issue adds one without touching the loop.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace flashmem {

// Sink / tail / cap, applied to every policy's proposal (the production recipe, SPEC 7).
struct KeepRules {
  int64_t tail = 0;  // newest chunks (highest indices) always kept
  int64_t sink = 0;  // oldest chunks (lowest indices) always kept
  int64_t cap = 0;   // most chunks kept per row; 0 = none
};

// What a policy proposes for B rows of N chunks.
struct KeepProposal {
  std::vector<uint8_t> candidates;  // [B, N] chunks the policy wants
  std::vector<double> priority;     // [B, N] higher = more important (used when trimming)
  std::vector<int64_t> budget;      // [B] most chunks in total (incl. sink/tail), -1 = none
};

// final = sink U tail U candidates; when that exceeds min(cap, budget) the forced chunks stay
// and the candidates fill the rest by priority (ties: lower index). Returns [B, N].
std::vector<uint8_t> apply_keep_rules(const KeepProposal& proposal, int64_t batch, int64_t chunks,
                                      const KeepRules& rules);

// Everything a policy may look at when a window starts (step t, t % tau == 0).
struct CycleContext {
  int64_t cycle = 0, step = 0, window = 0;  // window: steps this keep-set will cover
  int64_t batch = 0, chunks = 0;
  std::span<const float> prev_hidden;       // [B, D] hidden of the previous step (sparse run)
  std::span<const int64_t> prev_positions;  // [B]
  std::span<const float> scores;            // [B, N] retriever ensemble scores (always computed)
  std::span<const uint8_t> retriever_keep;  // [B, N] the retriever's selection after the keep rules
  std::mt19937_64* rng = nullptr;           // seeded from policy.seed
  // Dense attention mass per chunk [B, N] summed over the coming window of a dense lookahead
  // (for the oracle; computed on demand, costs `window` extra dense steps).
  std::function<std::vector<double>()> dense_window_mass;
};

class KeepPolicy {
 public:
  virtual ~KeepPolicy() = default;
  virtual const char* name() const = 0;
  virtual KeepProposal propose(const CycleContext& ctx) = 0;
};

using KeepPolicyFactory = std::function<std::unique_ptr<KeepPolicy>()>;
void register_keep_policy(const std::string& name, KeepPolicyFactory factory);
bool keep_policy_registered(const std::string& name);
std::vector<std::string> keep_policy_names();  // sorted
std::unique_ptr<KeepPolicy> make_keep_policy(const std::string& name);  // throws naming policy.kind

}  // namespace flashmem
