#include "src/loop/loop.hpp"

#include <algorithm>
#include <chrono>
#include <random>

#include "src/common/error.hpp"
#include "src/loop/metrics.hpp"

namespace flashmem {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Copies row `row` of attention [layers, rows, heads, N] into out [layers, heads, N].
void gather_attention(const std::vector<float>& attention, int64_t layers, int64_t rows, int64_t heads,
                      int64_t chunks, int64_t row, float* out) {
  for (int64_t l = 0; l < layers; ++l) {
    const float* src = attention.data() + ((l * rows + row) * heads) * chunks;
    std::copy_n(src, heads * chunks, out + l * heads * chunks);
  }
}

}  // namespace

LoopResult run_decode_loop(const LoopSettings& settings, const LoopInputs& in, KeepPolicy& policy,
                           std::span<StepObserver* const> observers) {
  if (!in.decoder || !in.retriever) fail("decode loop: decoder and retriever are required");
  Decoder& decoder = *in.decoder;
  Retriever& retriever = *in.retriever;
  const ToyDecoderWeights& w = decoder.weights();
  const int64_t B = in.keys.batch, N = in.keys.chunks, D = w.hidden, V = w.vocab, H = w.heads;
  const int64_t L = static_cast<int64_t>(w.layers.size());
  const int64_t P = settings.prefill, T = settings.steps, tau = settings.tau;
  if (B <= 0) fail("loop.batch: B = ", B, " must be > 0");
  if (N <= 0) fail("model.chunks: N = ", N, " must be > 0");
  if (N != w.chunks) fail("compressed_k: ", N, " chunks, but the decoder's memory has N = ", w.chunks);
  if (retriever.weights().hidden != D)
    fail("retriever: hidden D = ", retriever.weights().hidden, " does not match the decoder's D = ", D);
  if (P <= 0) fail("loop.prefill: ", P, " must be > 0");
  if (T < 0) fail("loop.steps: ", T, " must be >= 0");
  if (tau <= 0) fail("loop.tau: ", tau, " must be > 0");
  if (static_cast<int64_t>(in.prompt.size()) != B * P)
    fail("prompt: ", in.prompt.size(), " tokens, expected [B = ", B, ", prefill = ", P, "]");
  for (int64_t tok : in.prompt)
    if (tok < 0 || tok >= V) fail("prompt: token ", tok, " is outside the vocabulary [0, ", V, ")");

  const bool shadow = settings.shadow, free_run = settings.free_running;
  const LoopShape shape{B, N, D, V, L, H, P, T, tau, shadow, free_run};
  for (auto* o : observers) o->on_start(shape);

  LoopResult result;
  result.first_divergence.assign(B, -1);
  const auto t_start = Clock::now();

  // Prefill: all P prompt tokens of all rows in one dense call. The toy decoder has no
  // sequence state (SPEC 5: a step reads only its token and the fixed memory), so this equals
  // P sequential steps while reading the weights once.
  std::vector<float> prev_hidden(B * D);
  std::vector<int64_t> prev_pos(B, P - 1);
  {
    const auto t0 = Clock::now();
    const DecoderStep pre = decoder.step(in.prompt, {}, false);
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(pre.hidden.data() + (b * P + P - 1) * D, D, prev_hidden.data() + b * D);
    result.timings.prefill_s = seconds_since(t0);
    for (auto* o : observers) o->on_prefill({in.prompt, prev_hidden});
  }

  // Decoder rows: [0, B) sparse, then B dense teacher-forced (shadow), then B dense free-running.
  const int64_t shadow_off = shadow ? B : -1;
  const int64_t free_off = free_run ? B * (shadow ? 2 : 1) : -1;
  const int64_t R = B * (1 + (shadow ? 1 : 0) + (free_run ? 1 : 0));
  std::vector<uint8_t> keep_rows(R * N, 1);
  std::vector<int64_t> tokens(R, 0);  // the input token of step 0 is token 0 (SPEC 6)
  std::vector<int64_t> sparse_in(B, 0), free_in(B, 0), positions(B);
  std::mt19937_64 rng(settings.seed);

  std::vector<float> row_attention(L * H * N), attention_rows;
  std::vector<RowMeasures> measures(B);
  std::vector<int64_t> empty_rows;
  int64_t cycle = -1, window_start = 0;

  for (int64_t t = 0; t < T; ++t) {
    if (t % tau == 0) {
      // Retrieval from the previous step's hidden state and position (one step stale).
      cycle = t / tau;
      window_start = t;
      const int64_t window = std::min(tau, T - t);
      auto t0 = Clock::now();
      Scores scores;
      const Selection sel = retriever.retrieve({prev_hidden, in.keys, prev_pos}, settings.select, &scores);
      KeepProposal own{sel.keep, std::vector<double>(scores.ensemble.begin(), scores.ensemble.end()), {}};
      const std::vector<uint8_t> retriever_keep = apply_keep_rules(own, B, N, settings.rules);
      result.timings.retriever_s += seconds_since(t0);

      CycleContext ctx;
      ctx.cycle = cycle, ctx.step = t, ctx.window = window, ctx.batch = B, ctx.chunks = N;
      ctx.prev_hidden = prev_hidden, ctx.prev_positions = prev_pos;
      ctx.scores = scores.ensemble, ctx.retriever_keep = retriever_keep, ctx.rng = &rng;
      if (shadow) {
        // Dense lookahead over the window, free-running from this step's input tokens.
        ctx.dense_window_mass = [&, window] {
          const auto t1 = Clock::now();
          std::vector<double> mass(B * N, 0.0);
          std::vector<int64_t> look = sparse_in;
          for (int64_t s = 0; s < window; ++s) {
            const DecoderStep d = decoder.step(look, {}, true);
            for (int64_t l = 0; l < L; ++l)
              for (int64_t b = 0; b < B; ++b)
                for (int64_t h = 0; h < H; ++h) {
                  const float* a = d.attention.data() + ((l * B + b) * H + h) * N;
                  for (int64_t n = 0; n < N; ++n) mass[b * N + n] += a[n];
                }
            look = d.next_token;
          }
          result.timings.oracle_s += seconds_since(t1);
          return mass;
        };
      }
      const KeepProposal proposal = policy.propose(ctx);
      const std::vector<uint8_t> keep = apply_keep_rules(proposal, B, N, settings.rules);
      std::copy(keep.begin(), keep.end(), keep_rows.begin());
      for (auto* o : observers) o->on_cycle({cycle, t, window, prev_pos, scores.ensemble, retriever_keep, keep});
    }

    for (int64_t b = 0; b < B; ++b) {
      positions[b] = P + t;
      tokens[b] = sparse_in[b];
      if (shadow) tokens[shadow_off + b] = sparse_in[b];  // teacher-forced on the sparse tokens
      if (free_run) tokens[free_off + b] = free_in[b];
    }
    auto t0 = Clock::now();
    const DecoderStep s = decoder.step(tokens, keep_rows, shadow);
    result.timings.decoder_s += seconds_since(t0);

    t0 = Clock::now();
    empty_rows.clear();
    for (int64_t r : s.empty_rows)
      if (r < B) empty_rows.push_back(r);
    if (shadow) attention_rows.resize(B * L * H * N);
    for (int64_t b = 0; b < B; ++b) {
      RowMeasures& m = measures[b];
      const uint8_t* keep = keep_rows.data() + b * N;
      m.kept = std::count(keep, keep + N, uint8_t{1});
      m.empty = m.kept == 0;
      if (!shadow) continue;
      gather_attention(s.attention, L, R, H, N, shadow_off + b, row_attention.data());
      std::copy(row_attention.begin(), row_attention.end(), attention_rows.begin() + b * L * H * N);
      m.recall_per_layer = attention_mass_recall(row_attention, L, H, {keep, static_cast<size_t>(N)});
      m.recall = mean_recall(m.recall_per_layer);
      m.kl = kl_divergence({s.logits.data() + (shadow_off + b) * V, static_cast<size_t>(V)},
                           {s.logits.data() + b * V, static_cast<size_t>(V)});
      m.top1 = s.next_token[shadow_off + b] == s.next_token[b];
      const std::vector<double> mass = chunk_mass(row_attention, L, H);
      m.top10_mass = top_fraction_mass(mass, 0.10);
    }
    for (int64_t b = 0; b < B; ++b) {
      sparse_in[b] = s.next_token[b];
      if (free_run) {
        free_in[b] = s.next_token[free_off + b];
        if (result.first_divergence[b] < 0 && free_in[b] != sparse_in[b]) result.first_divergence[b] = t;
      }
      std::copy_n(s.hidden.data() + b * D, D, prev_hidden.data() + b * D);
      prev_pos[b] = positions[b];
    }
    result.timings.measures_s += seconds_since(t0);

    StepEvent ev;
    ev.step = t, ev.cycle = cycle, ev.offset = t - window_start + 1;
    ev.positions = positions, ev.input_tokens = {tokens.data(), static_cast<size_t>(B)};
    ev.hidden = {s.hidden.data(), static_cast<size_t>(B * D)};
    ev.logits = {s.logits.data(), static_cast<size_t>(B * V)};
    ev.tokens = sparse_in;
    ev.keep = {keep_rows.data(), static_cast<size_t>(B * N)};
    if (shadow) {
      ev.dense_logits = {s.logits.data() + shadow_off * V, static_cast<size_t>(B * V)};
      ev.dense_tokens = {s.next_token.data() + shadow_off, static_cast<size_t>(B)};
      ev.dense_attention = attention_rows;
    }
    ev.measures = measures;
    if (free_run) ev.free_tokens = free_in;
    ev.empty_sparse_rows = empty_rows;
    for (auto* o : observers) o->on_step(ev);
  }

  result.steps = T;
  result.cycles = T == 0 ? 0 : (T + tau - 1) / tau;
  result.timings.total_s = seconds_since(t_start);
  for (auto* o : observers) o->on_finish(result);
  return result;
}

}  // namespace flashmem
