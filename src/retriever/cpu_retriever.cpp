#include "src/retriever/cpu_retriever.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>

#include "src/common/parallel.hpp"
#include "src/numerics/hadamard.hpp"
#include "src/retriever/query.hpp"

namespace flashmem {

namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr int64_t kTile = 256;  // chunks per work item: keys [256, 128] + logits [256, H] stay in L2

class CpuRetriever final : public Retriever {
 public:
  CpuRetriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options)
      : Retriever(std::move(weights), options) {}
  const char* backend() const override { return "cpu"; }

  Scores score(const ScoreInputs& in, bool with_layer_logits) override {
    validate_inputs(in);
    validate_compressed_keys(in.keys);
    const size_t L = weights_->layers.size();
    std::vector<LayerQueries> queries;
    for (size_t l = 0; l < L; ++l) queries.push_back(compute_queries(*weights_, l, in.hidden, in.positions, options_.max_position));

    const int64_t B = in.keys.batch, N = in.keys.chunks;
    Scores out{B, N, std::vector<float>(B * N), {}};
    std::vector<std::vector<float>> logits(L, std::vector<float>(with_layer_logits ? B * N : 0));
    score_tiles(in.keys, queries, [&](size_t l, int64_t b, int64_t n, float logit) {
      if (with_layer_logits) logits[l][b * N + n] = logit;
      float& slot = out.ensemble[b * N + n];
      const float s = sigmoid(logit);
      if (options_.ensemble == Ensemble::Max) slot = (l == 0) ? s : std::max(slot, s);
      else slot = (l == 0) ? s : slot + s;
    });
    if (options_.ensemble == Ensemble::Mean)
      for (float& v : out.ensemble) v /= static_cast<float>(L);
    if (with_layer_logits) out.layer_logits = std::move(logits);
    return out;
  }

  Selection retrieve(const ScoreInputs& in, const SelectRule& rule, Scores* scores_out) override {
    rule.validate();
    Scores scores = score(in, false);
    Selection selection = select_chunks(scores.ensemble, scores.batch, scores.chunks, rule);
    if (scores_out) *scores_out = std::move(scores);
    return selection;
  }

  std::vector<float> layer_logits(size_t layer, const ScoreInputs& in) override {
    validate_inputs(in);
    validate_compressed_keys(in.keys);
    std::vector<LayerQueries> queries;
    queries.push_back(compute_queries(*weights_, layer, in.hidden, in.positions, options_.max_position));
    std::vector<float> out(in.keys.batch * in.keys.chunks);
    score_tiles(in.keys, queries, [&](size_t, int64_t b, int64_t n, float logit) { out[b * in.keys.chunks + n] = logit; });
    return out;
  }

 private:
  // For every (row, chunk), the logit sum_h relu(q_h . k) * w_h of each layer, in layer
  // order: emit(layer, b, n, logit). A tile dequantises its keys once for all layers.
  template <typename Emit>
  void score_tiles(const CompressedKeysView& keys, const std::vector<LayerQueries>& queries, Emit emit) const {
    const int64_t B = keys.batch, N = keys.chunks, H = weights_->heads;
    const int64_t tiles_per_row = (N + kTile - 1) / kTile;
    parallel_for(B * tiles_per_row, [&](int64_t begin, int64_t end) {
      RowMatrix k(kTile, kHeadDim), dots(kTile, H);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles_per_row, n0 = (item % tiles_per_row) * kTile;
        const int64_t count = std::min(kTile, N - n0);
        for (int64_t i = 0; i < count; ++i) dequantize_chunk(keys.chunk(b, n0 + i), k.row(i).data());
        for (size_t l = 0; l < queries.size(); ++l) {
          Eigen::Map<const RowMatrix> q(queries[l].q.data() + b * H * kHeadDim, H, kHeadDim);
          Eigen::Map<const Eigen::VectorXf> w(queries[l].fused_w.data() + b * H, H);
          dots.topRows(count).noalias() = k.topRows(count) * q.transpose();
          for (int64_t i = 0; i < count; ++i) emit(l, b, n0 + i, dots.row(i).cwiseMax(0.0f).dot(w.transpose()));
        }
      }
    });
  }
};

}  // namespace

std::unique_ptr<Retriever> make_cpu_retriever(std::shared_ptr<const RetrieverWeights> weights, RetrieverOptions options) {
  return std::make_unique<CpuRetriever>(std::move(weights), options);
}

}  // namespace flashmem
