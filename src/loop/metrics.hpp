// The measures of a sparse decode step against its dense shadow, as pure functions
// (tested against independent float64 computations in tests/test_metrics.cpp).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace flashmem {

// Attention-mass recall of one row: attention [layers, heads, N] (dense softmax probabilities),
// keep [N] (1 = kept). Per layer: sum_h sum_{n kept} a[l,h,n] / sum_h sum_n a[l,h,n] (1 when a
// layer has no mass at all, 0 when nothing is kept). Accumulated in double.
std::vector<double> attention_mass_recall(std::span<const float> attention, int64_t layers, int64_t heads,
                                          std::span<const uint8_t> keep);
// The mean over layers of the above (every layer weighs the same).
double mean_recall(std::span<const double> per_layer);

// KL(softmax(p_logits) || softmax(q_logits)) in nats, log-softmax in double; >= 0.
double kl_divergence(std::span<const float> p_logits, std::span<const float> q_logits);

// Index of the largest value, lowest index on ties (as the decoder's argmax).
int64_t argmax(std::span<const float> values);
bool top1_agree(std::span<const float> a_logits, std::span<const float> b_logits);

// Share of the total mass held by the ceil(fraction * N) largest entries of mass [N] (>= 0).
double top_fraction_mass(std::span<const double> mass, double fraction);

// Per-chunk attention mass of one row: attention [layers, heads, N] summed over layers and
// heads, normalised to sum 1 (all zero if there is no mass).
std::vector<double> chunk_mass(std::span<const float> attention, int64_t layers, int64_t heads);

}  // namespace flashmem
