#include "src/loop/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <functional>

#include "src/common/error.hpp"

namespace flashmem {

std::vector<double> attention_mass_recall(std::span<const float> attention, int64_t layers, int64_t heads,
                                          std::span<const uint8_t> keep) {
  const int64_t N = static_cast<int64_t>(keep.size());
  if (static_cast<int64_t>(attention.size()) != layers * heads * N)
    fail("attention_mass_recall: attention has ", attention.size(), " values, expected layers*heads*N = ",
         layers * heads * N);
  std::vector<double> recall(layers, 0.0);
  for (int64_t l = 0; l < layers; ++l) {
    double kept = 0.0, total = 0.0;
    for (int64_t h = 0; h < heads; ++h) {
      const float* a = attention.data() + (l * heads + h) * N;
      for (int64_t n = 0; n < N; ++n) {
        total += a[n];
        if (keep[n]) kept += a[n];
      }
    }
    recall[l] = total > 0.0 ? kept / total : 1.0;
  }
  return recall;
}

double mean_recall(std::span<const double> per_layer) {
  if (per_layer.empty()) return 0.0;
  double s = 0.0;
  for (double r : per_layer) s += r;
  return s / static_cast<double>(per_layer.size());
}

namespace {
// log-softmax in double: x - max - log(sum exp(x - max)).
std::vector<double> log_softmax(std::span<const float> logits) {
  double m = -INFINITY;
  for (float v : logits) m = std::max(m, static_cast<double>(v));
  double s = 0.0;
  for (float v : logits) s += std::exp(static_cast<double>(v) - m);
  const double lse = m + std::log(s);
  std::vector<double> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - lse;
  return out;
}
}  // namespace

double kl_divergence(std::span<const float> p_logits, std::span<const float> q_logits) {
  if (p_logits.size() != q_logits.size() || p_logits.empty())
    fail("kl_divergence: logits of ", p_logits.size(), " and ", q_logits.size(), " values, expected equal and > 0");
  const auto lp = log_softmax(p_logits), lq = log_softmax(q_logits);
  double kl = 0.0;
  for (size_t i = 0; i < lp.size(); ++i) kl += std::exp(lp[i]) * (lp[i] - lq[i]);
  return std::max(kl, 0.0);  // rounding can leave -1e-17 for identical inputs
}

int64_t argmax(std::span<const float> values) {
  int64_t best = 0;
  for (int64_t i = 1; i < static_cast<int64_t>(values.size()); ++i)
    if (values[i] > values[best]) best = i;
  return best;
}

bool top1_agree(std::span<const float> a_logits, std::span<const float> b_logits) {
  return argmax(a_logits) == argmax(b_logits);
}

double top_fraction_mass(std::span<const double> mass, double fraction) {
  if (mass.empty()) return 0.0;
  const auto n = static_cast<int64_t>(mass.size());
  const int64_t k = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n))), 0, n);
  std::vector<double> sorted(mass.begin(), mass.end());
  std::nth_element(sorted.begin(), sorted.begin() + (k > 0 ? k - 1 : 0), sorted.end(), std::greater<>());
  double top = 0.0, total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    total += sorted[i];
    if (i < k) top += sorted[i];
  }
  return total > 0.0 ? top / total : 0.0;
}

std::vector<double> chunk_mass(std::span<const float> attention, int64_t layers, int64_t heads) {
  const int64_t rows = layers * heads;
  if (rows <= 0 || attention.size() % rows != 0) fail("chunk_mass: attention is not [layers, heads, N]");
  const int64_t N = static_cast<int64_t>(attention.size()) / rows;
  std::vector<double> mass(N, 0.0);
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < N; ++n) mass[n] += attention[r * N + n];
  for (double m : mass) total += m;
  if (total > 0.0)
    for (double& m : mass) m /= total;
  return mass;
}

}  // namespace flashmem
