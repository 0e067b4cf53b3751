#include "src/loop/policy.hpp"

#include <algorithm>
#include <map>
#include <mutex>
#include <numeric>

#include "src/common/error.hpp"

namespace flashmem {

std::vector<uint8_t> apply_keep_rules(const KeepProposal& p, int64_t batch, int64_t chunks, const KeepRules& rules) {
  if (static_cast<int64_t>(p.candidates.size()) != batch * chunks ||
      static_cast<int64_t>(p.priority.size()) != batch * chunks)
    fail("keep policy: proposal is not [B = ", batch, ", N = ", chunks, "]");
  std::vector<uint8_t> keep(batch * chunks, 0);
  std::vector<int64_t> order;
  for (int64_t b = 0; b < batch; ++b) {
    uint8_t* row = keep.data() + b * chunks;
    const uint8_t* cand = p.candidates.data() + b * chunks;
    const double* prio = p.priority.data() + b * chunks;
    int64_t limit = chunks;
    if (rules.cap > 0) limit = std::min(limit, rules.cap);
    if (!p.budget.empty() && p.budget[b] >= 0) limit = std::min(limit, p.budget[b]);
    // Forced chunks first (the sink, then the tail), within the limit.
    int64_t count = 0;
    const auto force = [&](int64_t n) {
      if (!row[n] && count < limit) row[n] = 1, ++count;
    };
    for (int64_t n = 0; n < std::min(rules.sink, chunks); ++n) force(n);
    for (int64_t n = chunks - 1; n >= std::max<int64_t>(0, chunks - rules.tail); --n) force(n);
    // Then candidates by priority (higher first, ties to the lower index).
    order.clear();
    for (int64_t n = 0; n < chunks; ++n)
      if (cand[n] && !row[n]) order.push_back(n);
    const int64_t room = limit - count;
    if (static_cast<int64_t>(order.size()) > room) {
      std::partial_sort(order.begin(), order.begin() + room, order.end(), [prio](int64_t x, int64_t y) {
        return prio[x] > prio[y] || (prio[x] == prio[y] && x < y);
      });
      order.resize(room);
    }
    for (int64_t n : order) row[n] = 1;
  }
  return keep;
}

namespace {

// The trained retriever: its own selection (threshold or top-k), scores as priority.
class RetrieverPolicy : public KeepPolicy {
 public:
  const char* name() const override { return "retriever"; }
  KeepProposal propose(const CycleContext& ctx) override {
    return {std::vector<uint8_t>(ctx.retriever_keep.begin(), ctx.retriever_keep.end()),
            std::vector<double>(ctx.scores.begin(), ctx.scores.end()), {}};
  }
};

// Baselines keep as many chunks per row as the retriever did (same budget).
KeepProposal budgeted(const CycleContext& ctx, std::vector<double> priority) {
  KeepProposal p{std::vector<uint8_t>(ctx.batch * ctx.chunks, 1), std::move(priority),
                 std::vector<int64_t>(ctx.batch)};
  for (int64_t b = 0; b < ctx.batch; ++b)
    p.budget[b] = std::count(ctx.retriever_keep.begin() + b * ctx.chunks,
                             ctx.retriever_keep.begin() + (b + 1) * ctx.chunks, uint8_t{1});
  return p;
}

// The chunks the dense shadow attends to most over the coming window (an upper bracket).
class OraclePolicy : public KeepPolicy {
 public:
  const char* name() const override { return "oracle"; }
  KeepProposal propose(const CycleContext& ctx) override {
    if (!ctx.dense_window_mass) fail("policy.kind: oracle needs the dense shadow (shadow.enabled: true)");
    return budgeted(ctx, ctx.dense_window_mass());
  }
};

// A sliding window: the newest chunks (plus the sink).
class RecencyPolicy : public KeepPolicy {
 public:
  const char* name() const override { return "recency"; }
  KeepProposal propose(const CycleContext& ctx) override {
    std::vector<double> prio(ctx.batch * ctx.chunks);
    for (int64_t i = 0; i < ctx.batch * ctx.chunks; ++i) prio[i] = static_cast<double>(i % ctx.chunks);
    return budgeted(ctx, std::move(prio));
  }
};

// Uniformly random chunks (a lower bracket).
class RandomPolicy : public KeepPolicy {
 public:
  const char* name() const override { return "random"; }
  KeepProposal propose(const CycleContext& ctx) override {
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::vector<double> prio(ctx.batch * ctx.chunks);
    for (double& v : prio) v = u(*ctx.rng);
    return budgeted(ctx, std::move(prio));
  }
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, KeepPolicyFactory> factories;
  Registry() {
    factories["retriever"] = [] { return std::make_unique<RetrieverPolicy>(); };
    factories["oracle"] = [] { return std::make_unique<OraclePolicy>(); };
    factories["recency"] = [] { return std::make_unique<RecencyPolicy>(); };
    factories["random"] = [] { return std::make_unique<RandomPolicy>(); };
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_keep_policy(const std::string& name, KeepPolicyFactory factory) {
  std::lock_guard lock(registry().mutex);
  registry().factories[name] = std::move(factory);
}

bool keep_policy_registered(const std::string& name) {
  std::lock_guard lock(registry().mutex);
  return registry().factories.count(name) > 0;
}

std::vector<std::string> keep_policy_names() {
  std::lock_guard lock(registry().mutex);
  std::vector<std::string> names;
  for (const auto& [n, f] : registry().factories) names.push_back(n);
  return names;
}

std::unique_ptr<KeepPolicy> make_keep_policy(const std::string& name) {
  KeepPolicyFactory f;
  {
    std::lock_guard lock(registry().mutex);
    auto it = registry().factories.find(name);
    if (it == registry().factories.end()) fail("policy.kind: '", name, "' is not a registered policy");
    f = it->second;
  }
  return f();
}

}  // namespace flashmem
