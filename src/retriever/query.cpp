#include "src/retriever/query.hpp"

#include <Eigen/Core>
#include <cmath>

#include "src/common/parallel.hpp"
#include "src/numerics/bf16.hpp"
#include "src/numerics/hadamard.hpp"
#include "src/numerics/rmsnorm.hpp"
#include "src/numerics/rope.hpp"

namespace flashmem {

namespace {
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<const RowMatrix>;
using RowMap = Eigen::Map<RowMatrix>;

// out[B, out_dim] = in[B, in_dim] * W[out_dim, in_dim]^T. The weight rows are split across
// threads: at B = 1 this is a GEMV bound by reading W, so every core must stream a part.
void linear(const std::vector<float>& w, int64_t out_dim, int64_t in_dim, const float* in, int64_t batch, float* out) {
  ConstRowMap W(w.data(), out_dim, in_dim);
  ConstRowMap X(in, batch, in_dim);
  RowMap Y(out, batch, out_dim);
  parallel_for((out_dim + 63) / 64, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * 64, r1 = std::min(end * 64, out_dim);
    Y.middleCols(r0, r1 - r0).noalias() = X * W.middleRows(r0, r1 - r0).transpose();
  });
}
}  // namespace

void finish_head_query(std::span<float, 128> q, const RopeAngles& angles) {
  for (float& v : q) v = round_to_bf16(v);
  apply_rope(q.subspan<64, 64>(), angles);
  for (float& v : q.subspan<64, 64>()) v = round_to_bf16(v);
  hadamard_128(q);
}

LayerQueries compute_queries(const RetrieverWeights& weights, size_t layer_index, std::span<const float> hidden,
                             std::span<const int64_t> positions, int64_t max_position) {
  const RetrieverLayer& layer = weights.layers.at(layer_index);
  const int64_t B = static_cast<int64_t>(positions.size()), D = weights.hidden, R = weights.rank, H = weights.heads;

  std::vector<float> a(B * R);
  linear(layer.wq_a, R, D, hidden.data(), B, a.data());
  for (int64_t b = 0; b < B; ++b) {
    std::span<float> row(a.data() + b * R, R);
    rmsnorm(row, layer.q_norm, row);
  }

  LayerQueries out{B, H, std::vector<float>(B * H * kHeadDim), std::vector<float>(B * H)};
  linear(layer.wq_b, H * kHeadDim, R, a.data(), B, out.q.data());
  linear(layer.weights_proj, H, D, hidden.data(), B, out.fused_w.data());

  const float head_scale = static_cast<float>(std::pow(128.0, -0.5) * std::pow(static_cast<double>(H), -0.5));
  for (int64_t b = 0; b < B; ++b) {
    const RopeAngles angles = rope_at(positions[b], max_position);
    for (int64_t h = 0; h < H; ++h) finish_head_query(std::span<float, 128>(out.q.data() + (b * H + h) * kHeadDim, 128), angles);
    for (int64_t h = 0; h < H; ++h) out.fused_w[b * H + h] *= head_scale;
  }
  return out;
}

}  // namespace flashmem
