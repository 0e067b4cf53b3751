// Events of the decode loop, for observers (metrics, console, trace writer, progress; a later
// transfer model plugs in here). Spans are valid only during the call.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace flashmem {

struct LoopShape {
  int64_t batch = 0, chunks = 0, hidden = 0, vocab = 0, layers = 0, heads = 0;
  int64_t prefill = 0, steps = 0, tau = 0;
  bool shadow = false, free_running = false;
};

struct PrefillEvent {
  std::span<const int64_t> prompt;     // [B, P]
  std::span<const float> last_hidden;  // [B, D] at position P-1 (seeds the first retrieval)
};

// A keep-set is chosen (t % tau == 0); it holds for steps [step, step + window).
struct CycleEvent {
  int64_t cycle = 0, step = 0, window = 0;
  std::span<const int64_t> query_positions;  // [B] position of the hidden state scored
  std::span<const float> scores;             // [B, N] retriever ensemble scores
  std::span<const uint8_t> retriever_keep;   // [B, N] retriever selection after the keep rules
  std::span<const uint8_t> keep;             // [B, N] what the policy keeps (the mask used)
};

// Per row measures of one step against the dense shadow (when the shadow runs).
struct RowMeasures {
  int64_t kept = 0;
  std::vector<double> recall_per_layer;  // attention-mass recall per decoder layer
  double recall = 0.0;                   // mean over layers
  double kl = 0.0;                       // KL(dense || sparse), nats
  bool top1 = true;                      // dense and sparse argmax agree (teacher-forced)
  bool empty = false;                    // the sparse row kept no chunk in some layer
  double top10_mass = 0.0;               // share of dense mass on the top 10 % of chunks
};

struct StepEvent {
  int64_t step = 0, cycle = 0, offset = 0;  // offset inside the window, 1 .. tau
  std::span<const int64_t> positions;       // [B] position P + t
  std::span<const int64_t> input_tokens;    // [B]
  std::span<const float> hidden;            // [B, D] sparse run
  std::span<const float> logits;            // [B, V] sparse run
  std::span<const int64_t> tokens;          // [B] argmax of the sparse run
  std::span<const uint8_t> keep;            // [B, N]
  // Dense shadow (empty when it does not run).
  std::span<const float> dense_logits;      // [B, V] teacher-forced dense
  std::span<const int64_t> dense_tokens;    // [B]
  std::span<const float> dense_attention;   // [B, layers, heads, N]
  std::span<const RowMeasures> measures;    // [B]
  std::span<const int64_t> free_tokens;     // [B] free-running dense argmax (when it runs)
  std::span<const int64_t> empty_sparse_rows;  // row indices with an empty keep-set
};

struct LoopTimings {
  double prefill_s = 0, retriever_s = 0, decoder_s = 0, oracle_s = 0, measures_s = 0, total_s = 0;
};

struct LoopResult {
  int64_t steps = 0, cycles = 0;
  std::vector<int64_t> first_divergence;  // [B] first step where free-running tokens differ; -1 = never
  LoopTimings timings;
};

class StepObserver {
 public:
  virtual ~StepObserver() = default;
  virtual void on_start(const LoopShape&) {}
  virtual void on_prefill(const PrefillEvent&) {}
  virtual void on_cycle(const CycleEvent&) {}
  virtual void on_step(const StepEvent&) {}
  virtual void on_finish(const LoopResult&) {}
};

}  // namespace flashmem
